"""The baselines (uniform soup, WiSE-FT, linear, greedy soup) and the Model Stock ablations,
each against a closed form or an independent NumPy reference, through the API and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from modelstock import MergeOptions, ModelStockError, greedy_soup, merge_state_dicts
from modelstock.cli import main
from modelstock.soups import load_score
from tests.conftest import merged_by_cli

# -- NumPy references, written from the papers' formulas, sharing no code with the library ------


def np_stock(w0: np.ndarray, ws: list[np.ndarray], clamp: bool = True) -> np.ndarray:
    """Model Stock of one (flattened) tensor in float64; mean of pairwise cosines for N > 2."""
    w0 = w0.astype(np.float64).ravel()
    ds = [w.astype(np.float64).ravel() - w0 for w in ws]
    cos = [float(ds[i] @ ds[j] / (np.linalg.norm(ds[i]) * np.linalg.norm(ds[j])))
           for i in range(len(ds)) for j in range(i + 1, len(ds))]
    c, n = float(np.mean(cos)), len(ds)
    t = n * c / (1 + (n - 1) * c)
    t = min(max(t, 0.0), 1.0) if clamp else t
    return w0 + t * np.mean(ds, axis=0)


def np_greedy(individual: list[float], soup_score) -> list[int]:
    """Greedy soup (Wortsman et al. 2022, recipe 1): rank by own score, keep if not worse."""
    order = sorted(range(len(individual)), key=lambda i: -individual[i])
    kept, best = [order[0]], individual[order[0]]
    for i in order[1:]:
        s = soup_score([*kept, i])
        if s >= best:
            kept, best = [*kept, i], s
    return kept


# -- helpers ---------------------------------------------------------------------------------


def make_models(n: int, seed: int = 0, shape=(6, 5)) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    w0 = {"w": torch.randn(*shape, generator=g), "b": torch.randn(shape[0], generator=g)}
    common = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in w0.items()}
    ws = [{k: v + common[k] + 0.2 * torch.randn(v.shape, generator=g) for k, v in w0.items()}
          for _ in range(n)]
    return w0, ws


def save_all(tmp: Path, w0: dict, ws: list[dict]) -> list[str]:
    paths = []
    for i, sd in enumerate([w0, *ws]):
        p = tmp / f"m{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        paths.append(str(p))
    return paths


cli = merged_by_cli  # run `modelstock merge ... -q`, return the tensors


def cli_error(*args: str) -> str:
    result = CliRunner().invoke(main, ["merge", *args, "-q"])
    assert result.exit_code != 0
    return result.output


# -- uniform soup, WiSE-FT, linear -----------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4])
def test_uniform_soup_is_the_mean(tmp_path: Path, n: int) -> None:
    w0, ws = make_models(n)
    paths = save_all(tmp_path, w0, ws)
    out = cli(*paths, "-o", str(tmp_path / "u"), "--method", "uniform")
    for k in w0:
        expected = np.mean([w[k].double().numpy() for w in ws], axis=0)
        np.testing.assert_allclose(out[k].double().numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 1.5])
@pytest.mark.parametrize("n", [1, 3])
def test_wise_ft_interpolates(tmp_path: Path, alpha: float, n: int) -> None:
    w0, ws = make_models(n, seed=1)
    paths = save_all(tmp_path, w0, ws)
    out = cli(*paths, "-o", str(tmp_path / "w"), "--method", "wise-ft",
              "--alpha", str(alpha))
    for k in w0:
        a = w0[k].double().numpy()
        expected = a + alpha * (np.mean([w[k].double().numpy() for w in ws], axis=0) - a)
        np.testing.assert_allclose(out[k].double().numpy(), expected, rtol=0, atol=1e-6)
    if alpha == 0.0:
        assert all(torch.equal(out[k], w0[k]) for k in w0)


def test_wise_ft_needs_alpha_and_only_it_takes_alpha(tmp_path: Path) -> None:
    paths = save_all(tmp_path, *make_models(2))
    assert "alpha" in cli_error(*paths, "-o", str(tmp_path / "x"), "--method", "wise-ft")
    assert "alpha" in cli_error(*paths, "-o", str(tmp_path / "x"), "--alpha", "0.5")


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_is_a_weighted_mean_without_the_anchor(normalize: bool) -> None:
    w0, ws = make_models(3, seed=2)
    w0 = {k: v * 1000 for k, v in w0.items()}  # the anchor's values must not matter
    weights = [0.5, 2.0, -0.25]
    out, report = merge_state_dicts(w0, ws, method="linear", weights=weights,
                                    normalize=normalize)
    for k in w0:
        expected = sum(w * m[k].double().numpy() for w, m in zip(weights, ws, strict=True))
        expected = expected / sum(weights) if normalize else expected
        np.testing.assert_allclose(out[k].double().numpy(), expected, rtol=0, atol=1e-5)
    assert report.weights == weights and report.normalize is normalize
    assert {layer.rule for layer in report.layers} == {"linear"}


def test_linear_via_cli_and_equal_weights_give_the_plain_mean(tmp_path: Path) -> None:
    w0, ws = make_models(2, seed=3)
    paths = save_all(tmp_path, w0, ws)
    out = cli(*paths, "-o", str(tmp_path / "l"), "--method", "linear",
              "--weights", "1,3")
    for k in w0:
        torch.testing.assert_close(out[k], (ws[0][k] + 3 * ws[1][k]) / 4, rtol=0, atol=1e-6)
    equal, _ = merge_state_dicts(w0, ws, method="linear", weights=[1.0, 1.0])
    for k in w0:  # x * 1 is exact: the same bits as summing then dividing
        assert torch.equal(equal[k], (ws[0][k] + ws[1][k]) / 2)


def test_linear_rejects_bad_weights(tmp_path: Path) -> None:
    w0, ws = make_models(2)
    with pytest.raises(ModelStockError, match="3 weights for 2 models"):
        merge_state_dicts(w0, ws, method="linear", weights=[1, 2, 3])
    with pytest.raises(ModelStockError, match="sum to 0"):
        MergeOptions(method="linear", weights=(1.0, -1.0))
    with pytest.raises(ModelStockError, match="weights"):
        MergeOptions(method="uniform", weights=(1.0, 1.0))
    paths = save_all(tmp_path, w0, ws)
    assert "--weights" in cli_error(*paths, "-o", str(tmp_path / "x"), "--method", "linear",
                                    "--weights", "1,a")


def test_compute_dtype_float64_runs_the_arithmetic_in_float64() -> None:
    w0, ws = make_models(3, seed=4, shape=(64, 33))
    ref = {k: np_stock(w0[k].numpy(), [w[k].numpy() for w in ws]) for k in w0}
    wide, _ = merge_state_dicts(w0, ws, dtype=torch.float64, compute_dtype=torch.float64)
    narrow, _ = merge_state_dicts(w0, ws, dtype=torch.float64)
    for k in w0:
        np.testing.assert_allclose(wide[k].numpy().ravel(), ref[k], rtol=0, atol=1e-13)
    # float32 arithmetic is visibly coarser: the check above can fail
    assert max(float(np.abs(narrow[k].numpy().ravel() - ref[k]).max()) for k in w0) > 1e-9


# -- Model Stock ablations through the CLI ---------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_cli_model_stock_n_models_mean_of_cosines(tmp_path: Path, n: int) -> None:
    w0, ws = make_models(n, seed=5)
    paths = save_all(tmp_path, w0, ws)
    out = cli(*paths, "-o", str(tmp_path / "s"))
    for k in w0:
        expected = np_stock(w0[k].numpy(), [w[k].numpy() for w in ws]).reshape(w0[k].shape)
        np.testing.assert_allclose(out[k].double().numpy(), expected, rtol=0, atol=1e-6)


def test_cli_granularity_row(tmp_path: Path) -> None:
    w0, ws = make_models(3, seed=6)
    paths = save_all(tmp_path, w0, ws)
    out = cli(*paths, "-o", str(tmp_path / "r"), "--granularity", "row")
    expected = np.stack([np_stock(w0["w"][r].numpy(), [w["w"][r].numpy() for w in ws])
                         for r in range(w0["w"].shape[0])])
    np.testing.assert_allclose(out["w"].double().numpy(), expected, rtol=0, atol=1e-6)
    # a 1-D tensor has one row: its ratio is the tensor's
    b = np_stock(w0["b"].numpy(), [w["b"].numpy() for w in ws])
    np.testing.assert_allclose(out["b"].double().numpy(), b, rtol=0, atol=1e-6)


def test_cli_granularity_model(tmp_path: Path) -> None:
    w0, ws = make_models(2, seed=7)
    paths = save_all(tmp_path, w0, ws)
    out = cli(*paths, "-o", str(tmp_path / "g"), "--granularity", "model")
    keys = sorted(w0)  # one ratio from the concatenation of every tensor
    flat = np.concatenate([w0[k].numpy().ravel() for k in keys])
    flats = [np.concatenate([w[k].numpy().ravel() for k in keys]) for w in ws]
    expected = np_stock(flat, flats)
    got = np.concatenate([out[k].double().numpy().ravel() for k in keys])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_cli_no_clamp_keeps_the_raw_ratio(tmp_path: Path) -> None:
    w0 = {"w": torch.zeros(2)}
    ws = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([-0.5, 0.8])}]  # cos < 0
    paths = save_all(tmp_path, w0, ws)
    clamped = cli(*paths, "-o", str(tmp_path / "c"))
    raw = cli(*paths, "-o", str(tmp_path / "n"), "--no-clamp")
    assert torch.equal(clamped["w"], w0["w"])
    expected = np_stock(w0["w"].numpy(), [w["w"].numpy() for w in ws], clamp=False)
    np.testing.assert_allclose(raw["w"].double().numpy(), expected, rtol=0, atol=1e-6)
    assert float(np.abs(expected).max()) > 0.1  # the raw ratio really moves away from w0


# -- greedy soup -----------------------------------------------------------------------------


def distance_score(target: torch.Tensor):
    """Held-out score of a toy problem: closeness of the soup's ``w`` to ``target``."""
    return lambda sd: -float((sd["w"].double() - target).norm())


