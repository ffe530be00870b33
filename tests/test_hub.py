"""Hugging Face Hub ids as inputs (modelstock.hub), without the network.

The Hub cache is built inside each test as huggingface_hub lays it out
(``models--org--name/{blobs,refs,snapshots}``, snapshot files symlinked into ``blobs/``;
``huggingface_hub.scan_cache_dir`` must read it back) and the runs are offline
(``HF_HUB_OFFLINE=1``). The online path runs against stand-ins for the two calls that would
reach the Hub (``HfApi.model_info`` and ``snapshot_download``), with the endpoint pointed
at a closed local port so that any other request fails at once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from modelstock import hub, merge_checkpoints, merge_state_dicts
from modelstock.cli import main
from modelstock.config import parse_config
from modelstock.errors import ModelStockError
from tests.conftest import make_finetunes
from tests.llm_models import cache_repo, commit_of

pytest.importorskip("huggingface_hub")
import huggingface_hub  # noqa: E402
import huggingface_hub.constants  # noqa: E402  (submodules of a lazily importing package)
import huggingface_hub.utils  # noqa: E402

SHAPES = {"embed.weight": (40, 8), "layer.0.weight": (8, 8), "layer.0.bias": (8,),
          "norm.weight": (8,), "head.weight": (3, 8)}
CONFIG = {"model_type": "toy", "hidden_size": 8, "torch_dtype": "float32"}
TOKENIZER = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}}}


def write_model(directory: Path, sd: dict, kind: str = "safetensors", extra: bool = True
                ) -> Path:
    """A model directory: weights (one safetensors file, two shards and an index, or a
    pytorch_model.bin) and, with ``extra``, config, tokenizer and training leftovers."""
    directory.mkdir(parents=True)
    if kind == "safetensors":
        save_file(sd, directory / "model.safetensors")
    elif kind == "sharded":
        names = list(sd)
        weight_map = {}
        for i, group in enumerate((names[:2], names[2:])):
            shard = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in group}, directory / shard)
            weight_map.update(dict.fromkeys(group, shard))
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(sd, directory / "pytorch_model.bin")
    if extra:
        (directory / "config.json").write_text(json.dumps(CONFIG))
        (directory / "generation_config.json").write_text('{"max_length": 20}')
        (directory / "tokenizer.json").write_text(json.dumps(TOKENIZER))
        (directory / "README.md").write_text("# a model card that is not copied\n")
    return directory


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path, offline, the working directory in tmp_path/work."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub reads these at import, which may have happened already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_resolved", {})
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


@pytest.fixture
def models(env, tmp_path):
    """Three tiny models, both as local directories and in the Hub cache:
    org/base (two shards), org/ft0 (main: one fine-tune, branch v2: another), org/ft1 (a
    pytorch_model.bin only). Returns the local directories by name."""
    anchor, m0, m1, m0_v2 = make_finetunes(SHAPES, n=3, seed=3)
    local = tmp_path / "local"
    dirs = {"base": write_model(local / "base", anchor, "sharded"),
            "ft0": write_model(local / "ft0", m0),
            "ft0-v2": write_model(local / "ft0-v2", m0_v2),
            "ft1": write_model(local / "ft1", m1, "bin", extra=False)}
    cache_repo(env, "org/base", dirs["base"], commit_of("base"))
    cache_repo(env, "org/ft0", dirs["ft0"], commit_of("ft0"))
    cache_repo(env, "org/ft0", dirs["ft0-v2"], commit_of("ft0-v2"), refs=("v2",))
    cache_repo(env, "org/ft1", dirs["ft1"], commit_of("ft1"))
    return dirs


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -- what an id is ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("org/name", ("org/name", None)),
    ("Org-1/my.model_v2", ("Org-1/my.model_v2", None)),
    ("org/name@v2", ("org/name", "v2")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
    ("name", None), ("./org/name", None), ("/abs/org", None), ("org/name/", None),
    ("a/b/c", None), ("org/na--me", None), ("org/na..me", None), ("org/.name", None),
    ("org/name-", None), ("org/name@", None), ("org/name@../x", None), ("org/name@/x", None),
    ("org/model.safetensors@x y ", None), ("org/" + "n" * 97, None),
])
def test_parse_id(text, expected) -> None:
    assert hub.parse_id(text) == expected


def test_selection_takes_what_a_merge_reads() -> None:
    listing = [".gitattributes", "README.md", "config.json", "generation_config.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "tokenizer.model", "chat_template.jinja", "merges.txt", "vocab.json",
               "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "pytorch_model.bin.index.json",
               "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
               "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin",
               "flax_model.msgpack", "tf_model.h5", "onnx/model.onnx",
               "original/consolidated.00.pth", "original/params.json",
               "modelstock_report.json", "logo.png"]
    assert hub.needed_files(listing) == [
        "model.safetensors.index.json", "chat_template.jinja", "config.json",
        "generation_config.json", "merges.txt", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json", "vocab.json"]
    # the shards are those its index names, once the index is here
    assert hub.weight_files([f for f in listing if f != "model.safetensors.index.json"]) == [
        "pytorch_model.bin.index.json"]  # two shards and no index: the .bin index
    no_safetensors = [f for f in listing if not f.startswith("model")]
    assert hub.weight_files(no_safetensors) == ["pytorch_model.bin.index.json"]
    trainer = ["pytorch_model.bin", "optimizer.pt", "scheduler.pt", "training_args.bin",
               "config.json"]
    assert hub.needed_files(trainer) == ["pytorch_model.bin", "config.json"]
    assert hub.needed_files(["model.safetensors", "pytorch_model.bin", "README.md"]) == [
        "model.safetensors"]
    assert hub.weight_files(["weights.safetensors", "optimizer.pt", "sub/x.safetensors"]) == [
        "weights.safetensors"]
    assert hub.weight_files(["README.md", "config.json", "onnx/model.onnx"]) == []
    with pytest.raises(ModelStockError, match="org/x: several weight files .*a.safetensors"):
        hub.weight_files(["a.safetensors", "b.safetensors"], "org/x")


def test_shard_files_come_from_the_index(tmp_path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors",
                                                "c": "s1.safetensors", "d": "gone.bin"}}))
    listing = ["s1.safetensors", "s2.safetensors", "s3.safetensors", "index.json"]
    assert hub.shard_files(index, listing) == ["s1.safetensors", "s2.safetensors"]
    index.write_text("{not json")
    assert hub.shard_files(index, listing) == []


def test_the_cache_built_here_is_huggingface_hubs_layout(models, env) -> None:
    info = huggingface_hub.scan_cache_dir(env)
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert sorted(repos) == ["org/base", "org/ft0", "org/ft1"]
    refs = {rev.commit_hash: set(rev.refs) for rev in repos["org/ft0"].revisions}
    assert refs == {commit_of("ft0"): {"main"}, commit_of("ft0-v2"): {"v2"}}
    found = huggingface_hub.try_to_load_from_cache("org/ft0", "config.json", revision="v2",
                                                   cache_dir=env)
    assert Path(found).parent.name == commit_of("ft0-v2")


# -- resolving, offline ------------------------------------------------------------------------

def test_resolve_finds_the_snapshot_of_each_revision(models, env) -> None:
    snaps = env / "models--org--ft0" / "snapshots"
    assert hub.resolve("org/ft0") == snaps / commit_of("ft0")
    assert hub.resolve("org/ft0@main") == snaps / commit_of("ft0")
    assert hub.resolve("org/ft0@v2") == snaps / commit_of("ft0-v2")
    assert hub.resolve(f"org/ft0@{commit_of('ft0-v2')}") == snaps / commit_of("ft0-v2")
    # paths are never ids
    assert hub.resolve(Path("org/ft0")) == Path("org/ft0")
    assert hub.resolve("./org/ft0") == Path("./org/ft0")


def test_merge_by_id_equals_merge_by_path(models, tmp_path) -> None:
    by_path = merge_checkpoints(models["base"], [models["ft0"], models["ft1"]],
                                tmp_path / "by_path")
    ids = ["org/base", "org/ft0", "org/ft1"]
    report = merge_checkpoints(ids[0], ids[1:], tmp_path / "by_id")
    assert_same_tensors(tensors(tmp_path / "by_id"), tensors(tmp_path / "by_path"))
    assert [x.t for x in report.layers] == [x.t for x in by_path.layers]
    # the ids as written are recorded, not cache paths
    assert (report.anchor, report.models) == ("org/base", ["org/ft0", "org/ft1"])
    saved = json.loads((tmp_path / "by_id" / "modelstock_report.json").read_text())
    assert (saved["anchor"], saved["models"]) == ("org/base", ["org/ft0", "org/ft1"])
    card = (tmp_path / "by_id" / "README.md").read_text()
    assert 'base_model: "org/base"' in card and "- `org/ft1`" in card
    assert "snapshots" not in card
    # the anchor's config and tokenizer files, copied from its snapshot, as files
    out = tmp_path / "by_id"
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (models["base"] / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in
                                                           (tmp_path / "by_path").iterdir())
    # in memory too, and in inspection
    sd, rep = merge_state_dicts("org/base", ["org/ft0", "org/ft1"])
    assert_same_tensors(sd, tensors(tmp_path / "by_path"))
    assert rep.anchor == "org/base"


def test_cli_merge_and_inspect_by_id(models, tmp_path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["merge", str(models["base"]), str(models["ft0"]),
                               str(models["ft1"]), "-o", str(tmp_path / "by_path"), "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["merge", "org/base", "org/ft0", "org/ft1", "-o",
                               str(tmp_path / "by_id"), "-q"])
    assert res.exit_code == 0, res.output
    assert_same_tensors(tensors(tmp_path / "by_id"), tensors(tmp_path / "by_path"))
    res = runner.invoke(main, ["inspect", "org/base", "org/ft0", "org/ft1", "-q", "--json",
                               str(tmp_path / "i.json")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "i.json").read_text())
    assert json.dumps(saved).count("org/ft1") >= 1 and "snapshots" not in json.dumps(saved)


def test_greedy_soup_by_id(models, tmp_path) -> None:
    from modelstock.soups import greedy_soup, greedy_soup_checkpoints

    def score(sd):  # closeness to ft1: ft1 alone is best, adding ft0 makes it worse
        return -float((sd["layer.0.weight"] - target).norm())

    target = torch.load(models["ft1"] / "pytorch_model.bin")["layer.0.weight"]
    by_path, rep_path = greedy_soup(models["base"], [models["ft0"], models["ft1"]], score)
    by_id, rep_id = greedy_soup("org/base", ["org/ft0", "org/ft1"], score)
    assert_same_tensors(by_id, by_path)
    assert rep_id.greedy["kept"] == ["org/ft1"] and rep_path.greedy["kept"] == [
        str(models["ft1"])]
    report = greedy_soup_checkpoints("org/base", ["org/ft0", "org/ft1"], tmp_path / "out", score)
    assert_same_tensors(tensors(tmp_path / "out"), by_path)
    assert (report.anchor, report.models) == ("org/base", ["org/ft1"])
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_revision_picks_its_own_files(models, tmp_path) -> None:
    merge_checkpoints(models["base"], [models["ft0-v2"], models["ft1"]], tmp_path / "v2_path")
    merge_checkpoints(models["base"], [models["ft0"], models["ft1"]], tmp_path / "main_path")
    v2, main_ = tensors(tmp_path / "v2_path"), tensors(tmp_path / "main_path")
    assert not torch.equal(v2["layer.0.weight"], main_["layer.0.weight"])
    for i, (rev, want) in enumerate([("v2", v2), (commit_of("ft0-v2"), v2), ("main", main_),
                                     (commit_of("ft0"), main_)]):
        report = merge_checkpoints("org/base", [f"org/ft0@{rev}", "org/ft1"],
                                   tmp_path / f"out{i}")
        assert_same_tensors(tensors(tmp_path / f"out{i}"), want)
        assert report.models[0] == f"org/ft0@{rev}"
        meta = json.loads(_header_metadata(tmp_path / f"out{i}" / "model.safetensors"))
        assert meta["models"][0] == f"org/ft0@{rev}"


def _header_metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["modelstock"]


def test_a_local_directory_named_like_an_id_wins(models, tmp_path) -> None:
    # ./org/ft0 in the working directory holds the v2 weights; the cache's org/ft0 does not
    write_model(Path("org") / "ft0", load_file(models["ft0-v2"] / "model.safetensors"))
    assert hub.resolve("org/ft0") == Path("org/ft0")
    assert not hub.is_hub_id("org/ft0") and hub.is_hub_id("org/ft0@v2")
    report = merge_checkpoints("org/base", ["org/ft0", "org/ft1"], tmp_path / "out")
    merge_checkpoints(models["base"], [models["ft0-v2"], models["ft1"]], tmp_path / "want")
    assert_same_tensors(tensors(tmp_path / "out"), tensors(tmp_path / "want"))
    assert report.models[0] == os.path.join("org", "ft0", "model.safetensors")


@pytest.mark.parametrize("source, message", [
    ("org/missing", "org/missing: not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ("org/ft0@nope", "org/ft0@nope: not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                     "set"),
    ("org/ft0@" + "0" * 40, "org/ft0@" + "0" * 40 + ": not in the local Hugging Face cache "
                            "and HF_HUB_OFFLINE is set"),
])
def test_offline_and_not_cached_is_one_line_and_writes_nothing(models, tmp_path, source,
                                                               message) -> None:
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", "org/base", source, "org/ft1", "-o", str(out)])
    assert res.exit_code == 1
    assert res.output == f"modelstock: error: {message}\n"
    assert sorted(os.listdir(tmp_path)) == before and not out.exists()
    res = CliRunner().invoke(main, ["inspect", "org/base", source, "org/ft1", "-q"])
    assert res.exit_code == 1 and res.output == f"modelstock: error: {message}\n"


def test_offline_partial_snapshot_names_what_is_missing(models, env, tmp_path) -> None:
    snapshot = env / "models--org--base" / "snapshots" / commit_of("base")
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelStockError) as e:
        merge_checkpoints("org/base", ["org/ft0", "org/ft1"], tmp_path / "out")
    assert str(e.value) == ("org/base: only partly in the local Hugging Face cache (missing "
                            "model-00002-of-00002.safetensors) and HF_HUB_OFFLINE is set")
    for f in snapshot.iterdir():
        if f.suffix == ".safetensors":
            f.unlink()
    (snapshot / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelStockError, match=r"^org/base: no weights in the local Hugging "
                                              r"Face cache \(.*\) and HF_HUB_OFFLINE is set$"):
        hub.resolve("org/base")
    assert not (tmp_path / "out").exists()


def test_without_huggingface_hub(models, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ModelStockError) as e:
        merge_checkpoints("org/base", ["org/ft0", "org/ft1"], tmp_path / "out")
    assert str(e.value) == ("org/base: no such file or directory, and huggingface_hub is not "
                            "installed to fetch it as a Hub id: pip install 'modelstock[hub]'")
    # what is not shaped like an id keeps today's error
    with pytest.raises(ModelStockError) as e:
        merge_checkpoints(str(tmp_path / "nope"), [models["ft0"], models["ft1"]],
                          tmp_path / "out")
    assert str(e.value) == f"{tmp_path / 'nope'}: no such file or directory"
    # and local paths need no huggingface_hub
    merge_checkpoints(models["base"], [models["ft0"], models["ft1"]], tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


# -- YAML ----------------------------------------------------------------------------------------

def test_yaml_config_with_ids(models, tmp_path) -> None:
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: model_stock\nbase_model: org/base\nmodels:\n"
                      "  - model: org/ft0@v2\n"
                      "  - model:\n      model:\n        path: org/ft1\n"
                      "        revision: main\n"
                      "parameters:\n  filter_wise: false\n")
    res = CliRunner().invoke(main, ["merge", "--config", str(config), "-o",
                                    str(tmp_path / "by_id"), "-q"])
    assert res.exit_code == 0, res.output
    merge_checkpoints(models["base"], [models["ft0-v2"], models["ft1"]], tmp_path / "by_path")
    assert_same_tensors(tensors(tmp_path / "by_id"), tensors(tmp_path / "by_path"))
    saved = json.loads((tmp_path / "by_id" / "modelstock_report.json").read_text())
    assert saved["models"] == ["org/ft0@v2", "org/ft1@main"]


def test_config_model_references() -> None:
    cfg = parse_config({"merge_method": "model_stock", "base_model": "org/base",
                        "models": [{"model": "org/a@v1"},
                                   {"model": {"model": {"path": "org/b", "revision": "r2"}}},
                                   {"model": {"model": "org/c", "lora": None}}]}, "m.yml")
    assert (cfg.anchor, cfg.models) == ("org/base", ["org/a@v1", "org/b@r2", "org/c"])
    lora = parse_config({"merge_method": "model_stock", "base_model": "org/base",
                         "models": [{"model": "org/a+org/lora"},
                                    {"model": {"model": "org/a", "lora": "org/l@v2"}}]})
    assert lora.models == ["org/a+org/lora", "org/a+org/l@v2"]
    for ref, message in [
        ({"model": {"path": "org/a", "revision": 3}}, "models[0].model.model.revision: "
                                                      "expected a branch, tag or commit, got 3"),
        ({"model": {"path": "org/a", "subfolder": "x"}}, "models[0].model.model.subfolder: "
                                                         "unknown key (supported: path, "
                                                         "revision)"),
        (3, "models[0].model: expected a local path or a Hub id (org/name[@revision]), got 3"),
    ]:
        with pytest.raises(ModelStockError) as e:
            parse_config({"merge_method": "model_stock", "base_model": "org/base",
                          "models": [{"model": ref}, {"model": "org/z"}]}, "m.yml")
        assert str(e.value) == f"m.yml: {message}"


# -- online, against stand-ins for the Hub ---------------------------------------------------------

class FakeHub:
    """``model_info`` and ``snapshot_download`` over repositories held as directories:
    records what is asked, and fills the cache as huggingface_hub does (one commit per repo,
    ``refs/<revision>``)."""

    def __init__(self, cache: Path, repos: dict[str, Path]) -> None:
        self.cache, self.repos = cache, repos
        self.listed: list[tuple[str, str | None]] = []
        self.fetched: list[tuple[str, str | None, list[str], bool]] = []

    def model_info(self, api, repo_id, revision=None, **kwargs):
        self.listed.append((repo_id, revision))
        if repo_id not in self.repos:
            err = huggingface_hub.utils.RepositoryNotFoundError.__new__(
                huggingface_hub.utils.RepositoryNotFoundError)
            Exception.__init__(err, "404 Client Error: Repository Not Found")
            raise err
        files = sorted(p.name for p in self.repos[repo_id].iterdir()) + ["onnx/model.onnx"]
        return SimpleNamespace(sha=commit_of(repo_id),
                               siblings=[SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(self, repo_id, *, revision=None, cache_dir=None, allow_patterns=None,
                          **kwargs):
        import fnmatch

        from huggingface_hub.utils import are_progress_bars_disabled

        assert Path(cache_dir) == self.cache
        source = self.repos[repo_id]
        names = [p.name for p in source.iterdir()
                 if any(fnmatch.fnmatchcase(p.name, pat) for pat in allow_patterns)]
        self.fetched.append((repo_id, revision, sorted(names), are_progress_bars_disabled()))
        storage = self.cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = storage / "snapshots" / commit_of(repo_id)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (snapshot / name).exists():
                (snapshot / name).write_bytes((source / name).read_bytes())
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / (revision or "main")).write_text(commit_of(repo_id))
        return str(snapshot)


@pytest.fixture
def online(env, models, monkeypatch, tmp_path):
    """Online (HF_HUB_OFFLINE unset), the Hub replaced by `FakeHub` over fresh copies of the
    models, the cache emptied first."""
    import shutil

    shutil.rmtree(env)
    env.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    (models["base"] / "optimizer.pt").write_bytes(b"not needed")
    (models["base"] / "pytorch_model.bin").write_bytes(b"not needed either")
    fake = FakeHub(env, {"org/base": models["base"], "org/ft0": models["ft0"],
                         "org/ft1": models["ft1"]})
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, *a, **k: fake.model_info(self, *a, **k))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def test_online_fetches_only_what_a_merge_needs(online, models, tmp_path, monkeypatch) -> None:
    report = merge_checkpoints("org/base", ["org/ft0", "org/ft1"], tmp_path / "by_id",
                               progress=True)
    aux = ["config.json", "generation_config.json", "tokenizer.json"]
    assert online.fetched == [
        ("org/base", None, sorted(["model.safetensors.index.json", *aux]), False),
        ("org/base", None, ["model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors"], False),
        ("org/ft0", None, sorted(["model.safetensors", *aux]), False),
        ("org/ft1", None, ["pytorch_model.bin"], False),
    ]
    merge_checkpoints(models["base"], [models["ft0"], models["ft1"]], tmp_path / "by_path")
    assert_same_tensors(tensors(tmp_path / "by_id"), tensors(tmp_path / "by_path"))
    assert report.anchor == "org/base"
    # resolved once per process: no second listing; -q (progress=False) turns the bars off
    merge_state_dicts("org/base", ["org/ft0", "org/ft1"])
    assert len(online.listed) == 3
    hub._resolved.clear()
    merge_state_dicts("org/base", ["org/ft0", "org/ft1"], progress=False)
    assert len(online.listed) == 6 and all(f[3] for f in online.fetched[4:])
    assert not huggingface_hub.utils.are_progress_bars_disabled()
    # and what was fetched serves offline afterwards
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_resolved", {})
    assert hub.resolve("org/base") == snapshot_of(online.cache, "org/base", "org/base")


def snapshot_of(cache: Path, repo_id: str, commit_text: str) -> Path:
    return (cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
            / commit_of(commit_text))


def test_online_errors_are_one_line(online, tmp_path, monkeypatch) -> None:
    res = CliRunner().invoke(main, ["merge", "org/base", "org/nope", "org/ft1", "-o",
                                    str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1 and not (tmp_path / "out").exists()
    assert res.output == ("modelstock: error: org/nope: no such file or directory, nor a model "
                          "on the Hugging Face Hub (a private one needs HF_TOKEN)\n")

    def unreachable(self, *a, **k):
        raise ConnectionError("[Errno 111] Connection refused\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ModelStockError) as e:
        hub.resolve("org/ft0")
    assert str(e.value) == ("org/ft0: cannot reach the Hugging Face Hub (ConnectionError: "
                            "[Errno 111] Connection refused) and not in the local cache")
    # a cached snapshot serves when the Hub cannot be reached, as huggingface_hub does
    cache_repo(online.cache, "org/ft0", online.repos["org/ft0"], commit_of("old"))
    assert hub.resolve("org/ft0") == snapshot_of(online.cache, "org/ft0", "old")
