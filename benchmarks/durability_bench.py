"""What making the output durable costs: a merge with its fsyncs, against the same merge with
``os.fsync`` patched to a no-op, alternating in one process.

Every file of the output is fsynced once, then the temporary directory, then (after the rename)
the directory the output went into (see ``modelstock/output.py``). This merges a synthetic
Llama-shaped model (``merge_bench.build_models``; ``--layers 1`` is 0.18 B parameters, 366 MB
per bf16 checkpoint) in rounds; each round runs both variants, in alternating order, for each
write mode (``O_DIRECT``, the default, and ``--buffered-writes``' page cache). Before each timed
merge the previous output is removed and ``os.sync()`` flushes what is dirty, so that no merge
pays for another's writeback. Prints each merge's time, the ratio with/without fsync per round
and its median. No time is asserted.

    python benchmarks/durability_bench.py --layers 1 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import build_models, llama_shapes  # noqa: E402 (also puts src/ on the path)

from modelstock import merge_checkpoints  # noqa: E402

REAL_FSYNC = os.fsync


@contextlib.contextmanager
def fsync_patched(enabled: bool, counter: list[float]):
    """``os.fsync`` counting its calls (``counter[0]``) and their seconds (``counter[1]``),
    and doing nothing unless ``enabled``."""
    def fsync(fd):
        counter[0] += 1
        if enabled:
            start = time.perf_counter()
            REAL_FSYNC(fd)
            counter[1] += time.perf_counter() - start

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = REAL_FSYNC


def timed_merge(dirs: list[Path], out: Path, direct: bool, sync: bool
                ) -> tuple[float, int, float]:
    """Seconds of one merge into ``out``, its fsync calls, and the seconds spent in them."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # start clean: no dirty pages of an earlier round to write back
    calls = [0, 0.0]
    with fsync_patched(sync, calls):
        start = time.perf_counter()
        merge_checkpoints(dirs[0], dirs[1:], out, direct_io=direct)
        seconds = time.perf_counter() - start
    return seconds, int(calls[0]), calls[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=1, help="1 layer = 0.18 B parameters")
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/modelstock-bench"),
                    help="on the file system to measure (a tmpfs makes fsync free)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dirs = build_models(args.workdir, args.layers, args.models, dtype)
    n_params = sum(torch.Size(s).numel() for _, s in llama_shapes(args.layers))
    out = args.workdir / "out-durability" / "merged"
    out.parent.mkdir(parents=True, exist_ok=True)
    size = sum(f.stat().st_size for f in dirs[0].iterdir())
    print(f"{n_params / 1e9:.2f} B params, {args.dtype}, N={args.models}, "
          f"{size / 1e6:.0f} MB per checkpoint, {args.repeats} rounds, in {args.workdir}")

    timed_merge(dirs, out, direct=True, sync=True)  # warm the page cache and the code paths
    ratios: dict[str, list[float]] = {"direct": [], "buffered": []}
    shares: dict[str, list[float]] = {"direct": [], "buffered": []}
    for r in range(args.repeats):
        for mode in ratios:
            direct = mode == "direct"
            order = (True, False) if (r % 2 == 0) else (False, True)
            runs = {sync: timed_merge(dirs, out, direct, sync) for sync in order}
            (on, calls, in_fsync), (off, _, _) = runs[True], runs[False]
            ratios[mode].append(on / off)
            shares[mode].append(in_fsync / on)
            print(f"round {r} {mode:8s} fsync on {on:6.2f} s ({calls} fsyncs, {in_fsync:.3f} s "
                  f"in them), off {off:6.2f} s, ratio {on / off:.3f}", flush=True)
    shutil.rmtree(out.parent, ignore_errors=True)
    print("\nmerge with fsync / merge with fsync a no-op (wall), and the share of the first "
          "spent inside fsync:")
    for mode, rs in ratios.items():
        print(f"  {mode:8s} ratio per round {' '.join(f'{x:.2f}' for x in rs)}, median "
              f"{statistics.median(rs):.3f}x; in fsync: median "
              f"{statistics.median(shares[mode]):.1%}")


if __name__ == "__main__":
    main()