def toy_models(points: list[list[float]]) -> tuple[dict, list[dict]]:
    return {"w": torch.zeros(2, dtype=torch.float64)}, [
        {"w": torch.tensor(p, dtype=torch.float64)} for p in points]


def test_greedy_keeps_the_known_set() -> None:
    # Distances to the target rank a (1.12) < b (1.30) < d (2) < c (6). The soup {a, b} cancels
    # most of their x errors (0.51: kept), d then cancels their y error (0.34: kept), c drags x
    # away (1.47: left out).
    target = torch.tensor([10.0, 10.0], dtype=torch.float64)
    a, b, c, d = [11.0, 10.5], [8.8, 10.5], [16.0, 10.0], [10.0, 8.0]
    w0, ws = toy_models([d, c, b, a])  # input order differs from the ranking
    soup, report = greedy_soup(w0, ws, score=distance_score(target))
    g = report.greedy
    assert g["order"] == ["models[3]", "models[2]", "models[0]", "models[1]"]
    assert [s["kept"] for s in g["steps"]] == [True, True, True, False]
    assert g["kept"] == ["models[3]", "models[2]", "models[0]"]
    torch.testing.assert_close(soup["w"], torch.tensor([a, b, d], dtype=torch.float64).mean(0),
                               rtol=0, atol=1e-12)
    assert g["score"] == pytest.approx(distance_score(target)(soup))
    assert [e["score"] for e in g["individual"]] == pytest.approx(
        [-float(np.hypot(p[0] - 10, p[1] - 10)) for p in (d, c, b, a)])
    assert report.method == "greedy" and report.n_models == 3
    json.loads(report.to_json())  # the record is JSON-ready


