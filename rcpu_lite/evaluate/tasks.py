"""Zero-shot accuracy through lm-evaluation-harness: `rcpu-lite eval --tasks`.

The model is loaded whole with rcpu-lite's own loader (so per-layer-width outputs need no trust_remote_code) and
handed to the harness as an HFLM object. Without a task directory the harness runs its own task configs, fetching
the datasets from the hub; with one, it runs the configs in task_configs/, which copy the harness's prompts,
choices, targets and metrics under names of their own (rcpu_<task>) and read local JSONL files instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rcpu_lite.evaluate.inspection import MissingExtra
from rcpu_lite.models import hub_offline, load_tokenizer, resolve_model
from rcpu_lite.runtime import pick_device

CONFIG_DIR = Path(__file__).resolve().parent / "task_configs"
EVAL_EXTRA_HINT = "pip install 'rcpu-lite[eval]'"
# The RCPU paper's seven tasks, by the harness's names: the split the harness evaluates and the fields a local file
# must have (the hub dataset's; for hellaswag those the harness's process_docs makes).
TASKS = {
    "boolq": ("validation", ("passage", "question", "label")),
    "piqa": ("validation", ("goal", "sol1", "sol2", "label")),
    "hellaswag": ("validation", ("query", "choices", "gold")),
    "winogrande": ("validation", ("sentence", "option1", "option2", "answer")),
    "arc_easy": ("test", ("question", "choices", "answerKey")),
    "arc_challenge": ("test", ("question", "choices", "answerKey")),
    "openbookqa": ("test", ("question_stem", "choices", "answerKey")),
}
LOCAL_PREFIX = "rcpu_"


class TaskError(ValueError):
    """A task list or task directory that cannot run (a one-line error, exit 2, on the command line)."""


@dataclass
class TaskScore:
    task: str  # the harness's name (arc_easy), also for the local configs
    n: int  # documents scored (after --limit)
    acc: float
    acc_stderr: float | None
    acc_norm: float | None  # None where the harness does not report it (boolq, winogrande)
    acc_norm_stderr: float | None


@dataclass
class TaskResults:
    model: str
    scores: list[TaskScore]
    limit: int | None
    task_dir: str | None
    seconds: float

    def mean(self) -> dict[str, float]:
        """Unweighted means over the tasks; acc_norm counts a task's acc where the harness reports no acc_norm
        (the usual 'average' of pruning papers' zero-shot tables)."""
        n = len(self.scores)
        return {
            "acc": sum(s.acc for s in self.scores) / n,
            "acc_norm": sum(s.acc if s.acc_norm is None else s.acc_norm for s in self.scores) / n,
        }

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "tasks": {
                s.task: {
                    "acc": s.acc,
                    "acc_stderr": s.acc_stderr,
                    "acc_norm": s.acc_norm,
                    "acc_norm_stderr": s.acc_norm_stderr,
                    "n": s.n,
                }
                for s in self.scores
            },
            "mean": self.mean(),
            "limit": self.limit,
            "task_dir": self.task_dir,
            "tasks_seconds": self.seconds,
        }


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'boolq,piqa' or a list: the task names, checked, in the order given, without repeats."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise TaskError(f"--tasks is empty; give some of: {', '.join(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise TaskError(f"unknown task {', '.join(unknown)}; the tasks are: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def require_harness() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MissingExtra(f"--tasks needs lm-evaluation-harness: {EVAL_EXTRA_HINT}") from None


def task_file(task_dir: Path, task: str) -> Path:
    """DIR/TASK/SPLIT.jsonl, or else the one DIR/TASK/SPLIT*.jsonl (a subset such as validation_subset1000...)."""
    split, fields = TASKS[task]
    folder = task_dir / task
    exact = folder / f"{split}.jsonl"
    if exact.is_file():
        return exact
    found = sorted(folder.glob(f"{split}*.jsonl"))
    if len(found) == 1:
        return found[0]
    if found:
        raise TaskError(f"{folder} holds several {split} files ({', '.join(p.name for p in found)}); keep one")
    raise TaskError(
        f"{exact} does not exist: --task-dir needs a folder per task holding the {split} split as JSONL "
        f"with the hub dataset's fields ({', '.join(fields)})"
    )


def check_fields(path: Path, task: str) -> None:
    """The first document has the fields the task's prompt reads (a missing one would fail deep in the harness)."""
    with path.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        doc = json.loads(first)
    except json.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        raise TaskError(f"{path}: the first line is not a JSON object")
    fields = TASKS[task][1]
    missing = [k for k in fields if k not in doc]
    if missing:
        processed = " (hellaswag's documents as the harness's process_docs leaves them)" if task == "hellaswag" else ""
        raise TaskError(f"{path} lacks the field(s) {', '.join(missing)}; {task} needs {', '.join(fields)}{processed}")


def check_tasks(
    tasks: str | Sequence[str], task_dir: str | os.PathLike | None = None, limit: int | None = None
) -> dict[str, Path | None]:
    """Task name -> its local file (None without `task_dir`: the harness fetches it from the hub). Every check that
    needs no model runs here, so a caller can fail before loading one."""
    if limit is not None and limit < 1:
        raise TaskError(f"--limit must be at least 1, got {limit}")
    names = parse_tasks(tasks)
    require_harness()
    if task_dir is None:
        if hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
            raise TaskError(
                "without --task-dir the harness fetches the task datasets from the Hugging Face hub, "
                "which is switched off here (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); give --task-dir DIR "
                "with the tasks as local JSONL files"
            )
        return dict.fromkeys(names)
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise TaskError(f"--task-dir {task_dir} is not a directory")
    files = {t: task_file(task_dir, t) for t in names}
    for task, path in files.items():
        check_fields(path, task)
    return files


def write_local_configs(files: dict[str, Path], into: Path) -> None:
    """task_configs/ copied into `into` with each task's file filled in, for the harness's include_path
    (a public way to add tasks in every lm-eval 0.4; !function tags load the .py files beside the YAMLs)."""
    for task, path in files.items():
        text = (CONFIG_DIR / f"{task}.yaml").read_text(encoding="utf-8")
        (into / f"{task}.yaml").write_text(
            text.replace('"@TASK_FILE@"', json.dumps(str(path.resolve()))), encoding="utf-8"
        )
    for code in CONFIG_DIR.glob("*.py"):
        shutil.copy(code, into / code.name)


def run_tasks(
    model: str | os.PathLike,
    tasks: str | Sequence[str],
    task_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
) -> TaskResults:
    """Zero-shot acc and acc_norm, as lm-evaluation-harness computes them, of MODEL (a directory, built-in name,
    alias or hub id) on `tasks` (names of TASKS), from the hub or from `task_dir`; the first `limit`
    documents of each task only, when given."""
    if batch_size < 1:
        raise TaskError(f"--micro-batch must be at least 1, got {batch_size}")
    files = check_tasks(tasks, task_dir, limit)
    started = time.perf_counter()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from rcpu_lite.evaluate.generate import load_model

    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    lm = HFLM(
        pretrained=load_model(model_dir, pick_device(device)),
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
    )
    with tempfile.TemporaryDirectory(prefix="rcpu-tasks-") as configs:
        if task_dir is None:
            manager, names = TaskManager(), list(files)
        else:
            write_local_configs(files, Path(configs))
            # only ours: indexing the harness's thousands of task files takes a while
            manager, names = (
                TaskManager(include_path=configs, include_defaults=False),
                [LOCAL_PREFIX + t for t in files],
            )
        out = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, log_samples=False)
    return TaskResults(
        str(model),
        [score(task, out) for task in files],
        limit,
        None if task_dir is None else str(task_dir),
        round(time.perf_counter() - started, 3),
    )


def score(task: str, out: dict) -> TaskScore:
    """One task's numbers from simple_evaluate's result, under the harness's task name."""
    key = task if task in out["results"] else LOCAL_PREFIX + task
    metrics = out["results"][key]

    def metric(name: str) -> float | None:  # the harness's keys are "metric,filter"; a stderr may be "N/A"
        value = metrics.get(f"{name},none")
        return float(value) if isinstance(value, (int, float)) else None

    return TaskScore(
        task,
        int(out["n-samples"][key]["effective"]),
        metric("acc"),
        metric("acc_stderr"),
        metric("acc_norm"),
        metric("acc_norm_stderr"),
    )


def format_table(results: TaskResults) -> str:
    """task, documents, acc and acc_norm (percent), then the means."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    rows = [f"{'task':<14} {'n':>6} {'acc':>7} {'acc_norm':>9}"]
    rows += [f"{s.task:<14} {s.n:>6} {pct(s.acc):>7} {pct(s.acc_norm):>9}" for s in results.scores]
    mean = results.mean()
    rows.append(f"{'mean':<14} {'':>6} {pct(mean['acc']):>7} {pct(mean['acc_norm']):>9}")
    note = " (acc_norm: acc where the task has none)" if any(s.acc_norm is None for s in results.scores) else ""
    limit = f", first {results.limit} documents per task" if results.limit else ""
    return "\n".join(rows) + f"\nzero-shot accuracy in %{limit}{note}"
