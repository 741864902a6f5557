"""output/chunked.py: a safetensors file written chunk by chunk is byte for byte save_file's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rcpu_lite.output.chunked import ChunkedTensor, as_chunked, write_chunked


def chunked(t: torch.Tensor, rows: int) -> ChunkedTensor:
    return ChunkedTensor(as_chunked(t).dtype, tuple(t.shape), lambda: iter(t.split(rows)))


@pytest.mark.parametrize(
    "tensors",
    [
        {"model.embed_tokens.weight": torch.randn(37, 8)},
        {"lm_head.weight": torch.randn(37, 8).bfloat16(), "model.norm.weight": torch.ones(8).bfloat16()},
        {  # mixed dtypes: the header lists the widest kinds first, then by name
            "b": torch.randn(5, 3).half(),
            "a": torch.randn(9, 2),
            "c": torch.arange(6).reshape(3, 2),
            "d": torch.randn(4, 4).bfloat16(),
            "e": torch.randn(3).double(),
            "f": torch.zeros(0, 4),
            "é": torch.ones(2, dtype=torch.bool),
        },
    ],
)
def test_chunked_file_is_save_files_bytes(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "whole.safetensors"), metadata={"format": "pt"})
    write_chunked(tmp_path / "chunked.safetensors", {k: chunked(v, 2) for k, v in tensors.items()}, {"format": "pt"})
    assert (tmp_path / "chunked.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


def test_chunks_that_do_not_match_the_declared_tensor_are_refused(tmp_path):
    t = torch.randn(4, 2)
    short = ChunkedTensor("F32", (4, 2), lambda: iter([t[:3]]))
    with pytest.raises(ValueError, match="held 24 bytes, 32 were expected"):
        write_chunked(tmp_path / "x.safetensors", {"x": short}, {"format": "pt"})
    wrong = ChunkedTensor("F32", (4, 2), lambda: iter([t.half()]))
    with pytest.raises(ValueError, match="a chunk of dtype torch.float16 in a F32 tensor"):
        write_chunked(tmp_path / "x.safetensors", {"x": wrong}, {"format": "pt"})
