"""The GGUF types `rcpu-lite export --type` writes: one entry each.

gguf-py writes f32, f16, bf16 and q8_0 itself. It cannot make the K-quants, so those are made by llama.cpp's
own quantiser (llama_model_quantize, through llama-cpp-python) from a lossless GGUF written first.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class GgufType:
    name: str
    help: str
    file_type: F
    matrix: Q | None  # the type of 2-D weights gguf-py writes; None: llama.cpp's quantiser decides
    block: int  # a matrix row must be a multiple of this to be quantised (else llama.cpp keeps it F16)

    @property
    def needs_llama_cpp(self) -> bool:
        return self.matrix is None


GGUF_TYPES = {
    t.name: t
    for t in (
        GgufType("f32", "32-bit floats: exact, 4 bytes a weight", F.ALL_F32, Q.F32, 1),
        GgufType("f16", "16-bit floats (the converter's default), 2 bytes a weight", F.MOSTLY_F16, Q.F16, 1),
        GgufType("bf16", "bfloat16, 2 bytes a weight", F.MOSTLY_BF16, Q.BF16, 1),
        GgufType("q8_0", "8-bit blocks of 32, about 1.06 bytes a weight", F.MOSTLY_Q8_0, Q.Q8_0, 32),
        GgufType("q4_k_m", "4-bit K-quant, mixed (llama.cpp's quantiser)", F.MOSTLY_Q4_K_M, None, 256),
        GgufType("q5_k_m", "5-bit K-quant, mixed (llama.cpp's quantiser)", F.MOSTLY_Q5_K_M, None, 256),
        GgufType("q6_k", "6-bit K-quant (llama.cpp's quantiser)", F.MOSTLY_Q6_K, None, 256),
    )
}
