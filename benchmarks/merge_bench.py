"""Merge time and peak memory: modelstock vs mergekit vs the I/O floor, side by side.

Builds synthetic Llama-shaped checkpoints (cached under --workdir), then runs, alternating, for
--repeats rounds: our merge, mergekit's ``model_stock`` (when --mergekit-venv is given), and the
I/O floor (read every input byte once + write an output of the same size), once writing through
the page cache and once with O_DIRECT; with --torch-path also our merge without its C loops.
Each runs in its own process; wall time and that process's peak RSS are recorded. Prints
medians, the ratios ours/floor (both) and ours/mergekit, and the distance of each output from
a float64 reference merge.

    python benchmarks/merge_bench.py --layers 22 --models 2 --dtype bfloat16 \
        --mergekit-venv /work/mergekit-venv --repeats 3

``--baseline-src DIR`` adds another checkout's merge to the same rounds (engine before/after).

mergekit in its own virtualenv (it pins its own dependencies):
    python3 -m venv /work/mergekit-venv
    /work/mergekit-venv/bin/pip install torch==2.13.0   # the CPU build, from local disk
    /work/mergekit-venv/bin/pip install mergekit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from modelstock.safetensors_io import SafetensorsReader, SafetensorsWriter  # noqa: E402

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def llama_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a TinyLlama-like model (full multi-head attention)."""
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
                   (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
                   (p + "input_layernorm.weight", (HIDDEN,)),
                   (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def build_models(root: Path, layers: int, n_models: int, dtype: torch.dtype) -> list[Path]:
    """Anchor + n fine-tunes (anchor + a shared direction + independent noise), cached."""
    shapes = llama_shapes(layers)
    dirs = [root / f"L{layers}-{str(dtype)[6:]}" / name
            for name in ["anchor"] + [f"ft{i}" for i in range(n_models)]]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": VOCAB,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": str(dtype)[6:]}
    for i, d in enumerate(dirs):
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config))
        w = SafetensorsWriter(d / "model.safetensors.part", [(n, dtype, s) for n, s in shapes])
        for j, (name, shape) in enumerate(shapes):
            g = torch.Generator().manual_seed(j)
            base = torch.randn(shape, generator=g) * 0.02
            if i > 0:
                base += torch.randn(shape, generator=g) * 2e-3  # shared direction (same seed)
                base += torch.randn(shape, generator=torch.Generator().manual_seed(
                    1000 * i + j)) * 2e-3
            w.write(name, base.to(dtype).reshape(-1))
        w.close()
        os.rename(d / "model.safetensors.part", d / "model.safetensors")
    return dirs


# Peak RSS is read by the measured process itself (VmHWM of its own address space at exit):
# ru_maxrss from wait4 would include the parent's high-water mark inherited through fork.
MEASURE = r"""
import atexit, os, runpy, sys
def _hwm():
    with open("/proc/self/status") as f:
        kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM"))
    with open(os.environ["BENCH_RSS_FILE"], "w") as f:
        f.write(str(kib))
atexit.register(_hwm)
kind, target, *sys.argv[1:] = sys.argv[1:]
sys.argv[0] = target
if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
elif kind == "path":
    runpy.run_path(target, run_name="__main__")
else:
    exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
"""


