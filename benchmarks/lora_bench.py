"""LoRA Model Stock in factor space vs materialise-then-merge: wall time and peak RSS.

Builds synthetic PEFT adapters shaped like a 7B Llama's (32 layers; q, k, v, o: 4096 x 4096;
gate, up: 11008 x 4096; down: 4096 x 11008; r = 16; float32 factors, as PEFT saves them),
near shared factors so that the adapters agree (t well inside (0, 1)); then, for N = 2 and 4,
each in its own process:

- ``factor``: `modelstock.lora.merge_lora_adapters` (read, exact Gram and t from the factors,
  the merged rank-16N adapter written atomically to disk); ``factor-r16`` the same with
  ``rank=16`` (QR + SVD of the small core per module);
- ``dense``: the same adapters read the same way, then per module every delta materialised
  (``s B A``, float32, ``out x in``) and merged by the project's dense engine
  (`modelstock.merge_state_dicts`, C loops and worker threads, anchor a zero base weight: the
  dense Model Stock of the deltas); the dense result is dropped, not written (writing it would
  add a 13.5 GB float16 / 27 GB float32 output per merge: not counted here).

The dense path can run on ``--dense-layers`` of the 32 layers and be scaled to 32 (its work is
the same for every layer; its peak memory is per module, so it is not scaled). Prints each
process's own time (after imports), its peak RSS (``ru_maxrss``) and the ratios.

    python benchmarks/lora_bench.py                       # N = 2 and 4, dense on 4 layers x 8
    python benchmarks/lora_bench.py --dense-layers 32     # dense on every layer, not scaled

Measured on the project's 2-core VM (torch 2.13 CPU, shared with other jobs, so times vary by
up to 2x between rounds; medians of 3), dense on 4 layers scaled x8:

    N=2  factor exact 0.98 s, 1040 MB | rank 16 2.02 s, 853 MB | dense 74.5 s, 1410 MB
    N=4  factor exact 3.32 s, 1610 MB | rank 16 4.29 s, 1182 MB | dense 145.3 s, 2061 MB

The factor path's peak RSS is the interpreter with torch (~0.28 GB), the adapters' pages and
the merged adapter held in memory (as large as the inputs when exact); the dense path holds
one module's N materialised deltas, its anchor and output at a time, beside the adapters.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from modelstock import merge_state_dicts  # noqa: E402
from modelstock.lora import merge_lora_adapters, read_lora_adapter  # noqa: E402
from modelstock.safetensors_io import SafetensorsWriter  # noqa: E402

HIDDEN, INTER, RANK = 4096, 11008, 16
MODULES = [(f"self_attn.{n}_proj", HIDDEN, HIDDEN) for n in "qkvo"] + [
    ("mlp.gate_proj", INTER, HIDDEN), ("mlp.up_proj", INTER, HIDDEN),
    ("mlp.down_proj", HIDDEN, INTER)]  # (name, out, in)


def build_adapters(root: Path, layers: int, n: int, rank: int = RANK) -> list[Path]:
    """N PEFT adapter directories (cached): A_i = A0 + noise, B_i = B0 + noise."""
    paths = [root / f"L{layers}-r{rank}" / f"adapter{i}" for i in range(n)]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    g = torch.Generator().manual_seed(0)
    shared = {}
    for i, path in enumerate(paths):
        if (path / "adapter_model.safetensors").is_file():
            continue
        path.mkdir(parents=True, exist_ok=True)
        entries = []
        for layer in range(layers):
            for name, out, inp in MODULES:
                key = f"base_model.model.model.layers.{layer}.{name}"
                entries += [(f"{key}.lora_A.weight", (rank, inp)),
                            (f"{key}.lora_B.weight", (out, rank))]
        writer = SafetensorsWriter(path / "adapter_model.safetensors",
                                   [(k, torch.float32, s) for k, s in entries], {"format": "pt"})
        gi = torch.Generator().manual_seed(1000 + i)
        for k, shape in entries:
            if k not in shared or shared[k].shape != shape:
                shared[k] = torch.randn(shape, generator=g) * (0.02 if "lora_A" in k else 0.01)
            value = shared[k] + 0.6 * torch.randn(shape, generator=gi) * shared[k].std()
            writer.write(k, value.reshape(-1))
        writer.close()
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 32,
                  "lora_dropout": 0.05, "bias": "none", "use_rslora": False,
                  "base_model_name_or_path": "synthetic-llama-7b",
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                     "up_proj", "down_proj"]}
        (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return paths


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_factor(paths: list[str], out: str, rank: int | None) -> dict:
    start = time.perf_counter()
    report = merge_lora_adapters(paths, out, force=True, rank=rank)
    seconds = time.perf_counter() - start
    ts = [x.t for x in report.layers]
    return {"seconds": seconds, "layers_done": 32, "t_mean": sum(ts) / len(ts),
            "output_bytes": report.output_bytes}


def run_dense(paths: list[str], layers: int) -> dict:
    """Materialise every delta of the first ``layers`` layers, then the project's dense Model
    Stock engine on them (anchor: a zero base weight, so ``w_i = dW_i``)."""
    start = time.perf_counter()
    ads = [read_lora_adapter(p) for p in paths]
    names = [k for k in ads[0].modules if int(k.split(".")[2]) < layers]
    ts = []
    for name in names:
        mods = [a.modules[name] for a in ads]
        anchor = {"w": torch.zeros(mods[0].shape)}
        deltas = [{"w": (m.B @ m.A).mul_(m.scaling)} for m in mods]  # float32, out x in
        merged, report = merge_state_dicts(anchor, deltas)  # dense Model Stock
        ts.append(report.layers[0].t)
        del anchor, deltas, merged
    return {"seconds": time.perf_counter() - start, "layers_done": layers,
            "t_mean": sum(ts) / len(ts)}


def child(argv: list[str]) -> None:
    kind, out, layers, rank, *paths = argv
    if kind == "dense":
        result = run_dense(paths, int(layers))
    else:
        result = run_factor(paths, out, int(rank) if rank != "none" else None)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def median_run(runs: list[dict]) -> dict:
    """The run of median time, with the median peak RSS."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    result = dict(ordered[len(ordered) // 2])
    result["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    result["all_seconds"] = [round(r["seconds"], 2) for r in runs]
    return result


def spawn(kind: str, paths: list[Path], out: Path, layers: int, rank: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(out), str(layers),
           "none" if rank is None else str(rank), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dense-layers", type=int, default=4,
                    help="layers the dense path runs; its time is scaled to --layers")
    ap.add_argument("--rank", type=int, default=RANK, help="of the rank-R compressed output")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lora_bench")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; medians are printed")
    ap.add_argument("--keep", action="store_true", help="keep the adapters for the next run")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; adapters: "
          f"{args.layers} layers x 7 modules, r={RANK}, float32; dense on "
          f"{args.dense_layers} layer(s), time x {args.layers / args.dense_layers:g}")
    try:
        paths = build_adapters(args.workdir, args.layers, max(args.models))
        size = sum(p.stat().st_size for p in paths[0].iterdir()) / 1e6
        print(f"one adapter: {size:.0f} MB")
        for n in args.models:
            use = paths[:n]
            out = args.workdir / f"merged-N{n}"
            runs: dict[str, list[dict]] = {"factor": [], "factor_r": [], "dense": []}
            for _ in range(args.repeats):  # alternating, so that load from elsewhere is shared
                runs["factor"].append(spawn("factor", use, out, args.layers, None))
                runs["factor_r"].append(spawn("factor", use, out, args.layers, args.rank))
                runs["dense"].append(spawn("dense", use, out, args.dense_layers, None))
            fac, fac_r, den = (median_run(runs[k]) for k in ("factor", "factor_r", "dense"))
            den_scaled = den["seconds"] * args.layers / args.dense_layers
            print(f"\nN={n} (medians of {args.repeats}; times: factor {fac['all_seconds']}, "
                  f"rank-{args.rank} {fac_r['all_seconds']}, dense {den['all_seconds']})")
            print(f"  factor exact     {fac['seconds']:8.2f} s   peak RSS "
                  f"{fac['peak_rss_mb']:7.0f} MB   output {fac['output_bytes'] / 1e6:.0f} MB"
                  f"   mean t {fac['t_mean']:.4f}")
            print(f"  factor rank {args.rank:<3d}  {fac_r['seconds']:8.2f} s   peak RSS "
                  f"{fac_r['peak_rss_mb']:7.0f} MB   output {fac_r['output_bytes'] / 1e6:.0f} MB")
            print(f"  dense            {den_scaled:8.2f} s   peak RSS {den['peak_rss_mb']:7.0f} MB"
                  f"   ({den['seconds']:.2f} s measured on {den['layers_done']} layer(s); "
                  f"mean t {den['t_mean']:.4f})")
            print(f"  ratios dense/factor: time {den_scaled / fac['seconds']:.1f}x, "
                  f"peak RSS {den['peak_rss_mb'] / fac['peak_rss_mb']:.2f}x; "
                  f"dense/factor-r{args.rank}: time {den_scaled / fac_r['seconds']:.1f}x")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
