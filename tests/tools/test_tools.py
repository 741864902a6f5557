"""The benchmark and sweep tools still run against the current API (tiny models; they measure nothing here)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcpu_lite.prune.run import prune
from rcpu_lite.settings import PruneSettings

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_io_floor_reads_the_input_and_writes_the_output_again(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=2)
    out = tmp_path / "out"
    prune(src, out, PruneSettings(calib=str(calib_file), nsamples=4, seqlen=16, device="cpu"))
    read, write = load_tool("bench_speed").io_floor_seconds(src, out)
    assert read > 0 and write > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the floor's copy is cleaned up


def test_sweep_markdown_prints_recorded_rows_in_table_order(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    config = tmp_path / "sweep.toml"
    config.write_text(
        f'[sweep]\nmodel = "m"\ncalib = "c"\neval = "e"\nseqlen = 8\nnsamples = 2\nratios = [0.1, 0.2]\n'
        f'results = "{results}"\n[[sweep.method]]\nname = "rcpu, rotation"\nscore = "rcpu"\n'
        f'compensate = "rotation"\n'
    )
    rows = {
        "dense": dict(ratio=0.0, method="dense", ppl=10.0, eval_command="rcpu-lite eval m"),
        "rcpu-rotation-20": dict(
            ratio=0.2,
            method="rcpu, rotation",
            ppl=12.5,
            params=9e6,
            param_reduction=0.1,
            prune_seconds=3.0,
            prune_peak_rss_bytes=2**30,
            prune_command="rcpu-lite prune m",
            eval_command="rcpu-lite eval out",
        ),
    }
    for job, record in rows.items():
        (results / f"{job}.json").write_text(json.dumps(dict(job=job, **record)))
    text = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sweep.py"), str(config), "--markdown"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = text.splitlines()
    assert lines[2] == "| dense | 0 % | dense | 10.00 |  |  |"
    assert lines[3] == "| rcpu, rotation | 20 % | 9.0 M (10.0 % fewer) | 12.50 | 3 s | 1.00 GiB |"
    assert "# rcpu, rotation 20 %: PPL 12.50\nrcpu-lite prune m\nrcpu-lite eval out" in text
    assert "10 %" not in text  # rows not measured are not invented


def test_speed_benchmark_gives_each_of_n_processes_its_share_of_the_cores(tmp_path, monkeypatch):
    tool = load_tool("bench_speed")
    monkeypatch.setattr(tool, "cores", lambda: 4)
    args = argparse.Namespace(ratio=0.2, calib="c4", nsamples=512, seqlen=128)
    one, one_env = tool.prune_command(tmp_path / "m", tmp_path / "out", args, 1)
    two, two_env = tool.prune_command(tmp_path / "m", tmp_path / "out", args, 2)
    assert one[1:4] == ["-m", "rcpu_lite", "prune"] and one_env["OMP_NUM_THREADS"] == "4"
    assert two[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "2"] and two_env["OMP_NUM_THREADS"] == "2"
    assert one[one.index("prune") :] == two[two.index("prune") :]  # the same prune, only the launcher differs


@pytest.mark.parametrize("tool", ["bench_memory", "bench_speed", "bench_inference", "sweep", "make_synthetic"])
def test_tool_help(tool):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "usage" in result.stdout.lower()


def test_inference_benchmark_times_every_model_in_each_round(tiny_checkpoint):
    tool = load_tool("bench_inference")
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=2)
    models = {"dense": tool.load(src), "same again": tool.load(src)}
    results = tool.measure(models, torch.tensor([[1, 2, 3, 4, 5]]), new_tokens=3, repeats=2)
    assert list(results) == ["dense", "same again"]
    for r in results.values():
        assert r["prefill"] > 0 and r["decode"] > 0
        assert r["weight_bytes"] == 4 * r["params"]  # fp32


def test_memory_benchmark_prunes_in_a_fresh_process_with_the_flags_it_is_given(tiny_checkpoint, tmp_path):
    tool = load_tool("bench_memory")
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=2)
    args = argparse.Namespace(
        ratio=0.25,
        nsamples=4,
        seqlen=16,
        compensate="rotation",
        device="cpu",
        matmul="fp32",
        max_gpu_memory=None,
        prune_args="--compensate lstsq+bias --allocation depth",
    )
    report = tool.prune_once(src, tmp_path / "out", args)
    assert report["settings"]["ratio"] == 0.25 and report["device_name"] == "cpu"
    assert report["settings"]["compensate"] == "lstsq+bias" and report["settings"]["allocation"] == "depth"
    assert report["peak_rss_bytes"] > 0 and report["peak_gpu_bytes"] is None
    assert not (tmp_path / "out").exists()  # removed once measured


def test_sweep_table_shows_calibration_and_held_out_errors_where_reported():
    sweep = load_tool("sweep")
    layers = [{"block_error": 0.2, "held_out_block_error": 0.3}, {"block_error": 0.4, "held_out_block_error": 0.5}]
    errors = sweep.mean_errors(layers)
    assert errors == pytest.approx({"mean_block_error": 0.3, "mean_held_out_block_error": 0.4})
    rows = [dict(method="dense", ratio=0.0, ppl=10.0), dict(method="m", ratio=0.2, ppl=12.0, **errors)]
    lines = sweep.table(rows).splitlines()
    assert lines[0] == "| method | ratio | params | PPL | calib. error | held-out error | prune time | prune peak RSS |"
    assert lines[3] == "| m | 20 % | dense | 12.00 | 0.3000 | 0.4000 |  |  |"
    assert "error" not in sweep.table(rows[:1])  # older records without errors keep the old columns


def test_llama_cpp_benchmark_exports_once_and_times_every_file_in_each_round(tiny_checkpoint, tmp_path):
    from llama_cpp_run import llama_cpp

    llama_cpp()
    tool = load_tool("bench_inference")
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=2, tokenizer="bytelevel")
    files = tool.gguf_files({"dense": src, "again": src}, ["f32", "q8_0"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{src.name}.f32.gguf", f"{src.name}.q8_0.gguf"]
    results = tool.measure_llama_cpp(files, [1, 2, 3, 4, 5, 6], new_tokens=3, repeats=2, threads=1)
    assert list(results) == [("dense", "f32"), ("dense", "q8_0"), ("again", "f32"), ("again", "q8_0")]
    assert all(r["prompt"] > 0 and r["decode"] > 0 and r["bytes"] > 0 for r in results.values())
    table = tool.llama_cpp_table(results, "dense")
    assert table.count("\n") == 5 and "| dense | f32 |" in table


def test_sweep_method_may_set_its_own_calibration_seqlen_while_evaluation_keeps_the_sweeps():
    sweep = load_tool("sweep")
    config = {"model": "m", "calib": "c", "eval": "e", "seqlen": 128, "nsamples": 8, "ratios": [0.2], "results": "r"}
    config["method"] = [{"name": "long windows", "seqlen": 512, "nsamples": 32, "compensate": "lstsq"}]
    job = [j for j in sweep.jobs(config) if j["method"]][0]
    prune_cmd, eval_cmd, _ = sweep.commands(config, job, None)
    assert prune_cmd[prune_cmd.index("--seqlen") + 1] == "512" and prune_cmd.count("--seqlen") == 1
    assert prune_cmd[prune_cmd.index("--nsamples") + 1] == "32"
    assert eval_cmd[eval_cmd.index("--seqlen") + 1] == "128"