def test_greedy_keeps_the_best_model_alone() -> None:
    target = torch.tensor([1.0, 1.0], dtype=torch.float64)
    w0, ws = toy_models([[3.0, 3.0], [1.0, 1.1], [-2.0, 4.0]])  # any mix moves away from (1,1)
    soup, report = greedy_soup(w0, ws, score=distance_score(target))
    assert report.greedy["kept"] == ["models[1]"]
    assert torch.equal(soup["w"], ws[1]["w"])  # a one-model soup is the model itself


def test_greedy_keeps_a_model_that_leaves_the_score_unchanged() -> None:
    w0, ws = toy_models([[1.0, 2.0], [1.0, 2.0], [5.0, 5.0]])
    _, report = greedy_soup(w0, ws, score=lambda sd: 7.0)  # every soup ties: "does not drop"
    assert report.greedy["kept"] == ["models[0]", "models[1]", "models[2]"]


@pytest.mark.parametrize("seed", range(6))
def test_greedy_matches_the_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(6, 3)) + 3.0
    target = torch.tensor(rng.normal(size=3) + 3.0)
    w0 = {"w": torch.zeros(3, dtype=torch.float64)}
    ws = [{"w": torch.tensor(p)} for p in points]
    _, report = greedy_soup(w0, ws, score=distance_score(target))

    def soup_score(idx):
        return -float(np.linalg.norm(points[idx].mean(0) - target.numpy()))

    expected = np_greedy([soup_score([i]) for i in range(6)], soup_score)
    assert report.greedy["kept"] == [f"models[{i}]" for i in expected]


