"""Run a grid of prune + perplexity jobs from a TOML file and print a Markdown table.

    python tools/sweep.py configs/table-smollm2.toml [--max-windows K] [--only NAME]

Each job runs the real command line in a subprocess (so peak RSS is per job) and leaves
RESULTS/<job>.json; finished jobs are skipped on the next call, so the sweep can be resumed.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcpu_lite.settings import tomllib  # noqa: E402  (tomli on Python 3.10)


def run(cmd: list[str]) -> str:
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"command failed with exit code {proc.returncode}: {shlex.join(cmd)}")
    return proc.stdout


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# Keys of a [[sweep.method]] table that are not prune options.
JOB_KEYS = ("name", "model", "ratios", "nsamples", "seqlen")


def jobs(sweep: dict) -> list[dict]:
    """A dense row per model used, then every method at each of its ratios (the sweep's unless it has its own).

    A method table names any prune options (score, compensate, damp_abs, allocation, target_params, ...);
    it may also override the model, the ratios, nsamples and seqlen (of the calibration windows only).
    """
    out, models = [], []
    for method in sweep["method"]:
        model = method.get("model", sweep["model"])
        if model not in models:
            models.append(model)
            name = "dense" if model == sweep["model"] else f"dense-{slug(Path(model).name)}"
            out.append({"name": name, "ratio": 0.0, "method": None, "model": model})
    for method in sweep["method"]:
        for ratio in method.get("ratios", sweep["ratios"]):
            out.append(
                {
                    "name": f"{slug(method['name'])}-{int(round(ratio * 100))}",
                    "ratio": ratio,
                    "method": method,
                    "model": method.get("model", sweep["model"]),
                }
            )
    return out


def commands(sweep: dict, job: dict, max_windows: int | None) -> tuple[list[str] | None, list[str], Path | None]:
    """The prune command (None for a dense row), the eval command, and the pruned checkpoint's path."""
    prune_cmd, ckpt, model = None, None, job["model"]
    if job["method"]:
        method = job["method"]
        ckpt = Path(sweep["results"]) / "checkpoints" / job["name"]
        prune_cmd = [
            "rcpu-lite",
            "prune",
            model,
            "--out",
            str(ckpt),
            "--ratio",
            str(job["ratio"]),
            "--calib",
            sweep["calib"],
            "--nsamples",
            str(method.get("nsamples", sweep["nsamples"])),
            "--seqlen",
            str(method.get("seqlen", sweep["seqlen"])),  # the calibration windows' (evaluation keeps the sweep's)
        ]
        for key, value in method.items():
            if key not in JOB_KEYS:
                prune_cmd += [f"--{key.replace('_', '-')}", str(value)]
        prune_cmd += ["--overwrite", "--quiet"]
        model = str(ckpt)
    eval_cmd = [
        "rcpu-lite",
        "eval",
        model,
        "--ppl",
        sweep["eval"],
        "--seqlen",
        str(sweep["seqlen"]),
        "--json",
        "--quiet",
    ]
    windows = max_windows or sweep.get("max_windows")
    if windows:
        eval_cmd += ["--max-windows", str(windows)]
    return prune_cmd, eval_cmd, ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows (quick look)")
    ap.add_argument("--only", default=None, help="run only jobs whose name contains this")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep the pruned checkpoints")
    ap.add_argument(
        "--markdown",
        action="store_true",
        help="run nothing: print the table and the commands of the recorded rows (for docs/methods.md)",
    )
    args = ap.parse_args()
    sweep = tomllib.loads(args.config.read_text())["sweep"]
    results = Path(sweep["results"])
    results.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "rcpu_lite.cli"]
    rows = []
    if args.markdown:
        recorded = [json.loads(p.read_text()) for job in jobs(sweep) if (p := results / f"{job['name']}.json").exists()]
        print(table(recorded) + "\n\n```\n" + "\n".join(commands_block(r) for r in recorded) + "\n```")
        return
    for job in jobs(sweep):
        if args.only and args.only not in job["name"]:
            continue
        prune_cmd, eval_cmd, ckpt = commands(sweep, job, args.max_windows)
        record_path = results / f"{job['name']}.json"
        if record_path.exists():
            old = json.loads(record_path.read_text())
            # Reuse a result only if it was made by exactly these commands (settings live in them).
            if old.get("prune_command") == (shlex.join(prune_cmd) if prune_cmd else None) and old.get(
                "eval_command"
            ) == shlex.join(eval_cmd):
                rows.append(old)
                continue
        record = {
            "job": job["name"],
            "ratio": job["ratio"],
            "model": job["model"],
            "method": job["method"]["name"] if job["method"] else job["name"],
        }
        if prune_cmd:
            run(exe + prune_cmd[1:])
            report = json.loads((ckpt / "rcpu_report.json").read_text())
            record.update(
                prune_command=shlex.join(prune_cmd),
                prune_seconds=report["wall_seconds"],
                prune_peak_rss_bytes=report["peak_rss_bytes"],
                params=report["params_after"],
                param_reduction=report["param_reduction"],
                shape_after=report["shape_after"],
                **mean_errors(report["layers"]),
            )
        result = json.loads(run(exe + eval_cmd[1:]).strip().splitlines()[-1])
        record.update(
            eval_command=shlex.join(eval_cmd),
            ppl=result["ppl"],
            eval_tokens=result["tokens"],
            eval_seconds=result["seconds"],
        )
        if ckpt and not args.keep_checkpoints:
            shutil.rmtree(ckpt)
        if not args.max_windows:  # quick looks (--max-windows) are not recorded as results
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        rows.append(record)
        print(json.dumps({k: record[k] for k in ("job", "ppl")}), flush=True)
    print(table(rows))


def commands_block(record: dict) -> str:
    head = f"# {record['method']} {int(round(100 * record['ratio']))} %: PPL {record['ppl']:.2f}"
    return "\n".join([head] + [record[k] for k in ("prune_command", "eval_command") if k in record])


ERROR_COLUMNS = {"mean_block_error": "calib. error", "mean_held_out_block_error": "held-out error"}


def mean_errors(layers: list[dict]) -> dict:
    """The mean over layers of the block's relative error on calibration and held-out windows (where reported)."""
    out = {}
    for key, layer_key in (("mean_block_error", "block_error"), ("mean_held_out_block_error", "held_out_block_error")):
        values = [layer[layer_key] for layer in layers if layer.get(layer_key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out


def table(rows: list[dict]) -> str:
    errors = [k for k in ERROR_COLUMNS if any(k in r for r in rows)]  # columns only where some run reported them
    head = ["method", "ratio", "params", "PPL", *(ERROR_COLUMNS[k] for k in errors), "prune time", "prune peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f} M ({100 * r['param_reduction']:.1f} % fewer)" if "params" in r else "dense"
        prune_time = f"{r['prune_seconds']:.0f} s" if "prune_seconds" in r else ""
        rss = f"{r['prune_peak_rss_bytes'] / 2**30:.2f} GiB" if "prune_peak_rss_bytes" in r else ""
        cells = [
            r["method"],
            f"{int(round(100 * r['ratio']))} %",
            params,
            f"{r['ppl']:.2f}",
            *(f"{r[k]:.4f}" if k in r else "" for k in errors),
            prune_time,
            rss,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
