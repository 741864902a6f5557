"""tools/gpu_check.sh: the one-call GPU check. Its dry run (no GPU) prints the plan and runs the smallest prune."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_dry_run_prints_every_command_and_runs_the_smallest_on_the_cpu(tmp_path):
    proc = run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    commands = [line for line in lines if line.startswith("$ ")]
    assert len(commands) == 5 and all("llama-7b-4l" in c and "--nsamples 128" in c for c in commands)
    assert sum("--device cuda" in c for c in commands) == 4
    assert any("--max-gpu-memory 11GiB" in c and "--seqlen 2048" in c for c in commands)
    assert any("--decomposition-device cuda" in c for c in commands) and any("--matmul tf32" in c for c in commands)
    result = next(line for line in lines if line.startswith("cpu "))
    assert "s/layer" in result and "RSS peak" in result and "decomposition" in result
    assert (tmp_path / "out" / "pruned-cpu" / "rcpu_report.json").is_file()
    assert (tmp_path / "out" / "gpu_check.log").read_text() == proc.stdout  # everything is kept under $OUT


def test_without_a_gpu_the_full_check_refuses_in_one_line(tmp_path):
    proc = run(tmp_path, "--skip-tests")
    assert proc.returncode == 2
    assert "no CUDA device: run with --dry-run" in proc.stdout  # tee: stderr goes to the log too
