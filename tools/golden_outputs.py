"""Golden outputs: prove that a refactor of rcpu_lite leaves every pruned checkpoint byte-identical.

`record` prunes a fixed set of input checkpoints (three tiny random ones, built here once, and a copy
of SmolLM2-135M) under a fixed set of configurations, and writes to OUT.json, for every run, the
sha256 of each output file (except rcpu_report.json) and the run report with its timing, memory and
path values set to null (keys and key order kept). Every run is a fresh process, so no run depends
on another's state; one configuration is killed by SIGKILL after two layers (RCPU_LITE_FAULT) and
resumed in another process. `compare` prints every difference between two records, one per line.

    PYTHONPATH=. python tools/golden_outputs.py record before.json --models /tmp/golden-models [--only tiny]
    # ... refactor ...
    PYTHONPATH=. python tools/golden_outputs.py record after.json --models /tmp/golden-models [--only tiny]
    python tools/golden_outputs.py compare before.json after.json   # exit 0: "identical: N runs"

Both records must use the same --models directory: the inputs are written there only when missing,
and their digests are part of the record (a changed input is reported as a difference).
Only the public API is used: prune() and PruneSettings, from their new or their old modules.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPORT = "rcpu_report.json"
# Report values that measure the machine or name a path, not what was computed: set to null.
VOLATILE = {
    "peak_memory_probe",
    "seconds",
    "rss_bytes",
    "wall_seconds",
    "peak_rss_bytes",
    "peak_gpu_bytes",
    "reconstruct_seconds",
    "peak_weight_bytes",
    "model_dir",
    "model",
}
# (name, model class, config) of the tiny inputs; all get SmolLM2's tokenizer (vocab 49152).
TINY = {
    "llama_mha": (
        "LlamaForCausalLM",
        dict(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=128,
            tie_word_embeddings=False,
        ),
    ),
    "llama_gqa": (
        "LlamaForCausalLM",
        dict(
            hidden_size=96,
            num_attention_heads=12,
            num_key_value_heads=2,
            intermediate_size=192,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2_gqa": (
        "Qwen2ForCausalLM",
        dict(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=128,
            tie_word_embeddings=True,
        ),
    ),
}
REAL = "smollm2-135m"
SAMPLING = {"tiny": dict(calib="wikitext2", nsamples=8, seqlen=32), "real": dict(calib="c4", nsamples=8, seqlen=64)}
COMMON = dict(holdout_nsamples=4, device="cpu")
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "compensate_auto": dict(compensate="auto"),
    "dense_block": dict(targets="dense", reconstruct="block", recon_epochs=1),
    "cross": dict(reconstruct="cross", recon_epochs=1),
    "adaptive": dict(allocation="adaptive"),
    "killed_resumed": {},  # the defaults, SIGKILLed after layer 2, then resumed
}
FAULT = "after_layer:2:kill"


def digests(directory: Path, skip: str = "") -> dict[str, str]:
    """sha256 of every file in `directory` (not below it) but `skip`."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != skip
    }


def build_models(models: Path, which: list[str]) -> dict[str, Path]:
    """The input checkpoints, written into `models` only when missing (so every record prunes the same files)."""
    models.mkdir(parents=True, exist_ok=True)
    smol = models / REAL
    if not (smol / "config.json").is_file():  # a private copy: the shared cache may be converted again
        from rcpu_lite.models import resolve_model

        shutil.copytree(resolve_model(REAL), smol.with_suffix(".tmp"), dirs_exist_ok=True)
        smol.with_suffix(".tmp").rename(smol)
    paths = {}
    for name in which:
        if name == REAL:
            paths[name] = smol
            continue
        out = models / name
        if not (out / "config.json").is_file():
            build_tiny(out, *TINY[name], tokenizer_dir=smol)
        paths[name] = out
    return paths


def build_tiny(out: Path, cls_name: str, shape: dict[str, Any], tokenizer_dir: Path) -> None:
    """A 4-layer random model of the given shape (fixed seed, std 0.15 so pruning matters) + SmolLM2's tokenizer."""
    import torch
    import transformers

    cls = getattr(transformers, cls_name)
    config = cls.config_class(
        vocab_size=49152, num_hidden_layers=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, **shape
    )
    torch.manual_seed(0)
    model = cls(config).to(torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / f).is_file():
            shutil.copy2(tokenizer_dir / f, tmp / f)
    tmp.rename(out)


BY_STAGE = {"seconds_by_stage", "peak_rss_by_stage", "peak_gpu_by_stage"}  # the stage names stay, not the values


