"""Hostile and broken checkpoints (issue 8, item 1): each is one clean error naming the file.

Every case in `hostile_files.HOSTILE` goes through the API (as a fine-tune and as the anchor) and
the click command in-process; a representative set also runs the real ``python -m modelstock``
in subprocesses. Each must give one line naming the file, a non-zero exit, no traceback, no code
run, and nothing left where the output would have gone.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from modelstock import ModelStockError, merge_checkpoints, merge_state_dicts, open_checkpoint
from modelstock.cli import main
from tests.hostile_files import (
    CODE_EXEC,
    HOSTILE,
    cli_env,
    family,
    index_tensor_in_two_shards,
    index_unlisted_tensor_in_two_shards,
    save_dir,
    valid_models,
)

# The cases the real CLI runs in subprocesses (about 3 s of CPU each, run concurrently).
SUBPROCESS_CASES = ["truncated_safetensors", "duplicate_names", "index_dotdot", "code_exec_pickle"]


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def leftovers(directory: Path, before: set[str]) -> set[str]:
    """Entries of ``directory`` that were not there ``before`` (an output, a temporary)."""
    return {p.name for p in directory.iterdir()} - before


def check_one_line(text: str, path: Path) -> None:
    assert "\n" not in text.strip(), text
    assert "Traceback" not in text
    assert str(path) in text, f"error does not name {path}: {text}"


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path, Path]:
    return valid_models(tmp_path / "good")


@pytest.mark.parametrize("position", ["model", "anchor"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_api_refuses(case: str, position: str, tmp_path: Path, models) -> None:
    anchor, ft1, ft2 = models
    bad_dir = tmp_path / "bad" / "model"
    bad = HOSTILE[case](bad_dir)
    out = tmp_path / "out"
    before = {p.name for p in tmp_path.iterdir()}
    args = (anchor, [ft1, bad]) if position == "model" else (bad, [ft1, ft2])
    with deadline(20), pytest.raises(ModelStockError) as info:
        merge_checkpoints(*args, out)
    check_one_line(str(info.value), bad)
    assert not leftovers(tmp_path, before)
    assert not (bad_dir / "PWNED").exists(), "the pickle ran code"
    with deadline(20), pytest.raises(ModelStockError):  # the in-memory entry point too
        merge_state_dicts(*args)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_cli_refuses(case: str, tmp_path: Path, models) -> None:
    anchor, ft1, _ = models
    bad = HOSTILE[case](tmp_path / "bad" / "model")
    out = tmp_path / "new" / "out"
    with deadline(20):
        result = CliRunner().invoke(main, ["merge", str(anchor), str(ft1), str(bad), "-o",
                                           str(out), "-q"])
    assert isinstance(result.exception, SystemExit) and result.exit_code == 1, result.output
    assert result.stderr.startswith("modelstock: error: ")
    check_one_line(result.stderr, bad)
    assert not (tmp_path / "new").exists()
    assert not (tmp_path / "bad" / "model" / "PWNED").exists()


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Run the real CLI on the representative cases, all at once."""
    root = tmp_path_factory.mktemp("cli")
    anchor, ft1, _ = valid_models(root / "good")
    procs = {}
    for case in SUBPROCESS_CASES:
        bad = HOSTILE[case](root / case / "model")
        out = root / case / "out"
        cmd = [sys.executable, "-m", "modelstock", "merge", str(anchor), str(ft1), str(bad),
               "-o", str(out)]
        procs[case] = (subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True), bad)
    results = {}
    for case, (proc, bad) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
                         bad)
    return results


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_real_cli_refuses(case: str, subprocess_results) -> None:
    result, bad = subprocess_results[case]
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("modelstock: error: ")
    check_one_line(result.stderr, bad)
    left = [p.name for p in bad.parent.parent.iterdir()
            if p.name == "out" or p.name.startswith(".out.")]
    assert not left, "output or temp left behind"
    assert not (bad.parent / "PWNED").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("build, why", [
    pytest.param(index_tensor_in_two_shards, "as well as in a.{fmt}, where the index places it",
                 id="indexed"),
    pytest.param(index_unlisted_tensor_in_two_shards,
                 "in two shards, a.{fmt} and b.{fmt}, and the index names neither",
                 id="unindexed"),
])
def test_tensor_in_two_shards_is_refused_naming_both(build, why: str, fmt: str,
                                                     tmp_path: Path) -> None:
    """Sharded safetensors and sharded ``.bin`` alike: a tensor that two shards hold is not
    resolved by taking one copy (from_pretrained keeps the last shard it loads)."""
    index = build(tmp_path, fmt)
    assert index.name == ("model.safetensors.index.json" if fmt == "safetensors"
                          else "pytorch_model.bin.index.json")
    with pytest.raises(ModelStockError) as info:
        open_checkpoint(tmp_path)
    check_one_line(str(info.value), index)
    assert "tensor 'w': " in str(info.value)
    assert why.format(fmt=fmt) in str(info.value)
    assert f"b.{fmt}" in str(info.value)


