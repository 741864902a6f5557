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


def test_row_chunks_and_rows_read_the_embedding_in_pieces(tiny_checkpoint):
    src = tiny_checkpoint("llama_mha")
    reader = CheckpointReader(src)
    whole = CheckpointReader(src).get(arch.EMBED)
    row_bytes = whole[0].numel() * whole.element_size()
    chunks = list(reader.row_chunks(arch.EMBED, max_bytes=7 * row_bytes))
    assert [c.shape[0] for c in chunks[:-1]] == [7] * (len(chunks) - 1) and torch.equal(torch.cat(chunks), whole)
    one_at_a_time = CheckpointReader(src)
    for chunk in one_at_a_time.row_chunks(arch.EMBED, max_bytes=7 * row_bytes):
        del chunk  # as the writer takes them: one chunk alive at a time
    assert one_at_a_time.peak_live_bytes == 7 * row_bytes
    ids = torch.tensor([0, 3, 6, 7, 8, 100, whole.shape[0] - 1])  # on both sides of chunk borders
    assert torch.equal(reader.rows(arch.EMBED, ids, max_bytes=7 * row_bytes), whole[ids])


def test_rows_outside_the_vocabulary_are_refused_with_the_reason(tiny_checkpoint):
    reader = CheckpointReader(tiny_checkpoint("llama_mha"))
    vocab = reader.shape(arch.EMBED)[0]
    import pytest

    from rcpu_lite.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=f"has {vocab} rows: the token ids do not belong"):
        reader.rows(arch.EMBED, torch.tensor([1, vocab]))