def test_greedy_rejects_a_bad_score() -> None:
    w0, ws = toy_models([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ModelStockError, match="nan"):
        greedy_soup(w0, ws, score=lambda sd: math.nan)
    with pytest.raises(ModelStockError, match="not a number"):
        greedy_soup(w0, ws, score=lambda sd: "good")
    with pytest.raises(TypeError, match="plain mean"):
        greedy_soup(w0, ws, score=lambda sd: 0.0, method="model-stock")


SCORE_MODULE = """
import torch

TARGET = torch.tensor([10.0, 10.0])

def score(sd):
    return -float((sd["w"].double() - TARGET.double()).norm())
"""


def test_cli_greedy_writes_the_mean_of_the_kept_models(tmp_path: Path,
                                                               monkeypatch) -> None:
    a, b, c, d = [11.0, 10.5], [8.8, 10.5], [16.0, 10.0], [10.0, 8.0]  # as in the test above
    w0 = {"w": torch.zeros(2)}
    ws = [{"w": torch.tensor(p)} for p in (a, b, c, d)]
    paths = save_all(tmp_path, w0, ws)
    (tmp_path / "toy_score.py").write_text(SCORE_MODULE)
    monkeypatch.chdir(tmp_path)  # `module:function` imports from the working directory
    out_dir = tmp_path / "greedy"
    greedy = cli(*paths, "-o", str(out_dir), "--method", "greedy", "--score", "toy_score:score")
    report = json.loads((out_dir / "modelstock_report.json").read_text())
    assert report["method"] == "greedy"
    assert report["greedy"]["kept"] == [paths[1], paths[2], paths[4]]
    assert [s["model"] for s in report["greedy"]["steps"]] == [paths[1], paths[2], paths[4],
                                                                paths[3]]
    mean = cli(paths[0], paths[1], paths[2], paths[4], "-o", str(tmp_path / "m"),
               "--method", "linear", "--weights", "1,1,1")
    assert torch.equal(greedy["w"], mean["w"])
    uniform = cli(paths[0], paths[1], paths[2], paths[4], "-o", str(tmp_path / "u"),
                  "--method", "uniform")  # the same soup, via the anchor: equal up to rounding
    torch.testing.assert_close(greedy["w"], uniform["w"], rtol=1e-6, atol=1e-6)
    by_file = cli(*paths, "-o", str(tmp_path / "g2"), "--method", "greedy",
                  "--score", f"{tmp_path / 'toy_score.py'}:score")
    assert torch.equal(by_file["w"], greedy["w"])


def test_cli_greedy_needs_a_score_and_a_good_one(tmp_path: Path) -> None:
    paths = save_all(tmp_path, *make_models(2))
    out = str(tmp_path / "x")
    assert "--score" in cli_error(*paths, "-o", out, "--method", "greedy")
    assert "--score" in cli_error(*paths, "-o", out, "--score", "m:f")
    assert "--weights" in cli_error(*paths, "-o", out, "--method", "greedy", "--score", "json:d",
                                    "--weights", "1,2")
    err = cli_error(*paths, "-o", out, "--method", "greedy", "--score", "no_such_mod_xyz:f")
    assert "cannot import 'no_such_mod_xyz'" in err and "Traceback" not in err
    with pytest.raises(ModelStockError, match="no 'nope'"):
        load_score("json:nope")
    with pytest.raises(ModelStockError, match="module:function"):
        load_score("json")
    assert load_score("json:dumps") is json.dumps
