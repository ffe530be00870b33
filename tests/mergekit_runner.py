"""Run several ``mergekit-yaml`` merges in one process, with mergekit's own virtualenv.

    /work/mergekit-venv/bin/python tests/mergekit_runner.py CONFIG.yml OUT [CONFIG.yml OUT ...]

Each pair is exactly ``mergekit-yaml CONFIG.yml OUT --quiet --no-copy-tokenizer
--no-write-model-card`` (mergekit's command, called in-process), so the ~6 s of importing
mergekit and its dependencies is paid once, not once per config. Model paths in the configs
should be absolute (mergekit takes a relative path it cannot find for a Hugging Face repo).
Prints one JSON line per merge (``{"config", "out", "seconds"}``); stops at the first failure
with mergekit's traceback and exit status 1. Imports nothing from this project: it runs in
mergekit's interpreter (``benchmarks/make_mergekit_venv.sh`` makes it).
"""

from __future__ import annotations

import json
import os
import sys
import time

FLAGS = ["--quiet", "--no-copy-tokenizer", "--no-write-model-card"]


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only: never ask the Hub
    from mergekit.scripts.run_yaml import main as mergekit_yaml  # mergekit-yaml's entry point

    for config, out in zip(argv[::2], argv[1::2], strict=True):
        start = time.perf_counter()
        mergekit_yaml.main([config, out, *FLAGS], standalone_mode=False)
        print(json.dumps({"config": config, "out": out,
                          "seconds": round(time.perf_counter() - start, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
