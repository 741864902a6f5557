"""Block-wise (BR) and cross-block (CR) reconstruction of compact decoder layers by gradient descent.

After selection and closed-form compensation, the remaining weights of one decoder layer ("block"),
or of a window of adjacent layers, are trained to reproduce a target output on the calibration
windows (Shin et al., "Rethinking Pruning Large Language Models", EMNLP 2024, arXiv 2406.15524;
docs/methods.md). The target decides the propagation: the dense block on the pruned stream's
inputs is local propagation (LP); the dense block on the dense stream's inputs is global (GP).
This module only trains; the caller chooses the inputs and the targets.

The layers are compact (built by `arch.build_layer` from the kept units' tensors), so a pruned head
or channel has no weights at all and cannot come back: training changes values, never shapes.

Memory: the layers, their gradients and AdamW's two moments of the trained parameters, and one
micro-batch's activations. `inputs` and `targets` are only ever read a micro-batch at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PretrainedConfig

from rcpu_lite.distributed import SINGLE, Group
from rcpu_lite.families import arch
from rcpu_lite.methods.metrics import relative_error
from rcpu_lite.runtime import cuda_matmul_precision

__all__ = ["Block", "ReconstructOptions", "ReconstructResult", "reconstruct", "block_error", "trainable_parameters"]

# One decoder layer with the config of its own widths and its index in the model.
Block = tuple[torch.nn.Module, PretrainedConfig, int]


@dataclass(frozen=True)
class ReconstructOptions:
    """How the compact block(s) are trained. The defaults are the paper's BR settings.

    The paper (and its code, LOG-postech/rethinking-LLM-pruning, configs/llama.py) trains with AdamW,
    lr 2e-4, betas (0.9, 0.95), eps 1e-8, weight decay 0.0, batch 8, 5 epochs and a learning rate that
    decays linearly to zero with no warm-up; its gradient clipping (max norm 1000) never binds and is
    left out here. Differences from that code: it trains every non-mask parameter, RMSNorm weights
    included (here `train_norms=True`), and runs under CUDA autocast (fp16) with a grad scaler;
    here everything is fp32.
    """

    epochs: int = 5
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0  # AdamW's decoupled decay; the paper's code uses 0.0
    eps: float = 1e-8
    micro_batch: int = 8  # windows per optimiser step (the paper's batch size; no accumulation)
    train: Literal["all", "out"] = "all"  # "out": only o_proj and down_proj (weights and biases)
    train_norms: bool = False  # also train the RMSNorm weights
    schedule: Literal["linear", "constant"] = "linear"  # linear: lr decays to 0 over all steps (paper)
    seed: int = 0  # of the window order, reshuffled every epoch

    def validate(self) -> "ReconstructOptions":
        if self.epochs < 0:
            raise ValueError(f"reconstruction epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"reconstruction lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"reconstruction betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or not self.eps > 0:
            raise ValueError("reconstruction weight_decay must be >= 0 and eps > 0")
        if self.micro_batch < 1:
            raise ValueError(f"reconstruction micro_batch must be >= 1, got {self.micro_batch}")
        if self.train not in ("all", "out"):
            raise ValueError(f"reconstruction train must be 'all' or 'out', got {self.train!r}")
        if self.schedule not in ("linear", "constant"):
            raise ValueError(f"reconstruction schedule must be 'linear' or 'constant', got {self.schedule!r}")
        return self


@dataclass(frozen=True)
class ReconstructResult:
    """Losses are the mean squared error over all elements of all training windows (the objective);
    errors are ||out - target||_F / ||target||_F over the same windows (what block_error gives)."""

    loss_before: float
    loss_after: float
    error_before: float
    error_after: float
    epoch_losses: tuple[float, ...]  # mean training loss of each epoch (weights moving within it)
    seconds: float
    steps: int  # optimiser steps
    trained_params: int  # number of trained scalars


def trainable_parameters(
    layer: torch.nn.Module, train: str = "all", train_norms: bool = False
) -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs of one decoder layer that reconstruction trains.

    Linear weights and biases: all of them, or with train="out" only o_proj's and down_proj's.
    Every other parameter of these layers is an RMSNorm weight: trained only with train_norms.
    """
    out_modules = set(arch.PROJECTIONS.values())
    chosen = []
    for module_name, module in layer.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.Linear):
                keep = train == "all" or module_name in out_modules
            else:
                keep = train_norms
            if keep:
                chosen.append((f"{module_name}.{name}", p))
    return chosen


def _forward(blocks: Sequence[Block], hidden: torch.Tensor, inputs: arch.LayerInputs) -> torch.Tensor:
    for layer, config, index in blocks:
        hidden = arch.run_layer(layer, hidden, inputs, config, index)
    return hidden


