"""Fuzz the safetensors, index and pickle readers at a small budget (issue 8, item 4).

Every input must open and merge, or fail with one clean `ModelStockError`. The large budget,
with counts, is ``python benchmarks/fuzz_readers.py --seconds 600`` (or ``pytest -m slow``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_readers import (
    check,
    index_bytes,
    make_index_dir,
    pickle_bytes,
    pickle_seeds,
    safetensors_bytes,
)
from tests.hostile_files import REPO, cli_env

SMALL = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(SMALL, max_examples=300)
@given(blob=safetensors_bytes())
def test_fuzz_safetensors(blob: bytes, workdir: Path) -> None:
    path = workdir / "fuzz.safetensors"
    path.write_bytes(blob)
    assert check(path, workdir / "out.safetensors") is None


@SMALL
@given(blob=st.binary(max_size=300))
def test_fuzz_safetensors_random_bytes(blob: bytes, workdir: Path) -> None:
    path = workdir / "random.safetensors"
    path.write_bytes(blob)
    assert check(path, workdir / "out.safetensors") is None


@pytest.fixture(scope="module")
def index_dir(workdir: Path) -> Path:
    return make_index_dir(workdir / "index")


@SMALL
@given(blob=index_bytes())
def test_fuzz_index(blob: bytes, index_dir: Path) -> None:
    path = index_dir / "model.safetensors.index.json"
    path.write_bytes(blob)
    assert check(path, index_dir.parent / "out.safetensors") is None



@pytest.fixture(scope="module")
def seeds(workdir: Path) -> tuple[list[bytes], Path]:
    marker = workdir / "PWNED"
    return pickle_seeds(marker), marker


@settings(SMALL, max_examples=200)
@given(data=st.data())
def test_fuzz_pickle(data, seeds, workdir: Path) -> None:
    corpus, marker = seeds
    blob = data.draw(pickle_bytes(corpus))
    path = workdir / "fuzz.bin"
    path.write_bytes(blob)
    assert check(path, workdir / "out.safetensors", marker) is None


@pytest.mark.slow
def test_fuzz_large_budget(tmp_path: Path) -> None:
    """Five minutes of fuzzing over all readers: zero crashes."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fuzz_readers.py"),
                           "--seconds", "300", "--save", str(tmp_path)], env=cli_env(),
                          capture_output=True, text=True, timeout=1800)
    report = json.loads(proc.stdout)
    assert sum(r["inputs"] for r in report.values()) > 1000
    assert proc.returncode == 0, {k: r["crash_kinds"] for k, r in report.items()}
