"""What pruning buys: CPU tokens per second (batch 1) and weight memory, dense against pruned.

    python tools/bench_inference.py [--model smollm2-135m] [--ratios 0.1 0.2 0.3] [--dir DIR] [--repeats 5]
    python tools/bench_inference.py --runtime llama.cpp --dense DIR --pruned NAME=DIR [NAME=DIR ...]
        [--types f32 q8_0 q4_k_m] [--threads 2]

llama.cpp (through llama-cpp-python): every checkpoint is exported with `rcpu-lite export` at each --type into
--dir/gguf (kept for the next call), then all files are loaded in one process and take turns in each round:
prompt processing of --prompt-tokens tokens from an empty cache, then --new-tokens greedy decode steps. The
table gives file sizes and medians, each with its ratio to the dense file of the same type.

Pruned checkpoints are made with the default method (rcpu score, rotation) and the bundled C4
calibration unless DIR already holds them. Prefill: one forward pass over a --prompt-tokens
prompt. Decode: greedy generation of --new-tokens tokens with the KV cache, less the prefill.
All models are loaded in one process and take turns in each of --repeats rounds; medians, as a
Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcpu_lite import calibration  # noqa: E402
from rcpu_lite.models import load_tokenizer, resolve_model  # noqa: E402
from rcpu_lite.prune.run import prune  # noqa: E402
from rcpu_lite.settings import PruneSettings  # noqa: E402


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def time_once(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Prefill and decode tokens per second of one run."""
    t0 = time.perf_counter()
    model(input_ids=prompt, use_cache=True)
    t1 = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    t2 = time.perf_counter()
    return prompt.shape[1] / (t1 - t0), new_tokens / max(1e-9, (t2 - t1) - (t1 - t0))


def measure(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, dict]:
    """Medians per model; the models take turns in every repeat, so a noisy spell hits them all alike."""
    runs = {name: [] for name in models}
    for model in models.values():
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=2, do_sample=False)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(time_once(model, prompt, new_tokens))
    return {
        name: {
            "params": sum(p.numel() for p in model.parameters()),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "prefill": statistics.median(r[0] for r in runs[name]),
            "decode": statistics.median(r[1] for r in runs[name]),
        }
        for name, model in models.items()
    }


def gguf_files(checkpoints: dict[str, Path], types: list[str], folder: Path) -> dict[tuple[str, str], Path]:
    """(name, type) -> the exported GGUF file, made once (an existing file is reused)."""
    from rcpu_lite.export import to_gguf

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, path in checkpoints.items():
        for type_ in types:
            file = folder / f"{Path(path).resolve().name}.{type_}.gguf"
            if not file.is_file():
                to_gguf(path, file, type=type_)
            files[(name, type_)] = file
    return files


def time_llama_cpp(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """Prompt and decode tokens per second of one run in llama.cpp (the KV cache emptied first)."""
    model.reset()
    model._ctx.kv_cache_clear()
    t0 = time.perf_counter()
    model.eval(prompt)
    t1 = time.perf_counter()
    import llama_cpp
    import numpy as np

    def last_argmax() -> int:
        logits = llama_cpp.llama_get_logits_ith(model._ctx.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(model.n_vocab(),)).argmax())

    token = last_argmax()
    for _ in range(new_tokens):
        model.eval([token])
        token = last_argmax()
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), new_tokens / (t2 - t1)


def measure_llama_cpp(files: dict, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> dict:
    import llama_cpp

    models = {
        key: llama_cpp.Llama(
            str(f), n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt), n_threads=threads, verbose=False
        )
        for key, f in files.items()
    }
    runs = {key: [] for key in models}
    for model in models.values():
        time_llama_cpp(model, prompt[:8], 2)  # warm-up
    for _ in range(repeats):
        for key, model in models.items():
            runs[key].append(time_llama_cpp(model, prompt, new_tokens))
    for model in models.values():
        model.close()
    return {
        key: {
            "bytes": files[key].stat().st_size,
            "prompt": statistics.median(r[0] for r in runs[key]),
            "decode": statistics.median(r[1] for r in runs[key]),
        }
        for key in models
    }


