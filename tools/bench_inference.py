"""What pruning buys: CPU tokens per second (batch 1) and weight memory, dense against pruned.

    python tools/bench_inference.py [--model smollm2-135m] [--ratios 0.1 0.2 0.3] [--dir DIR] [--repeats 5]

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--dir", type=Path, default=Path("results/inference"))
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
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
