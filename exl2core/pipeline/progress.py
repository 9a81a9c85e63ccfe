"""Progress reporting for long passes: a rich progress bar with ETA, or JSON lines for machines."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn


class Reporter:
    """``stage(name, total)`` starts a pass, ``advance()`` counts work, ``log()`` prints a line.

    With ``status_json`` every update is one ``{"stage", "completion", ...}`` line on stdout and
    nothing else is drawn; with ``quiet`` only log lines are printed.
    """

    def __init__(self, status_json: bool = False, quiet: bool = False):
        self.status_json = status_json
        self.console = Console(stderr=True, quiet=quiet and not status_json)
        self._progress: Progress | None = None
        self._task = None
        self._stage = ""
        self._total = 1
        self._done = 0

    def stage(self, name: str, total: int, done: int = 0) -> None:
        self.close()
        self._stage, self._total, self._done = name, max(total, 1), done
        if self.status_json:
            self._emit()
            return
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=self.console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(name, total=self._total, completed=done)

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._progress is not None:
            self._progress.advance(self._task, n)
        elif self.status_json:
            self._emit()

    def log(self, message: str, **fields) -> None:
        if self.status_json:
            print(json.dumps({"stage": self._stage, "message": message, **fields}), flush=True)
        elif self._progress is not None:
            self._progress.console.print(message)
        else:
            self.console.print(message)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        elif self.status_json and self._stage:
            self._emit()

    def _emit(self) -> None:
        sys.stdout.write(json.dumps({"stage": self._stage, "completion": round(self._done / self._total, 4)})
                         + "\n")
        sys.stdout.flush()
