"""The command line: happy path, summary, and the one-line errors of issue 2 item 7."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_finetunes, run_cli

SHAPES = {"w": (6, 4), "b": (4,)}


def write_models(tmp_path: Path, sds: list[dict]) -> list[str]:
    paths = []
    for i, sd in enumerate(sds):
        path = tmp_path / f"m{i}.safetensors"
        save_file(sd, path)
        paths.append(str(path))
    return paths


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("modelstock: error:")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_merge_prints_summary_and_writes(tmp_path: Path) -> None:
    paths = write_models(tmp_path, make_finetunes(SHAPES))
    proc = run_cli("merge", *paths, "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    for needle in ("model-stock", "mean", "angle", "time", "written"):
        assert needle in proc.stderr
    assert load_file(tmp_path / "out" / "model.safetensors").keys() == SHAPES.keys()
    quiet = run_cli("merge", *paths, "-o", str(tmp_path / "out2"), "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_buffered_writes_give_the_same_bytes(tmp_path: Path) -> None:
    """O_DIRECT (the default, where the file system takes it) and the page cache write the same
    file; the tensors are large enough to fill several staging blocks and leave a tail."""
    paths = write_models(tmp_path, make_finetunes({"w": (2500, 1001), "b": (1001,)}))
    for flag, name in (([], "direct"), (["--buffered-writes"], "buffered")):
        proc = run_cli("merge", *paths, "-o", str(tmp_path / f"{name}.safetensors"), "-q", *flag)
        assert proc.returncode == 0, proc.stderr
    direct = (tmp_path / "direct.safetensors").read_bytes()
    assert direct == (tmp_path / "buffered.safetensors").read_bytes()
    assert len(direct) % 4096 != 0


def test_help_teaches() -> None:
    proc = run_cli("merge", "--help")
    assert proc.returncode == 0
    for needle in ("ANCHOR", "--granularity", "--no-clamp", "--keep-anchor", "--shard-size",
                   "Examples"):
        assert needle in proc.stdout


def test_existing_output_is_refused_then_replaced_with_force(tmp_path: Path) -> None:
    paths = write_models(tmp_path, make_finetunes(SHAPES))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = run_cli("merge", *paths, "-o", str(out))
    assert_one_line_error(proc, str(out), "--force")
    assert (out / "keep.txt").read_text() == "precious"
    assert run_cli("merge", *paths, "-o", str(out), "--force", "-q").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_output_may_not_replace_an_input(tmp_path: Path) -> None:
    sds = make_finetunes(SHAPES)
    dirs = []
    for i, sd in enumerate(sds):
        (tmp_path / f"d{i}").mkdir()
        save_file(sd, tmp_path / f"d{i}" / "model.safetensors")
        dirs.append(str(tmp_path / f"d{i}"))
    proc = run_cli("merge", *dirs, "-o", dirs[1], "--force")
    assert_one_line_error(proc, "replace an input")
    assert (tmp_path / "d1" / "model.safetensors").exists()


def no_output_left(tmp_path: Path) -> bool:
    return not (tmp_path / "out").exists() and not any(
        p.name.startswith(".out") for p in tmp_path.iterdir())


def test_missing_keys_named(tmp_path: Path) -> None:
    sds = make_finetunes({**SHAPES, **{f"extra.{i}": (2,) for i in range(7)}})
    for i in range(7):
        del sds[2][f"extra.{i}"]
    paths = write_models(tmp_path, sds)
    proc = run_cli("merge", *paths, "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, paths[2], "missing 7 tensor(s)", "extra.0", "...")
    assert no_output_left(tmp_path)


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    sds = make_finetunes(SHAPES)
    sds[1]["w"] = torch.randn(4, 6)
    paths = write_models(tmp_path, sds)
    proc = run_cli("merge", *paths, "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, paths[1], "'w'", "[4, 6]", "[6, 4]")
    assert no_output_left(tmp_path)


def test_nonfinite_named_unless_allowed(tmp_path: Path) -> None:
    sds = make_finetunes(SHAPES)
    sds[2]["b"][1] = float("nan")
    paths = write_models(tmp_path, sds)
    proc = run_cli("merge", *paths, "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, paths[2], "'b'", "NaN")
    assert no_output_left(tmp_path)
    ok = run_cli("merge", *paths, "-o", str(tmp_path / "out"), "--allow-nonfinite", "-q")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_file_named(tmp_path: Path, damage: str) -> None:
    paths = write_models(tmp_path, make_finetunes(SHAPES))
    data = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes({"truncate": data[: len(data) - 10],
                                "garbage": b"\x00" * 8 + b"not json at all",
                                "empty": b""}[damage])
    proc = run_cli("merge", *paths, "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, paths[1])
    assert no_output_left(tmp_path)


def test_corrupt_pickle_and_code_pickle_named(tmp_path: Path) -> None:
    sds = make_finetunes(SHAPES)
    paths = write_models(tmp_path, sds[:2])
    torch.save(sds[2], tmp_path / "m2.pt")
    raw = (tmp_path / "m2.pt").read_bytes()
    (tmp_path / "m2.pt").write_bytes(raw[: len(raw) // 2])
    proc = run_cli("merge", *paths, str(tmp_path / "m2.pt"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "m2.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": sds[2]["w"], "b": sds[2]["b"], "x": Evil()}, tmp_path / "evil.pt")
    proc = run_cli("merge", *paths, str(tmp_path / "evil.pt"), "-o", str(tmp_path / "out"))
    assert_one_line_error(proc, "evil.pt", "--trust-pickle")
    assert "pwned" not in proc.stdout
    assert no_output_left(tmp_path)


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    paths = write_models(tmp_path, make_finetunes(SHAPES))
    proc = run_cli("merge", *paths, "-o", str(tmp_path / "out"), "--shard-size", "lots")
    assert proc.returncode == 2 and "not a size" in proc.stderr
    proc = run_cli("merge", *paths, "-o", str(tmp_path / "out"), "--dtype", "int8")
    assert proc.returncode == 2


def test_report_json_schema(tmp_path: Path) -> None:
    paths = write_models(tmp_path, make_finetunes(SHAPES, n=3))
    assert run_cli("merge", *paths, "-o", str(tmp_path / "out"), "-q",
                   "--granularity", "row").returncode == 0
    report = json.loads((tmp_path / "out" / "modelstock_report.json").read_text())
    assert report["method"] == "model-stock" and report["n_models"] == 3
    assert report["granularity"] == "row"
    w = next(x for x in report["layers"] if x["name"] == "w")
    assert len(w["pair_cos"]) == 3 and len(w["norms"]) == 3
    assert w["t_min"] <= w["t"] <= w["t_max"]
