"""Fuzz the checkpoint readers for a time budget and report counts (issue 8, item 4).

    python benchmarks/fuzz_readers.py --seconds 600 [--save DIR]

Runs the hypothesis strategies of tests/fuzz_readers.py (safetensors files, random bytes,
index JSON with shards beside it, pickles) in rounds until the budget is spent, sharing the time
equally, and prints per reader: inputs tried, inputs that opened and merged, clean
ModelStockErrors (with the most common kinds) and crashes (anything else: another exception, a
hang, a read outside the file, a pickle that ran code). Crashing inputs are saved under --save.
Exit status 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent)]

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tests.fuzz_readers import (  # noqa: E402
    classify,
    index_bytes,
    make_index_dir,
    pickle_bytes,
    pickle_seeds,
    safetensors_bytes,
)

ROUND = settings(max_examples=300, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


def kind_of(message: str, path: Path) -> str:
    """The kind of a clean error: its text without the file, tensor names and numbers."""
    text = message.replace(str(path), "<file>")
    text = re.sub(r"tensor '.*?': ", "", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|\(.*\)|\d+", "_", text)
    return text.replace("<file>: ", "")[:90]


def fuzz(strategy, path: Path, seconds: float, work: Path, marker: Path,
         save: Path | None) -> dict:
    """Run rounds of ``strategy`` into ``path`` for ``seconds``; count what happened."""
    counts, kinds, crashes = collections.Counter(), collections.Counter(), collections.Counter()

    @ROUND
    @given(blob=strategy)
    def one(blob: bytes) -> None:
        path.write_bytes(blob)
        status, detail = classify(path, work / "out.safetensors", marker)
        counts[status] += 1
        if status == "error":
            kinds[kind_of(detail, path)] += 1
        elif status == "crash":
            crashes[detail] += 1
            if save:
                save.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256(blob).hexdigest()[:16]
                (save / f"{path.name}.{digest}").write_bytes(blob)

    start = time.monotonic()
    rounds = 0
    while time.monotonic() - start < seconds:
        one()
        rounds += 1
    result = {
        "seconds": round(time.monotonic() - start, 1), "rounds": rounds,
        "inputs": sum(counts.values()), "opened_and_merged": counts["ok"],
        "clean_errors": counts["error"], "crashes": counts["crash"],
        "crash_kinds": dict(crashes.most_common(10)),
        "top_error_kinds": dict(kinds.most_common(12)),
    }
    print(f"{path.name}: {result['inputs']} inputs, {counts['ok']} ok, {counts['error']} clean "
          f"errors, {counts['crash']} crashes", file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--save", type=Path, default=None, help="where to keep crashing inputs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelstock-fuzz-"))
    index_dir = make_index_dir(work / "index")
    marker = work / "PWNED"
    corpus = pickle_seeds(marker)
    readers = {
        "safetensors (structured)": (safetensors_bytes(), work / "fuzz.safetensors"),
        "safetensors (random bytes)": (st.binary(max_size=300), work / "random.safetensors"),
        "index JSON": (index_bytes(), index_dir / "model.safetensors.index.json"),
        "pickle (.bin)": (pickle_bytes(corpus), work / "fuzz.bin"),
    }
    share = args.seconds / len(readers)
    report = {name: fuzz(strategy, path, share, work, marker, args.save)
              for name, (strategy, path) in readers.items()}
    print(json.dumps(report, indent=1))
    return 1 if any(r["crashes"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