def run_measured(python: str, kind: str, target: str, args: list[str],
                 env: dict | None = None) -> tuple[float, float]:
    """Run ``python`` on a module, script path or code string with ``args``; return (wall
    seconds, peak RSS in MiB of that process)."""
    rss_file = Path(f"/tmp/modelstock-bench-rss-{os.getpid()}")
    env = dict(env or os.environ, BENCH_RSS_FILE=str(rss_file))
    start = time.perf_counter()
    proc = subprocess.run([python, "-c", MEASURE, kind, target, *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{target} failed ({proc.returncode}):\n"
                           f"{proc.stderr.decode()[-2000:]}")
    rss = int(rss_file.read_text()) / 1024
    rss_file.unlink()
    return wall, rss


# The I/O floor: read every input once, write one output of the first input's size. With
# "direct" as the first argument the output bypasses the page cache (O_DIRECT, as our writer
# does where it can: see modelstock.direct_io); otherwise it goes through the page cache.
FLOOR = r"""
import mmap, os, sys
mode, out, inputs = sys.argv[1], sys.argv[2], sys.argv[3:]
buf = mmap.mmap(-1, 64 << 20)  # page-aligned, as O_DIRECT needs
view = memoryview(buf)
for path in inputs:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
size = os.path.getsize(inputs[0])
flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "direct" else 0)
fd = os.open(out, flags, 0o644)
left = -(-size // 4096) * 4096
while left:
    left -= os.write(fd, view[: min(left, len(buf))])
os.ftruncate(fd, size)
os.close(fd)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="22 layers = 1.26 B parameters")
    ap.add_argument("--models", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/modelstock-bench"))
    ap.add_argument("--mergekit-venv", type=Path, default=None)
    ap.add_argument("--modelstock-args", default="", help="extra args for modelstock merge")
    ap.add_argument("--torch-path", action="store_true",
                    help="also run our merge without the C loops (MODELSTOCK_KERNELS=0)")
    ap.add_argument("--scaling", default=None, metavar="N1,N2,...",
                    help="also run our merge with the first N1, N2, ... fine-tunes (of --models) "
                         "in the same rounds, and print time and peak RSS against the smallest")
    ap.add_argument("--baseline-src", type=Path, default=None, metavar="DIR",
                    help="also run the merge of another checkout's src/ (e.g. an older commit "
                         "in a git worktree, its C loops built in place): same rounds")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dirs = build_models(args.workdir, args.layers, args.models, dtype)
    n_params = sum(torch.Size(s).numel() for _, s in llama_shapes(args.layers))
    out_root = args.workdir / "out"
    shutil.rmtree(out_root, ignore_errors=True)
    out_root.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    files = [str(d / "model.safetensors") for d in dirs]

    py = sys.executable
    def our_merge(out: Path, n: int = args.models) -> tuple:
        return (py, "module", "modelstock", ["merge", *map(str, dirs[: n + 1]), "-o", str(out),
                                             "-q", *args.modelstock_args.split()])

    runners = {
        "modelstock": our_merge,
        "floor": lambda out: (py, "code", FLOOR, ["buffered", str(out), *files]),
        "floor-direct": lambda out: (py, "code", FLOOR, ["direct", str(out), *files]),
    }
    if args.torch_path:
        runners["torch-path"] = lambda out: (*our_merge(out), {"MODELSTOCK_KERNELS": "0"})
    sizes = sorted(int(x) for x in args.scaling.split(",")) if args.scaling else []
    for n in sizes:
        if not 1 <= n <= args.models:
            raise SystemExit(f"--scaling: {n} is not between 1 and --models {args.models}")
        runners[f"N={n}"] = lambda out, n=n: our_merge(out, n)
    if args.baseline_src is not None:
        runners["baseline"] = lambda out: (*our_merge(out),
                                           {"PYTHONPATH": str(args.baseline_src.resolve())})
    mk_bin = args.mergekit_venv / "bin" / "mergekit-yaml" if args.mergekit_venv else None
    if mk_bin is not None and mk_bin.exists():
        cfg = out_root / "mergekit.yml"
        cfg.write_text(json.dumps({
            "merge_method": "model_stock", "base_model": str(dirs[0]),
            "models": [{"model": str(d)} for d in dirs[1:]],
            "dtype": "float32", "out_dtype": args.dtype}))
        mk_py = str(args.mergekit_venv / "bin" / "python")
        runners["mergekit"] = lambda out: (mk_py, "path", str(mk_bin), [
            str(cfg), str(out), "--lazy-unpickle", "--allow-crimes", "--quiet"])
    else:
        print("mergekit: not installed (pass --mergekit-venv); skipped")

    for f in files:  # warm the page cache once, as every runner will find it
        run_measured(py, "code", FLOOR, ["buffered", str(out_root / "warm"), f])
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in runners}
    for r in range(args.repeats):
        for name, make in runners.items():
            out = out_root / f"{name}-{r}"
            py_, kind, target, argv, *extra = make(out)
            results[name].append(run_measured(py_, kind, target, argv,
                                              env=env | (extra[0] if extra else {})))
            if r < args.repeats - 1 or name.startswith(("floor", "torch", "baseline", "N=")):
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(
                    missing_ok=True)
            print(f"round {r} {name:10s} wall {results[name][-1][0]:7.2f} s  "
                  f"peak RSS {results[name][-1][1]:7.0f} MiB", flush=True)

    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v))
           for k, v in results.items()}
    print(f"\n{n_params / 1e9:.2f} B params, {args.dtype}, N={args.models}, "
          f"{args.repeats} rounds, median:")
    for k, (w, m) in med.items():
        print(f"  {k:10s} wall {w:7.2f} s   peak RSS {m:7.0f} MiB")
    ours = med["modelstock"]
    # Ratios per round too: the runners of one round ran seconds apart, at one machine speed.
    for k in [k for k in ("baseline", "torch-path", "floor", "floor-direct") if k in med]:
        per_round = [a[0] / b[0] for a, b in zip(results["modelstock"], results[k], strict=True)]
        print(f"  ours/{k:13s} wall {ours[0] / med[k][0]:.2f}x (ratio of medians); per round "
              f"{' '.join(f'{x:.2f}' for x in per_round)}, median "
              f"{statistics.median(per_round):.2f}x")
    for n in sizes[1:]:
        small, k = f"N={sizes[0]}", f"N={n}"
        per_round = [a[0] / b[0] for a, b in zip(results[k], results[small], strict=True)]
        print(f"  {k}/{small}  wall per round {' '.join(f'{x:.2f}' for x in per_round)}, median "
              f"{statistics.median(per_round):.2f}x for {n / sizes[0]:.1f}x the fine-tunes; "
              f"peak RSS {med[k][1]:.0f} / {med[small][1]:.0f} MiB")
    if "mergekit" in med:
        mk = med["mergekit"]
        print(f"  ours/mergekit  wall {ours[0] / mk[0]:.2f}x   peak RSS {ours[1] / mk[1]:.2f}x")
    last = args.repeats - 1
    check_match(dirs, out_root / f"modelstock-{last}",
                out_root / f"mergekit-{last}" if "mergekit" in med else None)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values lie between a and b (same float dtype), elementwise."""
    bits = {2: torch.int16, 4: torch.int32}[a.dtype.itemsize]
    top = -(2 ** (8 * a.dtype.itemsize - 1))

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(bits).to(torch.int64)
        return torch.where(i < 0, top - i, i)

    return (ordered(a) - ordered(b)).abs()


def reference_merge(w0: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
    """Model Stock of one tensor entirely in float64 (the clamp is moot: cos > 0 here)."""
    x0 = w0.double()
    ds = [w.double() - x0 for w in ws]
    n = len(ds)
    cos = [float(ds[i] @ ds[j] / (ds[i].norm() * ds[j].norm()))
           for i in range(n) for j in range(i + 1, n)]
    c = sum(cos) / len(cos)
    t = n * c / (1 + (n - 1) * c)
    return (x0 + t * sum(ds) / n).to(w0.dtype)


def check_match(dirs: list[Path], ours: Path, theirs: Path | None) -> None:
    """Distance, in ulps of the output dtype, of our output (and mergekit's) from a float64
    reference merge: 'agree to rounding' means at most 1 ulp."""
    from safetensors import safe_open

    readers = [SafetensorsReader(d / "model.safetensors") for d in dirs]
    ours_reader = SafetensorsReader(ours / "model.safetensors")
    outputs = {"modelstock": dict.fromkeys(readers[0].infos, ours_reader)}
    if theirs is not None:
        outputs["mergekit"] = {}
        for shard in sorted(theirs.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                outputs["mergekit"].update(dict.fromkeys(f.keys(), SafetensorsReader(shard)))
    stats = {k: [0, 0, 0] for k in outputs}  # elements off by 1 ulp, by more, worst
    total = 0
    for name in readers[0].infos:
        ref = reference_merge(readers[0].read(name), [r.read(name) for r in readers[1:]])
        total += ref.numel()
        for k, where in outputs.items():
            dist = ulp_distance(where[name].read(name), ref)
            stats[k][0] += int((dist == 1).sum())
            stats[k][1] += int((dist > 1).sum())
            stats[k][2] = max(stats[k][2], int(dist.max()))
        for r in readers:
            r.release(name)
    for k, (one, more, worst) in stats.items():
        print(f"  {k} vs float64 reference: {one / total:.4%} of elements off by 1 ulp, "
              f"{more / total:.4%} by more (worst {worst} ulp)")


if __name__ == "__main__":
    main()