def _squared_errors(
    blocks: Sequence[Block],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    layer_inputs: arch.LayerInputs,
    micro_batch: int,
    device: torch.device,
) -> tuple[float, float]:
    """sum((out - target)^2) and sum(target^2) over all windows, accumulated in fp64 (no grad)."""
    err = torch.zeros((), dtype=torch.float64, device=device)
    ref = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, inputs.shape[0], micro_batch):
            x = inputs[start : start + micro_batch].to(device, torch.float32, non_blocking=True)
            y = targets[start : start + micro_batch].to(device, torch.float64, non_blocking=True)
            out = _forward(blocks, x, layer_inputs).double()
            err += (out - y).pow(2).sum()
            ref += y.pow(2).sum()
    return err.item(), ref.item()


def _check(blocks: Sequence[Block], inputs: torch.Tensor, targets: torch.Tensor) -> None:
    if not blocks:
        raise ValueError("reconstruction needs at least one layer")
    if inputs.dim() != 3 or inputs.shape != targets.shape or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs and targets must both be windows x seqlen x hidden with at least one window, "
            f"got {tuple(inputs.shape)} and {tuple(targets.shape)}"
        )


def _device(blocks: Sequence[Block], device: torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return next(blocks[0][0].parameters()).device


def block_error(
    blocks: Sequence[Block],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    layer_inputs: arch.LayerInputs,
    micro_batch: int,
    device: torch.device | None = None,
    group: Group = SINGLE,
) -> float:
    """||blocks(inputs) - targets||_F / ||targets||_F over all windows, accumulated in fp64.

    The layers run in order on `device` (default: that of the first layer's parameters) in
    micro-batches, under inference mode; `inputs` and `targets` may live on the host. With a group,
    the windows are this rank's share and the sums are taken over every rank's.
    """
    _check(blocks, inputs, targets)
    device = _device(blocks, device)
    with torch.inference_mode():
        return relative_error(
            *group.sum_floats(_squared_errors(blocks, inputs, targets, layer_inputs, micro_batch, device))
        )


def _average_gradients(params: list[torch.nn.Parameter], group: Group) -> None:
    """DistributedDataParallel's rule: each gradient becomes the mean of the ranks' (fixed order: deterministic)."""
    if group.world > 1:
        grads = [p.grad for p in params if p.grad is not None]
        group.all_reduce(grads)
        for g in grads:
            g.div_(group.world)


def _autograd_ready(t: torch.Tensor | None) -> torch.Tensor | None:
    """Inference tensors cannot be saved for backward: a (small) normal copy of one that is."""
    return t.clone() if t is not None and t.is_inference() else t


def _release_inference_parameters(layer: torch.nn.Module) -> None:
    """A parameter held as an inference tensor can neither require grad, nor be updated, nor (frozen) be
    saved for backward outside inference mode: replace each by a normal copy in its module (the
    caller's tensor is then left as it was)."""
    for module in layer.modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            if p.is_inference():
                setattr(module, attr, torch.nn.Parameter(p.detach().clone(), requires_grad=False))


def reconstruct(
    blocks: Sequence[Block],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    layer_inputs: arch.LayerInputs,
    options: ReconstructOptions = ReconstructOptions(),
    device: torch.device | None = None,
    matmul: str = "ieee",
    log: Callable[[str], None] | None = None,
    group: Group = SINGLE,
) -> ReconstructResult:
    """Train the chosen weights of `blocks`, run in order, so that their output on `inputs` matches `targets`.

    blocks: [(layer, config, index)], one decoder layer for block-wise reconstruction, two adjacent
        ones for a cross-block window (layer a then layer b, each with its own config and index).
    inputs, targets: windows x seqlen x hidden, fp32, on the compute device or on the host (copied
        over a micro-batch at a time). The targets are the outputs after the last block.
    layer_inputs: arch.layer_inputs(config, seqlen, device, torch.float32); the same for every layer.
    matmul: fp32 matmul precision on CUDA ("ieee" or "tf32"), as runtime.Placement.matmul.
    log: called with one line per epoch.
    group: data parallelism (distributed.py): `inputs` and `targets` are this rank's share, every rank
        holds as many windows (so all take the same number of steps), and the gradients are averaged
        over the ranks before each step, as DistributedDataParallel does: one step sees
        world x micro_batch windows, so the result differs from one process's (fewer, larger steps).

    The objective is the mean squared error over all elements of a micro-batch; AdamW takes one
    step per micro-batch of `options.micro_batch` windows, in an order reshuffled every epoch by a
    generator seeded with `options.seed` (bit-for-bit repeatable on the CPU). The loss and the
    relative error before and after are measured on all the training windows.

    The layers are trained in place: read the result from them (`layer.state_dict()`), not from
    the dict they were built from, because a layer built under inference mode holds inference
    tensors, which are first replaced by copies (one layer's worth of extra memory while the caller
    keeps the originals; build the layers outside inference mode to avoid it). Works whether or not
    the caller runs under torch.inference_mode; every parameter is left with requires_grad False and
    no grad. A non-finite loss raises FloatingPointError; the weights are then those before the
    failing step (rebuild the layers to retry, e.g. with a lower lr).
    """
    options = options.validate()
    _check(blocks, inputs, targets)
    device = _device(blocks, device)
    mb = options.micro_batch
    started = time.perf_counter()
    try:
        with torch.inference_mode(False), torch.enable_grad(), cuda_matmul_precision(matmul):
            train_inputs = layer_inputs.map(_autograd_ready)
            params = _fp32_parameters(blocks, options)
            err, ref, numel = group.sum_floats(
                [*_squared_errors(blocks, inputs, targets, train_inputs, mb, device), inputs.numel()]
            )
            if not (math.isfinite(err) and math.isfinite(ref)):
                raise FloatingPointError("the block's output or its target is not finite before reconstruction")
            loss_before, error_before = err / numel, relative_error(err, ref)
            for p in params:
                p.requires_grad_(True)
            trainer = _Trainer(blocks, inputs, targets, train_inputs, options, params, device, group)
            epoch_losses = [trainer.epoch(epoch, log) for epoch in range(options.epochs)]
            del trainer.optimizer
            for p in params:
                p.requires_grad_(False)
            err, ref = group.sum_floats(_squared_errors(blocks, inputs, targets, train_inputs, mb, device))
    finally:
        for layer, _, _ in blocks:
            for p in layer.parameters():
                p.requires_grad_(False)
                p.grad = None
    return ReconstructResult(
        loss_before,
        err / numel,
        error_before,
        relative_error(err, ref),
        tuple(epoch_losses),
        round(time.perf_counter() - started, 4),
        trainer.step,
        sum(p.numel() for p in params),
    )


def _fp32_parameters(blocks: Sequence[Block], options: ReconstructOptions) -> list[torch.nn.Parameter]:
    """The parameters that train, freed of inference tensors; reconstruction trains fp32 weights only."""
    params = []
    for layer, _, _ in blocks:
        _release_inference_parameters(layer)
        params += [p for _, p in trainable_parameters(layer, options.train, options.train_norms)]
    for p in params:
        if p.dtype != torch.float32:
            raise ValueError(f"reconstruction trains fp32 weights, got a {p.dtype} parameter")
    return params


class _Trainer:
    """AdamW over micro-batches in an order reshuffled every epoch, the lr decaying linearly over all steps."""

    def __init__(
        self,
        blocks: Sequence[Block],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        train_inputs: arch.LayerInputs,
        options: ReconstructOptions,
        params: list[torch.nn.Parameter],
        device: torch.device,
        group: Group,
    ):
        self.blocks, self.inputs, self.targets, self.train_inputs = blocks, inputs, targets, train_inputs
        self.options, self.params, self.device, self.group = options, params, device, group
        self.optimizer = torch.optim.AdamW(
            params, lr=options.lr, betas=options.betas, eps=options.eps, weight_decay=options.weight_decay
        )
        self.generator = torch.Generator().manual_seed(options.seed)
        self.total_steps = options.epochs * -(-inputs.shape[0] // options.micro_batch)
        self.step = 0

    def epoch(self, epoch: int, log: Callable[[str], None] | None) -> float:
        """One pass over every window; returns the mean loss (over every rank's windows)."""
        options, n, mb = self.options, self.inputs.shape[0], self.options.micro_batch
        order = torch.randperm(n, generator=self.generator)
        total = 0.0
        for start in range(0, n, mb):
            idx = order[start : start + mb]
            x = self.inputs[idx.to(self.inputs.device)].to(self.device, torch.float32, non_blocking=True)
            y = self.targets[idx.to(self.targets.device)].to(self.device, torch.float32, non_blocking=True)
            total += self._step(x, y, epoch) * len(idx)
            del x, y
        total, seen = self.group.sum_floats([total, n])
        if log is not None:
            log(f"reconstruction epoch {epoch + 1}/{options.epochs}: loss {total / seen:.6g}")
        return total / seen

    def _step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> float:
        options = self.options
        if options.schedule == "linear":
            for param_group in self.optimizer.param_groups:
                param_group["lr"] = options.lr * (self.total_steps - self.step) / self.total_steps
        loss = torch.nn.functional.mse_loss(_forward(self.blocks, x, self.train_inputs), y)
        loss.backward()
        _average_gradients(self.params, self.group)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"reconstruction loss became {value} at epoch {epoch + 1}, step "
                f"{self.step + 1}; lower the learning rate (it is {options.lr:g})"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return value
