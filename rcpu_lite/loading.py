"""Loading a pruned output as a transformers model, whichever format it was written in."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

from rcpu_lite.output import remote


def load_pruned(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """The model in `path`: a plain checkpoint through AutoModelForCausalLM, one with per-layer widths
    (rcpu-lite's remote-code format) through rcpu-lite's own copy of modeling_rcpu, so no
    trust_remote_code is needed. `kwargs` go to from_pretrained (dtype, device_map, output_loading_info...).
    """
    config_file = Path(path) / "config.json"
    if config_file.is_file() and remote.is_remote(config := remote.read_config(Path(path))):
        kwargs.pop("trust_remote_code", None)  # the code is rcpu-lite's own
        return remote.classes(config)[1].from_pretrained(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
