"""What a person sees while a long command runs: a rich progress bar in a terminal, plain log lines elsewhere.

The pipeline, evaluation and self-generation only call a Reporter (start a bar, name the phase, one step
done, a summary at the end); they never touch the terminal. The command line picks the reporter once:
RichReporter when stderr is a terminal, PlainReporter (one log line per step, as in logs, CI and nohup)
otherwise, and when a caller passes none.
(Not to be confused with progress.py: the resume manifest.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskProgressColumn, TextColumn
from rich.text import Text

__all__ = ["Reporter", "PlainReporter", "RichReporter", "ConsoleLogHandler", "StageCursor", "format_duration"]
log = logging.getLogger("rcpu_lite")


class Reporter(Protocol):
    def start(self, task: str, total: float, unit: str, done: float = 0) -> None:
        """A new bar: `total` steps of `unit` (layer, windows) for `task` (prune, eval, ...), `done` of them
        already (a resumed run)."""

    def position(self, where: str) -> None:
        """Which step is running, e.g. "layer 2/30"."""

    def phase(self, name: str) -> None:
        """What the running step is doing now (read, statistics, compensation, ...)."""

    def advance(self, line: str, steps: float = 1) -> None:
        """`steps` are done; `line` is the plain log line that says so."""

    def finish(self, summary: Sequence[str]) -> None:
        """The end of the command: a few lines of summary."""


class PlainReporter:
    """One log line per step and the summary as log lines: the behaviour of a run outside a terminal."""

    def start(self, task: str, total: float, unit: str, done: float = 0) -> None:
        pass

    def position(self, where: str) -> None:
        pass

    def phase(self, name: str) -> None:
        pass

    def advance(self, line: str, steps: float = 1) -> None:
        log.info("%s", line)

    def finish(self, summary: Sequence[str]) -> None:
        for line in summary:
            log.info("%s", line)

    def __enter__(self) -> "PlainReporter":
        return self

    def __exit__(self, *exc) -> None:
        pass


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _TimeColumn(ProgressColumn):
    """Elapsed time and the ETA from the mean time per step so far: rich's own estimate averages over a
    short window, which a layer of several minutes never fills."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if task.finished:
            return Text(f"{format_duration(elapsed)} elapsed, done")
        eta, done_here = None, task.completed - task.fields.get("done_before", 0)
        if elapsed is not None and done_here > 0 and task.total:
            eta = elapsed / done_here * (task.total - task.completed)
        return Text(f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}")


class RichReporter:
    """A rich progress bar on stderr; use it as a context manager (the bar stops on the way out)."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 2):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            TextColumn("{task.fields[where]}", markup=False),
            TextColumn("{task.fields[phase]}", markup=False, style="cyan"),
            BarColumn(),
            TaskProgressColumn(),
            _TimeColumn(),
            console=self.console,
            refresh_per_second=refresh_per_second,  # a few redraws a second: the CPUs are busy pruning
        )
        self.task = None
        self.unit = ""
        self.counting = True  # the position is the count of steps done, until a caller names it

    def __enter__(self) -> "RichReporter":
        return self  # the bar starts with the first task: no empty display before it

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, task: str, total: float, unit: str, done: float = 0) -> None:
        if self.task is not None:  # the previous bar stays on screen as it ended
            self.progress.update(self.task, phase="")
        self.unit, self.counting = unit, True
        self.task = self.progress.add_task(
            task, total=total, completed=done, done_before=done, where=f"{unit} {done:g}/{total:g}", phase=""
        )
        self.progress.start()

    def position(self, where: str) -> None:
        self.counting = False
        self.progress.update(self.task, where=where)

    def phase(self, name: str) -> None:
        self.progress.update(self.task, phase=name)

    def advance(self, line: str, steps: float = 1) -> None:
        self.progress.advance(self.task, steps)
        task = next(t for t in self.progress.tasks if t.id == self.task)
        if task.total is not None and task.completed >= task.total - 1e-6:  # fractional steps add up inexactly
            self.progress.update(self.task, completed=task.total, phase="")
        if self.counting:
            self.progress.update(self.task, where=f"{self.unit} {task.completed:g}/{task.total:g}")

    def finish(self, summary: Sequence[str]) -> None:
        """Stop the bars where they are and print the summary below them."""
        for task in self.progress.tasks:
            self.progress.update(task.id, phase="")
        self.progress.stop()
        for line in summary:
            self.console.print(line, markup=False, highlight=False)


class ConsoleLogHandler(logging.Handler):
    """Log records printed through the bar's console, so they appear above the bar instead of through it."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)
        except Exception:  # as logging.StreamHandler: a broken display must not stop the run
            self.handleError(record)


class StageCursor:
    """Turns the Stopwatch's laps (a stage has ended) into the stage that runs now, given their usual order.

    A stage that does not run this time (no reconstruction when nothing was pruned) is skipped over: the
    lap that comes instead is found further along the order.
    """

    def __init__(self, order: Sequence[str], report: Callable[[str], None]):
        self.order, self.report, self.at = list(order), report, 0

    def begin(self) -> None:
        self.at = 0
        self.report(self.order[0])

    def __call__(self, ended: str) -> None:
        if ended not in self.order[self.at :]:
            return  # a lap outside the order (decomposition is booked, not lapped)
        self.at = self.order.index(ended, self.at) + 1
        if self.at < len(self.order):
            self.report(self.order[self.at])
