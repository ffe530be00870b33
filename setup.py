"""Build of the optional C loops (everything else is in pyproject.toml).

``optional=True``: where no C compiler is found the install still succeeds, and
`modelstock.kernels` leaves all the arithmetic to torch.
"""

import os

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "modelstock._kernels", ["src/modelstock/_kernels.c"], optional=True,
    define_macros=[("MODELSTOCK_PYTHON_MODULE", "1")],
    extra_compile_args=[] if os.name == "nt" else ["-O3", "-std=c99"],
)])
