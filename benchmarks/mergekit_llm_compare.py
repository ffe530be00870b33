"""Our merge against mergekit 0.1.5's on the same YAML, for tiny Llama and Qwen2 chat fine-tunes.

    .venv/bin/python benchmarks/mergekit_llm_compare.py [--mergekit-venv /work/mergekit-venv]
        [--workdir DIR] [--keep]

Builds the models of tests/llm_models.py (Llamas untied, rows unpadded; Qwen2s tied, rows padded
to 64; fine-tunes that add ChatML and tool tokens at different ids, with chat templates; two
LoRA adapters) into an offline Hugging Face cache, runs ``mergekit-yaml CONFIG OUT`` (in one
process of mergekit's own virtualenv, tokenizer copied as mergekit does by default) and
``modelstock merge --config CONFIG -o OUT`` on each config below, and prints:

- per tensor: the largest |ours - mergekit|, and which t each side used (t of a tensor read
  back from the output on the anchor's token rows: <out - w0, mean d> / |mean d|^2), with the
  float64 closed form's t clamped (ours) and unclamped (mergekit);
  (with ``filter_wise`` these t are one number per tensor, not the per-row t that merged it);
- the output vocabulary sizes (config.json vocab_size, embedding rows, tokenizer length) and
  every token whose id differs, or that one side has and the other lacks; the chat templates.

Both sides read the same YAML; we read the Hub ids from the offline cache, mergekit the same
files by local path (mergekit 0.1.5 cannot resolve a Hub id offline: it lists the repository on
the Hub first). Where mergekit cannot run a config, its error is printed and the comparison
skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

import torch  # noqa: E402
from tests.llm_models import (  # noqa: E402
    ORG,
    build_zoo,
    offline_hub,
    read_weights,
    stock_t,
    vocab_of,
)

FIXTURES = ROOT / "tests" / "fixtures" / "mergekit"
# The configs compared: fixtures as they are (float32 where the fixture computes in float32),
# and the same fixtures with dtype float32 where the fixture says bfloat16 (mergekit would
# compute in bfloat16 there, which is its own known difference; see benchmarks/README.md).
CONFIGS = {
    "plain-llama-3": "01_llama_three_hub_ids.yaml",
    "chatml-union-llama": "03_llama_chatml_union.yaml",
    "pad32-union-llama": "04_llama_tokenizer_section_pad32.yaml",
    "base-vocab-llama": "05_llama_tokenizer_base.yaml",
    "ft2-vocab-llama": "06_llama_tokenizer_from_model.yaml",
    "lora-llama": "09_llama_lora_hub.yaml",
    "union-qwen-tied-pad64": "11_qwen_union_chatml.yaml",
    "filter-wise-qwen": "13_qwen_filter_wise_base_tokenizer.yaml",
    "no-tokenizer-key-llama": "15_llama_default_union.yaml",
}
MERGEKIT_RUNNER = r"""
import json, sys, time, traceback
from mergekit.scripts.run_yaml import main as mergekit_yaml
args = sys.argv[1:]
for config, out in zip(args[::2], args[1::2]):
    start = time.perf_counter()
    try:
        mergekit_yaml.main([config, out, "--no-write-model-card", "--lora-merge-cache",
                            out + "-lora-cache"], standalone_mode=False)
        err = None
    except BaseException as e:  # report and go on
        err = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
    print(json.dumps({"config": config, "out": out, "error": err,
                      "seconds": round(time.perf_counter() - start, 2)}), flush=True)