@pytest.mark.parametrize("case", sorted(CODE_EXEC))
def test_code_exec_payload_is_live(case: str, tmp_path: Path) -> None:
    """The payloads above would really run code: --trust-pickle (and only it) runs them."""
    bad = HOSTILE[case](tmp_path)
    with pytest.raises(ModelStockError, match="refusing to unpickle.*io.open"):
        open_checkpoint(bad)
    assert not (tmp_path / "PWNED").exists()
    with contextlib.suppress(ModelStockError):  # the raw pickle unpickles to a file, not a dict
        open_checkpoint(bad, trust_pickle=True)
    assert (tmp_path / "PWNED").exists()


def test_failure_during_merge_leaves_no_directories(tmp_path: Path) -> None:
    """An error found mid-merge (NaN in a fine-tune) removes the temporary and any parent
    directories made for the output, and leaves an existing output alone."""
    anchor, (t1, t2) = family()
    t2 = dict(t2)
    t2["layer.weight"] = t2["layer.weight"].clone()
    t2["layer.weight"][3, 3] = float("nan")
    dirs = [save_dir(s, tmp_path / n) for s, n in [(anchor, "a"), (t1, "b"), (t2, "c")]]
    out = tmp_path / "x" / "y" / "out"
    result = CliRunner().invoke(main, ["merge", *map(str, dirs), "-o", str(out), "-q"])
    assert result.exit_code == 1
    check_one_line(result.stderr, dirs[2] / "model.safetensors")
    assert "layer.weight" in result.stderr
    assert not (tmp_path / "x").exists()

    old = tmp_path / "old"
    old.mkdir()
    (old / "marker").write_text("old output")
    result = CliRunner().invoke(main, ["merge", *map(str, dirs), "-o", str(old), "-q", "-f"])
    assert result.exit_code == 1
    assert [p.name for p in old.iterdir()] == ["marker"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c", "old"]


def test_hf_cache_snapshot_with_symlinked_shards(tmp_path: Path) -> None:
    """A sharded model in a Hugging Face cache (snapshot files are symlinks into ../../blobs)
    is inside the model directory; a symlink to anywhere else is not."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    anchor, _ = family()
    names = list(anchor)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for i, (shard, keys) in enumerate(shards.items()):
        save_file({k: anchor[k] for k in keys}, blobs / f"blob{i}")
        (snap / shard).symlink_to(Path("../../blobs") / f"blob{i}")
        weight_map.update(dict.fromkeys(keys, shard))
    (blobs / "index").write_text(json.dumps({"weight_map": weight_map}))
    (snap / "model.safetensors.index.json").symlink_to(Path("../../blobs/index"))
    reader = open_checkpoint(snap)
    try:
        assert set(reader.infos) == set(anchor)
        assert torch.equal(reader.read("layer.weight").view(8, 8), anchor["layer.weight"])
    finally:
        reader.close()


def test_old_torch_refuses_pickles(tmp_path: Path, monkeypatch) -> None:
    """weights_only could run code before torch 2.6 (CVE-2025-32434): refuse, unless trusted."""
    from torch.torch_version import TorchVersion

    path = tmp_path / "model.bin"
    torch.save({"w": torch.ones(2)}, path)
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.5.1"))
    with pytest.raises(ModelStockError, match="CVE-2025-32434") as info:
        open_checkpoint(path)
    check_one_line(str(info.value), path)
    assert set(open_checkpoint(path, trust_pickle=True).infos) == {"w"}
