"""checkpoint: layer reads, with and without the background thread of the GPU path."""

from __future__ import annotations

import time

import torch

from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.families import arch


def test_background_reads_give_the_same_tensors_and_at_most_two_layers(tiny_checkpoint):
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=6)
    from transformers import AutoConfig

    names = arch.layer_tensor_names(AutoConfig.from_pretrained(src))
    prefixes = [arch.layer_prefix(i) for i in range(6)]
    plain, background = CheckpointReader(src), CheckpointReader(src)
    one_layer = sum(t.untyped_storage().nbytes() for t in CheckpointReader(src).get_many(names, prefixes[0]).values())
    direct = plain.layers(names, prefixes)
    ahead = background.layers(names, prefixes, background=True)
    for k in range(len(prefixes)):
        a, b = next(direct), next(ahead)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        if k + 1 < len(prefixes):  # the next layer is being read meanwhile: wait until it is in memory
            deadline = time.monotonic() + 30
            while background.live_bytes < 2 * one_layer and time.monotonic() < deadline:
                time.sleep(0.01)
            assert background.live_bytes == 2 * one_layer
        del a, b
    assert plain.peak_live_bytes == one_layer
    assert background.peak_live_bytes == 2 * one_layer  # the layer in use and the one being read
    assert plain.live_bytes == 0