"""
EMBED = ("model.embed_tokens.weight", "lm_head.weight")


def as_float32(src: Path, dst: Path) -> Path:
    """The fixture with dtype float32 (out_dtype kept): both sides compute in float32."""
    import yaml

    doc = yaml.safe_load(src.read_text())
    doc["dtype"] = "float32"
    doc.pop("out_dtype", None)
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def local_yaml(zoo, config: Path, dst: Path) -> Path:
    """The config with each Hub id replaced by the model's local directory: mergekit 0.1.5
    cannot read a Hub id offline (``ModelReference.local_path`` lists the repository's files
    on the Hub before ``snapshot_download``, which raises OfflineModeIsEnabled)."""
    def local(m: re.Match) -> str:
        name = m.group(1)
        return str(zoo.loras[name][0] if name in zoo.loras else zoo.local(name))

    dst.write_text(re.sub(rf"{ORG}/([\w.-]+?)(?:@main)?(?![\w.-])", local, config.read_text()))
    return dst


def run_mergekit(venv: Path, pairs: list[tuple[Path, Path]], env: dict) -> dict[Path, dict]:
    args = [str(x) for pair in pairs for x in pair]
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", MERGEKIT_RUNNER, *args],
                          env=env, capture_output=True, text=True, timeout=1800)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[Path(r["out"])] = r
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
    return results


def run_ours(config: Path, out: Path) -> tuple[str | None, float, str]:
    from click.testing import CliRunner

    from modelstock.cli import main

    start = time.perf_counter()
    res = CliRunner().invoke(main, ["merge", "--config", str(config), "-o", str(out)])
    seconds = time.perf_counter() - start
    err = None if res.exit_code == 0 else (res.output.strip().splitlines() or ["?"])[-1]
    return err, seconds, res.output


def t_of(out: torch.Tensor, w0: torch.Tensor, ws: list[torch.Tensor]) -> float:
    """The t an output used, read back on the rows it shares with the anchor."""
    mean = sum(w - w0 for w in ws) / len(ws)
    denom = float((mean * mean).sum())
    return float(((out - w0) * mean).sum()) / denom if denom else float("nan")


def inputs(zoo, config: Path):
    import yaml

    doc = yaml.safe_load(config.read_text())
    base = doc["base_model"]
    written = [e["model"] if isinstance(e["model"], str) else e["model"]["model"]["path"]
               for e in doc["models"]]
    return zoo.source(base), [zoo.source(m) for m in written if m != base]


def compare(name: str, zoo, config: Path, ours: Path, theirs: Path) -> list[str]:
    lines = [f"### {name} ({config.name})"]
    a_dir, ft_dirs = inputs(zoo, config)
    a = read_weights(a_dir)
    fts = [read_weights(d) for d in ft_dirs]
    av = vocab_of(a_dir)
    n_a = len(av)
    o, m = read_weights(ours), read_weights(theirs)
    only = sorted(set(o) ^ set(m))
    if only:
        lines.append(f"tensors on one side only: {only}")
    rows = []
    for k in sorted(set(o) & set(m)):
        x, y = o[k].double(), m[k].double()
        note = ""
        if x.shape != y.shape:
            rows.append(f"  {k:48s} shape ours {tuple(x.shape)} mergekit {tuple(y.shape)}")
            n = min(x.shape[0], y.shape[0])
            x, y = x[:n], y[:n]
            note = f" (first {n} rows)"
        diff = (x - y).abs().max().item()
        w0 = a.get(k, a["model.embed_tokens.weight"]).double()
        ws = [f.get(k, f["model.embed_tokens.weight"]).double() for f in fts]
        if k in EMBED:  # the anchor's token rows, where every input has the anchor's layout
            vs = [vocab_of(d) for d in ft_dirs]
            ids = sorted(av.values())
            w0 = w0[ids]
            ws = [torch.stack([w[v[t]] if t in v else w0[i] for i, t in enumerate(
                sorted(av, key=av.get))]) for w, v in zip(ws, vs, strict=True)]
            xo, yo = o[k].double()[:n_a], m[k].double()[:n_a]
            diff_anchor = (xo - yo).abs().max().item()
            note += f"; anchor-token rows {diff_anchor:.3g}"
        else:
            xo, yo = o[k].double(), m[k].double()
        deltas = [w - w0 for w in ws]
        t_clamped = stock_t(deltas).item()
        t_raw = stock_t(deltas, clamp=False).item()
        t_o, t_m = t_of(xo, w0, ws), t_of(yo, w0, ws)
        flag = " CLAMPED" if t_raw < 0 else ""
        rows.append(f"  {k:48s} max|diff| {diff:9.3g}  t ours {t_o:+.4f} mergekit {t_m:+.4f}  "
                    f"closed form {t_clamped:+.4f} (unclamped {t_raw:+.4f}){flag}{note}")
    lines += rows
    # vocabulary and tokenizer
    co = json.loads((ours / "config.json").read_text())
    cm = json.loads((theirs / "config.json").read_text())
    eo = o["model.embed_tokens.weight"].shape[0]
    em = m["model.embed_tokens.weight"].shape[0]
    vo = vocab_of(ours) if (ours / "tokenizer.json").exists() else {}
    vm = vocab_of(theirs) if (theirs / "tokenizer.json").exists() else {}
    lines.append(f"vocab_size ours {co.get('vocab_size')} mergekit {cm.get('vocab_size')}; "
                 f"embedding rows ours {eo} mergekit {em}; tokenizer ours {len(vo)} mergekit "
                 f"{len(vm)}")
    moved = {t: (vo.get(t), vm.get(t)) for t in set(vo) | set(vm) if vo.get(t) != vm.get(t)}
    if moved:
        lines.append(f"tokens whose id differs (ours, mergekit): {dict(sorted(moved.items()))}")
    if vo and vo == vm:
        lines.append("tokenizer vocabularies: identical")
    elif vo and set(vo) == set(vm):  # the same tokens at other ids: compare rows by token
        for k in EMBED:
            if k in o and k in m:
                toks = sorted(vo, key=vo.get)
                x = o[k].double()[[vo[t] for t in toks]]
                y = m[k].double()[[vm[t] for t in toks]]
                added = [i for i, t in enumerate(toks) if t not in av]
                lines.append(f"{k}: rows compared by token: max|diff| "
                             f"{(x - y).abs().max().item():.3g}; the added tokens' rows "
                             f"{(x[added] - y[added]).abs().max().item():.3g}")
    if eo > len(vo) and em > len(vm) and eo == em:
        pad = slice(len(vo), eo)
        d = (o["model.embed_tokens.weight"][pad].double()
             - m["model.embed_tokens.weight"][pad].double()).abs().max().item()
        lines.append(f"padding rows {len(vo)}..{eo - 1}: max|ours - mergekit| {d:.3g}")
    for side, d in (("ours", ours), ("mergekit", theirs)):
        for f in ("tokenizer_config.json", "chat_template.jinja"):
            if (d / f).exists() and f.endswith(".jinja"):
                lines.append(f"chat template {side}: {(d / f).read_text().strip()[:70]!r}...")
        tc = d / "tokenizer_config.json"
        if tc.exists() and json.loads(tc.read_text()).get("chat_template"):
            tpl = json.loads(tc.read_text())["chat_template"]
            lines.append(f"chat template {side} (tokenizer_config): {tpl.strip()[:70]!r}...")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mergekit-venv", type=Path,
                   default=Path(os.environ.get("MERGEKIT_VENV", "/work/mergekit-venv")))
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if not (args.mergekit_venv / "bin" / "mergekit-yaml").is_file():
        print(f"mergekit is not installed in {args.mergekit_venv} "
              "(benchmarks/make_mergekit_venv.sh)", file=sys.stderr)
        return 2
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mk-llm-"))
    zoo = build_zoo(work / "zoo")
    configs = {}
    (work / "configs").mkdir()
    for name, fixture in CONFIGS.items():
        configs[name] = as_float32(FIXTURES / fixture, work / "configs" / fixture)
    with offline_hub(zoo.hf_home), contextlib.chdir(zoo.root):
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONHASHSEED="0")
        (work / "mergekit-configs").mkdir()
        pairs = [(local_yaml(zoo, c, work / "mergekit-configs" / c.name), work / "mergekit" / n)
                 for n, c in configs.items()]
        start = time.perf_counter()
        mk = run_mergekit(args.mergekit_venv, pairs, env)
        print(f"mergekit: {len(pairs)} merges in {time.perf_counter() - start:.1f} s "
              f"(one process)")
        for name, config in configs.items():
            out_o, out_m = work / "ours" / name, work / "mergekit" / name
            err_o, sec_o, output = run_ours(config, out_o)
            r = mk.get(out_m, {"error": "mergekit did not report (crashed?)", "seconds": 0})
            print()
            warnings = [x.strip() for x in output.splitlines() if x.startswith("warning")]
            print(f"## {name}: ours {'error: ' + err_o if err_o else f'{sec_o:.2f} s'}, "
                  f"mergekit {'error: ' + r['error'] if r['error'] else str(r['seconds']) + ' s'}")
            for w in warnings:
                print(f"  ours {w}")
            if err_o or r["error"]:
                continue
            print("\n".join(compare(name, zoo, config, out_o, out_m)))
        # mergekit's union order: referenced_models() is a set of model references, so the ids
        # of added tokens follow str hashing; the same config under two hash seeds
        print("\n## mergekit's union ids under PYTHONHASHSEED 1 and 2 (chatml-union-llama)")
        config = work / "mergekit-configs" / CONFIGS["chatml-union-llama"]
        for seed in ("1", "2"):
            out = work / f"mergekit-seed{seed}"
            r = run_mergekit(args.mergekit_venv, [(config, out)],
                             dict(env, PYTHONHASHSEED=seed)).get(out, {"error": "no report"})
            if r["error"]:
                print(f"  seed {seed}: error {r['error']}")
                continue
            v = vocab_of(out)
            print(f"  seed {seed}: " + ", ".join(f"{t} {i}" for t, i in
                                                sorted(v.items(), key=lambda x: x[1]) if i >= 250))
    if args.keep or args.workdir:
        print(f"\nkept {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
