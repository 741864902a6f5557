"""The input checkpoint as a prune run sees it: its reader, its compute config and the names of its tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.families import arch
from rcpu_lite.models import resolve_model
from rcpu_lite.output.chunked import ChunkedTensor


@dataclass
class Source:
    model_dir: Path
    reader: CheckpointReader
    cfg: PretrainedConfig  # arch.compute_config: sdpa, no cache
    names: list[str]  # one decoder layer's tensors, relative to its prefix
    final_names: list[str]  # after the last layer (final norm, an untied head)

    @classmethod
    def open(cls, model: str | Path) -> "Source":
        """Resolve MODEL, refuse an unsupported family and fail before any work if a tensor is missing."""
        model_dir = resolve_model(model)
        reader = CheckpointReader(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        arch.check_supported(config)
        cfg = arch.compute_config(config)
        source = cls(model_dir, reader, cfg, arch.layer_tensor_names(cfg), arch.final_tensor_names(cfg))
        reader.require(source.needed)
        return source

    @property
    def n_layers(self) -> int:
        return self.cfg.num_hidden_layers

    @property
    def shape(self) -> arch.LayerShape:
        return arch.layer_shape(self.cfg)

    @property
    def needed(self) -> list[str]:
        return [
            arch.EMBED,
            *self.final_names,
            *(arch.layer_prefix(i) + n for i in range(self.n_layers) for n in self.names),
        ]

    def params(self) -> int:
        """What the output stores too (a tied lm_head some checkpoints also store counts on neither side)."""
        return sum(torch.Size(self.reader.shape(n)).numel() for n in self.needed)

    def embedder(self, *token_ids: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """arch.embed for these token ids (and only these), from just the embedding rows they use: the embedding
        is never read whole (a 128k-token vocabulary in fp32 is 2 GB at 4096 wide)."""
        used = torch.unique(torch.cat([t.flatten() for t in token_ids if t is not None and t.numel()]))
        table = self.reader.rows(arch.EMBED, used)
        check_finite("embeddings", {arch.EMBED: table})
        return lambda ids: arch.embed(self.cfg, table, torch.searchsorted(used, ids))

    def chunked(self, name: str) -> ChunkedTensor:
        """The stored tensor `name` to copy to the output in row chunks, each checked for NaN/Inf as it passes."""

        def chunks():
            for chunk in self.reader.row_chunks(name):
                check_finite(name, {name: chunk})
                yield chunk
                del chunk  # not held while the next one is read

        return ChunkedTensor(self.reader.dtype_name(name), tuple(self.reader.shape(name)), chunks)

    def layers(self, indices: list[int], background: bool = False):
        """Each layer's stored tensors in turn (take them with next(); see CheckpointReader.layers)."""
        return self.reader.layers(self.names, [arch.layer_prefix(i) for i in indices], background=background)


def check_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(
                f"{what}: {name} contains NaN or Inf; the checkpoint is damaged or comes from a "
                f"diverged model: use an intact copy"
            )
