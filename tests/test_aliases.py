"""Model aliases: the table, a cache hit (offline), and the one-line error when the model is not there.

Nothing here reaches the network: conftest sets HF_HUB_OFFLINE, every test points the Hugging Face cache
at an empty temporary folder, and the hub API is replaced by one that fails the test if called.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from typer.testing import CliRunner

from rcpu_lite import aliases, models
from rcpu_lite.cli import app
from rcpu_lite.models import ModelNotFound, resolve_model

runner = CliRunner()

EXPECTED = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}


@pytest.fixture(autouse=True)
def offline_empty_cache(tmp_path, monkeypatch):
    """Offline, an empty Hugging Face cache, and a hub API that must not be called."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def no_network(*args, **kwargs):
        raise AssertionError("the hub API was called")

    for method in ("repo_info", "list_repo_tree", "model_info"):
        monkeypatch.setattr(huggingface_hub.HfApi, method, no_network)
    return cache


def fake_snapshot(cache, repo_id: str, files=("config.json", "model.safetensors", "tokenizer.json")):
    """A snapshot laid out as huggingface_hub caches one: refs/main names the commit, snapshots/<commit>/ the files."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --- the table ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alias, repo_id", sorted(EXPECTED.items()))
def test_alias_resolves_to_its_hub_id(alias, repo_id):
    assert aliases.hub_id(alias) == repo_id
    assert aliases.hub_id(alias.upper()) == repo_id  # as users type them


def test_table_holds_base_models_and_no_builtin_name():
    assert aliases.ALIASES == EXPECTED
    assert not set(aliases.ALIASES) & set(models.BUILTIN)  # smollm2-135m stays the offline built-in
    for repo_id in aliases.ALIASES.values():
        assert repo_id.count("/") == 1
        assert not any(word in repo_id.lower() for word in ("instruct", "chat", "-it"))


def test_not_an_alias():
    assert aliases.hub_id("llama-9b") is None
    assert aliases.hub_id("smollm2-135m") is None


# --- the cache ---------------------------------------------------------------------------------------------


def test_cache_hit_offline_resolves_to_the_snapshot_directory(offline_empty_cache):
    snapshot = fake_snapshot(offline_empty_cache, "HuggingFaceTB/SmolLM2-360M")
    assert resolve_model("smollm2-360m") == snapshot
    assert resolve_model("HuggingFaceTB/SmolLM2-360M") == snapshot  # the hub id itself too


def test_alias_asks_only_for_weights_config_and_tokenizer(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(fake_snapshot(tmp_path / "elsewhere", repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    path = resolve_model("Llama-2-7B")
    assert path.is_dir() and (path / "config.json").is_file()
    ((repo_id, kwargs),) = calls
    assert repo_id == "meta-llama/Llama-2-7b-hf"
    assert kwargs["local_files_only"] is True  # offline: nothing is tried over the network
    assert {"*.safetensors", "*.json"} <= set(kwargs["allow_patterns"])
    assert not any("bin" in p or "pth" in p for p in kwargs["allow_patterns"])
    assert "*/*" in kwargs["ignore_patterns"]  # no original/ or onnx/ folders


def test_online_an_alias_downloads(tmp_path, monkeypatch):
    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs)
        return str(fake_snapshot(tmp_path / "downloaded", repo_id))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert (resolve_model("qwen2.5-7b") / "config.json").is_file()
    assert seen["local_files_only"] is False


def test_snapshot_without_safetensors_is_refused(offline_empty_cache):
    fake_snapshot(offline_empty_cache, "huggyllama/llama-7b", files=("config.json", "pytorch_model.bin"))
    with pytest.raises(ModelNotFound, match=r"huggyllama/llama-7b.*\.safetensors"):
        resolve_model("llama-7b")


# --- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["prune", "llama-7b", "--out", "OUT"],
        ["eval", "llama-7b", "--ppl", "wikitext2"],
        ["generate", "llama-7b", "Hello"],
    ],
)
def test_offline_error_names_the_hub_id_and_the_way_out(command, tmp_path):
    result = runner.invoke(app, [str(tmp_path / "out") if a == "OUT" else a for a in command])
    line = one_line_error(result)
    assert "llama-7b" in line and "huggyllama/llama-7b" in line
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert "local checkpoint directory" in line
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_is_one_line_too(monkeypatch):
    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -3] Temporary failure in name resolution\n...")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelNotFound, match=r"mistralai/Mistral-7B-v0\.1.*cannot be reached.*local checkpoint"):
        resolve_model("mistral-7b")


def test_unknown_name_keeps_the_old_error_and_lists_the_aliases(tmp_path):
    result = runner.invoke(app, ["prune", "llama-9b", "--out", str(tmp_path / "out")])
    line = one_line_error(result)
    assert "does not exist" in line and "smollm2-135m" in line and "llama-2-7b" in line


def test_a_directory_named_like_an_alias_wins(tmp_path, monkeypatch):
    (tmp_path / "llama-7b").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("llama-7b") == Path("llama-7b")
