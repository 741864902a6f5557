"""Data parallelism over calibration windows (rcpu_lite/distributed.py): two gloo processes on the CPU.

Two processes must give one process's result: the same kept units, weights within fp32 rounding
(their sums are added in another order). The launcher path (`python -m torch.distributed.run
--nproc-per-node 2 -m rcpu_lite prune ...`) runs once; the other runs fork the test process (no
second import of torch) and call prune() with the environment torchrun would set.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from helpers import assert_same_output, cli_args, make_settings
from safetensors.torch import load_file
from typer.testing import CliRunner

from rcpu_lite import distributed
from rcpu_lite.cli import app
from rcpu_lite.output.manifest import MANIFEST_NAME
from rcpu_lite.prune.run import REPORT_NAME, _check_split, prune

RTOL = 1e-4  # of a tensor's largest entry: fp32 sums added in another order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _rank(rank: int, world: int, port: int, env: dict[str, str], model: Path, out: Path, settings, resume: bool):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **env,
    )
    try:
        prune(model, out, settings, resume=resume)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)  # not pytest's exit handlers: this is a forked copy of the test process


def run_ranks(
    model: Path, out: Path, settings, resume: bool = False, world: int = 2, timeout: float = 60, **env: str
) -> list[int]:
    """prune() in `world` forked processes, as torchrun would start them; their exit codes. As torchrun does,
    when one process fails the others are stopped."""
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, env, model, out, settings, resume)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return [p.exitcode for p in procs]


def assert_matches(single: Path, parallel: Path) -> None:
    """The same kept units in every layer; the same tensors within fp32 rounding; the same errors."""
    a, b = (json.loads((d / REPORT_NAME).read_text()) for d in (single, parallel))
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["calibration_tokens"] == b["calibration_tokens"]
    for la, lb in zip(a["layers"], b["layers"], strict=True):
        for key in ("kept_heads", "kept_kv_heads", "kept_channels", "o_proj_method", "down_proj_method"):
            assert la[key] == lb[key], key
        for key in ("block_error", "held_out_block_error", "o_proj_error_compensated", "down_proj_error_compensated"):
            assert la[key] == pytest.approx(lb[key], rel=1e-4), key
    shards = sorted(p.name for p in single.glob("*.safetensors"))
    assert shards == sorted(p.name for p in parallel.glob("*.safetensors"))
    for name in shards:
        x, y = load_file(single / name), load_file(parallel / name)
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] - y[k]).abs().max() <= RTOL * x[k].abs().max(), k


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama_gqa", num_hidden_layers=3)


@pytest.fixture(scope="module")
def single(model, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    prune(model, out, make_settings(calib_file))
    return out


@pytest.fixture(scope="module")
def launched(model, calib_file, tmp_path_factory):
    """`torchrun --nproc-per-node 2 -m rcpu_lite prune ...` (torch.distributed.run is torchrun)."""
    out = tmp_path_factory.mktemp("launched") / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "rcpu_lite",
        *cli_args(model, out, calib_file),
    ]
    proc = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def test_torchrun_with_two_processes_matches_one_process(single, launched):
    out, stderr = launched
    assert_matches(single, out)
    assert stderr.count("layer 3/3") == 1  # rank 0 reports; rank 1 is quiet
    assert not (out.parent / "out.partial").exists()


def test_rank_one_killed_after_a_layer_leaves_a_run_that_resumes_to_the_same_output(
    model, calib_file, launched, tmp_path
):
    out, settings = tmp_path / "out", make_settings(calib_file)
    codes = run_ranks(model, out, settings, RCPU_LITE_FAULT="after_layer:1:kill:1")
    assert codes[1] == -signal.SIGKILL and codes[0] != 0
    manifest = json.loads((tmp_path / "out.partial" / MANIFEST_NAME).read_text())
    assert sorted(map(int, manifest["shards"])) == [0, 1]  # the embeddings and layer 1, written by rank 0
    assert not out.exists()
    assert run_ranks(model, out, settings, resume=True) == [0, 0]
    assert json.loads((out / REPORT_NAME).read_text())["resumed_at_layer"] == 1
    assert_same_output(launched[0], out)  # byte for byte: each rank rebuilds its share of the hidden states


def test_dense_targets_auto_and_block_reconstruction_match_one_process(model, calib_file, tmp_path):
    # One optimiser step per epoch on every window (8 in one process; 4 per rank, gradients averaged) is the
    # same step; the paired statistics (output_cross) and auto's held-out refit are summed over the ranks.
    common = dict(targets="dense", compensate="auto", reconstruct="block", recon_epochs=2)
    prune(model, tmp_path / "one", make_settings(calib_file, recon_micro_batch=8, **common))
    assert run_ranks(model, tmp_path / "two", make_settings(calib_file, recon_micro_batch=4, **common)) == [0, 0]
    assert_matches(tmp_path / "one", tmp_path / "two")


def test_cross_block_window_pending_at_a_kill_resumes_with_every_ranks_targets(model, calib_file, tmp_path):
    # Layer 2 waits for its second window when rank 1 dies; its side file holds both ranks' local targets.
    common = dict(reconstruct="cross", recon_epochs=2)
    prune(model, tmp_path / "one", make_settings(calib_file, recon_micro_batch=8, **common))
    two = make_settings(calib_file, recon_micro_batch=4, **common)
    assert run_ranks(model, tmp_path / "two", two, RCPU_LITE_FAULT="after_layer:2:kill:1")[1] == -signal.SIGKILL
    assert (tmp_path / "two.partial" / "rcpu_pending-00001.safetensors").is_file()
    assert run_ranks(model, tmp_path / "two", two, resume=True) == [0, 0]
    assert_matches(tmp_path / "one", tmp_path / "two")


def test_generated_windows_and_adaptive_widths_over_an_uneven_split_match_one_process(
    model, calib_file, tmp_path, monkeypatch
):
    # 8 real + 3 generated windows: rank 0 takes 6 real ones, rank 1 2 real and 3 generated; the scores and
    # the adaptive allocation's scoring pass use the real ones only, summed over both ranks.
    settings = make_settings(calib_file, self_nsamples=3, allocation="adaptive")
    monkeypatch.setenv("RCPU_LITE_CACHE", str(tmp_path / "cache-one"))
    prune(model, tmp_path / "one", settings)
    cache = tmp_path / "cache-two"
    assert run_ranks(model, tmp_path / "two", settings, RCPU_LITE_CACHE=str(cache)) == [0, 0]
    assert len(list(cache.rglob("*.jsonl"))) == 1  # generated once, by rank 0
    assert_matches(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("n", [3, 7, 8, 13])
def test_windows_split_contiguously_in_rank_order(n):
    parts = [range(n)[distributed.Group(r, 3).share(n)] for r in range(3)]
    assert [i for part in parts for i in part] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_splits_the_ranks_cannot_share_are_refused_before_any_work(calib_file):
    two = distributed.Group(0, 2)
    with pytest.raises(ValueError, match="divisible by 2"):
        _check_split(make_settings(calib_file, nsamples=9, reconstruct="block"), two)
    with pytest.raises(ValueError, match="at least one window per process"):
        _check_split(make_settings(calib_file, nsamples=1), two)
    _check_split(make_settings(calib_file, nsamples=9), two)  # uneven is fine without reconstruction


def test_one_process_starts_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.from_env(torch.device("cpu")) is distributed.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.from_env(torch.device("cpu")) is distributed.SINGLE


@pytest.mark.parametrize("command", [["eval", "x", "--ppl", "wikitext2"], ["generate", "x", "hi"]])
def test_other_commands_refuse_to_run_under_a_launcher(command, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2
    assert "runs in one process" in result.stderr and "torchrun" in result.stderr
