"""Memory of a prune run: the peak by stage in the report, and no whole copy of the embedding or the head."""

from __future__ import annotations

from helpers import make_settings

from rcpu_lite import checkpoint
from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.prune.run import prune

LAYER_STAGES = {"read", "statistics", "scores", "compensation", "propagate", "write"}
RUN_STAGES = {"start", "windows", "plan", "embeddings", "head", "finish"} | LAYER_STAGES


def test_the_report_gives_the_peak_memory_of_every_stage(tiny_checkpoint, calib_file, tmp_path):
    report = prune(tiny_checkpoint("llama_gqa", num_hidden_layers=2), tmp_path / "out", make_settings(calib_file))
    assert set(report["peak_rss_by_stage"]) == RUN_STAGES
    assert all(v > 0 for v in report["peak_rss_by_stage"].values())
    assert max(report["peak_rss_by_stage"].values()) <= report["peak_rss_bytes"]
    assert report["peak_gpu_by_stage"] is None and report["peak_memory_probe"] in ("high-water mark", "sampler")
    for layer in report["layers"]:
        assert set(layer["peak_rss_by_stage"]) == LAYER_STAGES and all(
            v > 0 for v in layer["peak_rss_by_stage"].values()
        )
        for stage, peak in layer["peak_rss_by_stage"].items():
            assert peak <= report["peak_rss_by_stage"][stage]


def test_the_embedding_and_the_head_are_never_whole_in_memory(tiny_checkpoint, calib_file, tmp_path, monkeypatch):
    """A 400k-token fp32 vocabulary on a tiny model: the embedding and the untied head (100 MB each) dwarf the
    layers. The reader hands out row chunks only, and no stage's RSS grows by half of either."""
    src = tiny_checkpoint("llama_mha", vocab_size=400_000)
    whole = 400_000 * 64 * 4
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 2 * 2**20)
    largest = []
    track = CheckpointReader._track
    monkeypatch.setattr(
        CheckpointReader, "_track", lambda self, t: (largest.append(t.numel() * t.element_size()), track(self, t))
    )
    report = prune(src, tmp_path / "out", make_settings(calib_file))
    assert max(largest) <= 2 * 2**20 and report["peak_weight_bytes"] < whole / 8
    peaks = report["peak_rss_by_stage"]
    assert peaks["embeddings"] < peaks["plan"] + whole / 2, peaks
    assert peaks["head"] < max(peaks[s] for s in LAYER_STAGES) + whole / 2, peaks
