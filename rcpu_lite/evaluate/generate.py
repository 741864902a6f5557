"""Text from a prompt with a whole model, dense or pruned (either output format): `rcpu-lite generate`.

Unlike prune and eval this loads the whole model (in its stored dtype): generation needs every layer at
every step. The checkpoint's generation_config.json applies (end-of-text ids, penalties), except for
the choice of token, which `temperature` alone sets.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rcpu_lite.models import load_tokenizer, resolve_model
from rcpu_lite.runtime import pick_device
from rcpu_lite.selfgen import GIB, available_memory_bytes, generation_memory_bytes, stored_dtype

log = logging.getLogger("rcpu_lite")


class NotEnoughMemory(ValueError):
    """The whole model does not fit where it would run (a one-line error, exit 2, on the command line)."""


@dataclass
class Generated:
    text: str  # the new tokens, decoded without special tokens
    prompt_ids: list[int]  # what the model was given (chat template applied, if any)
    new_ids: list[int]  # what it produced, end-of-text token included when it stopped on one


def generate(
    model: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
    device: str = "auto",
    chat: bool = True,
    stream: bool = False,
) -> Generated:
    """Continue `prompt` with MODEL (a directory, built-in name, alias or hub id; see models.resolve_model).

    `temperature` 0 is greedy decoding (deterministic); above 0, plain sampling at that temperature (no top-k
    or top-p), reproducible with `seed`. With `chat` the prompt is the user's message in the tokenizer's chat
    template, when it has one. With `stream` the text is printed to stdout as the tokens come.
    """
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    dev = pick_device(device)
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    lm = load_model(model_dir, dev)
    ids = prompt_ids(tokenizer, prompt, chat).to(dev)
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        out = lm.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            **stop_ids(lm, tokenizer),
            **sampling(temperature),
        )
    new = out[0, ids.shape[1] :].tolist()
    return Generated(tokenizer.decode(new, skip_special_tokens=True), ids[0].tolist(), new)


def prompt_ids(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """1 x n token ids: the prompt as a user message in the chat template (with the assistant's turn opened),
    or, without a template or with chat=False, the plain text with the tokenizer's own special tokens."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # the template has them
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def sampling(temperature: float) -> dict:
    """generate() settings for greedy (0) or plain temperature sampling: neutral values for the rest, so the
    checkpoint's own top_k / top_p (Llama 3 ships 0.9) do not apply and transformers does not warn."""
    if temperature == 0:
        return {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def stop_ids(lm, tokenizer) -> dict:
    """End-of-text ids: the checkpoint's and the tokenizer's (a chat tokenizer's end-of-turn token may be only
    the latter); padding with one of them, which silences generate()'s notice about pad_token_id."""
    eos = lm.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        return {}
    pad = lm.generation_config.pad_token_id
    return {"eos_token_id": eos, "pad_token_id": eos[0] if pad is None else pad}


def load_model(model_dir: Path, device: torch.device):
    """The whole model in its stored dtype on `device`, after checking that it fits there."""
    from rcpu_lite.loading import load_pruned

    need = generation_memory_bytes(model_dir, device, seqlen=4096, micro_batch=1)
    have = available_memory_bytes(device)
    where = f"is free on {device}" if device.type == "cuda" else "of RAM is available"
    if need > have:
        raise NotEnoughMemory(
            f"generating loads the whole model: it needs about {need / GIB:.1f} GiB but "
            f"{have / GIB:.1f} GiB {where}; prune it further, or use another --device"
        )
    dtype = stored_dtype(model_dir)
    log.info(
        "loading %s whole on %s (%s, about %.1f GiB)", model_dir, device, str(dtype).replace("torch.", ""), need / GIB
    )
    kwargs = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
    return load_pruned(model_dir, dtype=dtype, **kwargs).eval()
