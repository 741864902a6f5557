"""Turn a grouped-query-attention checkpoint into a multi-head one that computes the same logits.

    python tools/expand_kv.py smollm2-135m --out /work/models/smollm2-135m-mha [--overwrite]

Each KV head is repeated once for every query head of its group (the rows of k_proj and v_proj,
and their biases where the model has them, e.g. Qwen2), and config.json gets
num_key_value_heads = num_attention_heads and an explicit head_dim. The pruner removes the same
number of query heads from every KV group, so on a GQA model with few heads per group (SmolLM2-135M:
9 heads in 3 groups) small ratios never remove a head; the expanded copy lets them.

Streamed one decoder layer at a time (one shard per layer, plus embeddings and head), every tensor
keeps its dtype, and the output is written by the package's writer into OUT.partial and published
by the same rename as a prune's, so a crash leaves nothing half-written under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcpu_lite.checkpoint import CheckpointReader  # noqa: E402
from rcpu_lite.families import arch  # noqa: E402
from rcpu_lite.models import resolve_model  # noqa: E402
from rcpu_lite.output.checks import check_free_space, check_output  # noqa: E402
from rcpu_lite.output.fsutil import publish  # noqa: E402
from rcpu_lite.output.writer import ShardWriter  # noqa: E402

KV_TENSORS = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


class ExpandError(ValueError):
    pass


def repeat_kv_rows(tensor: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """Rows of a k/v projection (weight or bias) with KV head j repeated for query heads j*group .. j*group+group-1,
    the order in which transformers' repeat_kv pairs query heads with KV heads."""
    per_head = tensor.reshape(kv_heads, -1, *tensor.shape[1:])
    return per_head.repeat_interleave(group, dim=0).reshape(-1, *tensor.shape[1:])


def expand_kv(model: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the multi-head copy of the GQA checkpoint MODEL (a directory or a built-in name) into OUT."""
    model_dir = resolve_model(model)
    reader = CheckpointReader(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    arch.check_supported(config)
    shape = arch.layer_shape(config)
    heads, kv_heads = shape.num_attention_heads, shape.num_key_value_heads
    if kv_heads == heads:
        raise ExpandError(
            f"{model} already has multi-head attention ({heads} query heads, {kv_heads} KV heads); "
            f"there is nothing to expand"
        )
    if heads % kv_heads:
        raise ExpandError(f"{model} has {heads} query heads in {kv_heads} KV groups, which do not divide evenly")
    group = heads // kv_heads
    out = Path(out)
    work = check_output(out, model_dir, overwrite, resume=False)

    n_layers = config.num_hidden_layers
    names = arch.layer_tensor_names(config)
    final_names = arch.final_tensor_names(config)
    needed = [arch.EMBED, *final_names, *(arch.layer_prefix(i) + n for i in range(n_layers) for n in names)]
    reader.require(needed)
    nbytes = sum(
        torch.Size(reader.shape(n)).numel() * reader.dtype_bytes(n) * (group if n.endswith(KV_TENSORS) else 1)
        for n in needed
    )
    check_free_space(work, nbytes)
    skipped = sorted(set(reader.weight_map) - set(needed))
    if skipped:  # e.g. a tied lm_head stored anyway, or rotary buffers of old checkpoints: transformers drops them too
        more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
        print(f"not copied (not model weights transformers loads): {skipped[0]}{more}", file=sys.stderr)

    if work.exists():  # an earlier crash's (check_output refused it unless --overwrite)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        writer = ShardWriter(work, n_layers + 2)
        writer.write(0, {arch.EMBED: reader.get(arch.EMBED)})
        layers = reader.layers(names, [arch.layer_prefix(i) for i in range(n_layers)])
        for i in range(n_layers):
            tensors = next(layers)  # next(), not enumerate: the previous layer is freed before this one is read
            for name in KV_TENSORS:
                if name in tensors:
                    tensors[name] = repeat_kv_rows(tensors[name], kv_heads, group)
            writer.write(i + 1, {arch.layer_prefix(i) + k: v for k, v in tensors.items()})
            del tensors
        writer.write(n_layers + 1, {n: reader.get(n) for n in final_names})
        writer.finish()
        config_json = json.loads((model_dir / "config.json").read_text())
        config_json.update(num_key_value_heads=heads, head_dim=shape.head_dim)
        writer.write_json("config.json", config_json)
        writer.copy_side_files(model_dir)
        publish(work, out.resolve())
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no resume here: a crash leaves nothing behind
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "model", metavar="MODEL", help="a GQA checkpoint directory (safetensors) or a built-in name (smollm2-135m)"
    )
    ap.add_argument("--out", type=Path, required=True, help="the new checkpoint directory")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = ap.parse_args(argv)
    try:
        out = expand_kv(args.model, args.out, args.overwrite)
    except (ValueError, OSError) as e:  # the project's errors are ValueErrors (bad input) or OSErrors (disk)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(out)


if __name__ == "__main__":
    main()