def llama_cpp_table(results: dict, dense: str) -> str:
    lines = [
        "| model | type | file MB (x dense) | prompt tok/s (x dense) | decode tok/s (x dense) |",
        "|---|---|---|---|---|",
    ]
    for (name, type_), r in results.items():
        base = results[(dense, type_)]
        lines.append(
            f"| {name} | {type_} | {r['bytes'] / 1e6:.1f} ({r['bytes'] / base['bytes']:.2f}) | {r['prompt']:.1f} "
            f"({r['prompt'] / base['prompt']:.2f}x) | {r['decode']:.1f} ({r['decode'] / base['decode']:.2f}x) |"
        )
    return "\n".join(lines)


def main_llama_cpp(args) -> None:
    dense = resolve_model(args.dense or args.model)
    checkpoints = {"dense": dense}
    for item in args.pruned:
        name, _, path = item.rpartition("=")  # the path is after the last "="
        checkpoints[name] = Path(path)
    files = gguf_files(checkpoints, args.types, args.dir / "gguf")
    text = calibration.evaluation_text(calibration.CALIBRATION_TEXTS["c4"])
    ids = calibration.tokenize(load_tokenizer(dense), text)[: args.prompt_tokens].tolist()
    results = measure_llama_cpp(files, ids, args.new_tokens, args.repeats, args.threads)
    print(
        f"\n{Path(str(dense)).name}, llama.cpp (llama-cpp-python), CPU, {args.threads} threads, batch 1, prompt "
        f"{len(ids)} tokens, {args.new_tokens} decode steps, medians of {args.repeats} rounds in turns\n"
    )
    print(llama_cpp_table(results, "dense"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", choices=["transformers", "llama.cpp"], default="transformers")
    ap.add_argument("--dense", default=None, help="llama.cpp: the dense checkpoint (default: --model)")
    ap.add_argument("--pruned", nargs="*", default=[], metavar="NAME=DIR", help="llama.cpp: pruned checkpoints")
    ap.add_argument("--types", nargs="+", default=["f32", "q8_0", "q4_k_m"], help="llama.cpp: GGUF types")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp: threads")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--dir", type=Path, default=Path("results/inference"))
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.runtime == "llama.cpp":
        return main_llama_cpp(args)
    dense = resolve_model(args.model)
    text = calibration.evaluation_text(calibration.CALIBRATION_TEXTS["c4"])
    prompt = calibration.tokenize(load_tokenizer(dense), text)[: args.prompt_tokens].unsqueeze(0)
    paths = {"dense": dense}
    for ratio in args.ratios:
        out = args.dir / f"{Path(str(args.model)).name}-rcpu{int(round(100 * ratio))}"
        if not (out / "config.json").is_file():
            prune(dense, out, PruneSettings(ratio=ratio, calib=args.calib, device="cpu"), overwrite=True)
        paths[f"rcpu rotation {int(round(100 * ratio))} %"] = out
    results = measure({name: load(path) for name, path in paths.items()}, prompt, args.new_tokens, args.repeats)
    rows = list(results.items())
    base = results["dense"]
    print(
        f"\n{args.model}, CPU, {torch.get_num_threads()} threads, batch 1, fp32, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, medians of {args.repeats}\n"
    )
    print("| model | parameters | weight memory | prefill tok/s | decode tok/s |\n|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['params'] / 1e6:.1f} M | {r['weight_bytes'] / 2**20:.0f} MiB | {r['prefill']:.0f} "
            f"({r['prefill'] / base['prefill']:.2f}x) | {r['decode']:.1f} ({r['decode'] / base['decode']:.2f}x) |"
        )


if __name__ == "__main__":
    main()