def normalise(value: Any) -> Any:
    """The report without timings, memory and paths: those values become null; keys and their order stay."""
    if isinstance(value, dict):
        return {
            k: (
                {s: None for s in v}
                if k in BY_STAGE and isinstance(v, dict)
                else None
                if k in VOLATILE
                else normalise(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def child(spec: str) -> None:
    """One prune in this process (the `_run` subcommand); RCPU_LITE_FAULT comes from the environment."""
    try:
        from rcpu_lite.prune import prune
    except ImportError:
        from rcpu_lite.pipeline import prune
    try:
        from rcpu_lite.settings import PruneSettings
    except ImportError:
        from rcpu_lite.config import PruneSettings
    job = json.loads(spec)
    prune(job["model"], job["out"], PruneSettings(**job["settings"]), resume=job["resume"])


def run_child(job: dict[str, Any], fault: str | None = None) -> subprocess.CompletedProcess:
    """`job` pruned by a fresh Python process (this file's `_run`), offline, with RCPU_LITE_FAULT=fault if given."""
    env = {k: v for k, v in os.environ.items() if k != "RCPU_LITE_FAULT"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **({"RCPU_LITE_FAULT": fault} if fault else {}))
    return subprocess.run(
        [sys.executable, __file__, "_run", json.dumps(job)], env=env, capture_output=True, text=True, check=False
    )


def one_run(model: Path, kind: str, config: str, out: Path) -> dict[str, Any]:
    settings = {**COMMON, **SAMPLING[kind], **CONFIGS[config]}
    job = {"model": str(model), "out": str(out), "settings": settings, "resume": False}
    if config == "killed_resumed":
        proc = run_child(job, FAULT)
        partial = out.with_name(out.name + ".partial")
        if proc.returncode != -9 or out.exists() or not partial.is_dir():
            sys.exit(
                f"{out}: the run with RCPU_LITE_FAULT={FAULT} did not die by SIGKILL as expected "
                f"(exit {proc.returncode})\n{proc.stderr[-3000:]}"
            )
        job["resume"] = True
    proc = run_child(job)
    if proc.returncode != 0:
        sys.exit(f"{out}: prune failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
    report = json.loads((out / REPORT).read_text())
    return {"files": digests(out, skip=REPORT), "report": normalise(report)}


def record(args: argparse.Namespace) -> int:
    import torch

    import rcpu_lite

    names = {"tiny": list(TINY), "real": [REAL], "all": [*TINY, REAL]}[args.only]
    models = build_models(Path(args.models), names)
    work = Path(args.work or tempfile.mkdtemp(prefix="golden-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"rcpu_lite from {Path(rcpu_lite.__file__).parent}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; outputs under {work}",
        flush=True,
    )
    result: dict[str, Any] = {
        "meta": {
            "rcpu_lite": str(Path(rcpu_lite.__file__).parent),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "only": args.only,
            "seconds": {},
        },
        "inputs": {name: digests(path) for name, path in models.items()},
        "runs": {},
    }
    started = time.perf_counter()
    try:
        for name, path in models.items():
            for config in CONFIGS:
                key, t0 = f"{name}/{config}", time.perf_counter()
                out = work / name / config
                result["runs"][key] = one_run(path, "real" if name == REAL else "tiny", config, out)
                shutil.rmtree(out)
                seconds = round(time.perf_counter() - t0, 1)
                result["meta"]["seconds"][key] = seconds
                print(f"{key:32s} {seconds:7.1f}s", flush=True)
    finally:  # only what this command wrote (a --work directory may hold more)
        for name in models:
            shutil.rmtree(work / name, ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    for name in models:  # a property of the code, not of the refactor: worth knowing, not an error
        runs = result["runs"]
        if runs[f"{name}/killed_resumed"]["files"] != runs[f"{name}/defaults"]["files"]:
            print(f"note: {name}: the killed and resumed run's files differ from the uninterrupted run's")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: {len(result['runs'])} runs in {time.perf_counter() - started:.0f}s")
    return 0


def differences(a: Any, b: Any, where: str) -> list[str]:
    """Every difference between two JSON values, key order included (dicts), one line each."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: key order {list(a)} != {list(b)}"] if list(a) != list(b) and set(a) == set(b) else []
        out += [f"{where}/{k}: only in A" for k in a if k not in b]
        out += [f"{where}/{k}: only in B" for k in b if k not in a]
        return out + [d for k in a if k in b for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    # json.dumps: 1 != 1.0 and NaN == NaN, as the files write them
    return [] if json.dumps(a) == json.dumps(b) else [f"{where}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}"]


def compare(args: argparse.Namespace) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    for key in ("rcpu_lite", "torch", "threads"):
        if a["meta"].get(key) != b["meta"].get(key):
            print(f"note: meta/{key}: {a['meta'].get(key)} != {b['meta'].get(key)}")
    diffs = differences(a["inputs"], b["inputs"], "inputs") + differences(a["runs"], b["runs"], "runs")
    for line in diffs:
        print(line)
    if diffs:
        print(f"{len(diffs)} difference(s)")
        return 1
    print(f"identical: {len(a['runs'])} runs")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "_run":  # internal: one prune in a fresh process
        child(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="prune every input under every configuration; write the digests")
    rec.add_argument("out", help="the record to write (JSON)")
    rec.add_argument("--models", required=True, help="input checkpoints: built here when missing, else reused")
    rec.add_argument("--work", help="where the outputs go while they are hashed (default: a temporary directory)")
    rec.add_argument("--only", choices=("tiny", "real", "all"), default="all")
    cmp = sub.add_parser("compare", help="print every difference between two records; exit 1 if any")
    cmp.add_argument("a")
    cmp.add_argument("b")
    args = parser.parse_args()
    return record(args) if args.command == "record" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
