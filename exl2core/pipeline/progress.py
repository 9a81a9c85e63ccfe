"""Progress reporting for long passes: a rich progress bar with ETA, or plain lines for logs and machines."""

from __future__ import annotations

import json
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

LOG_EVERY = 30.0


class Reporter:
    """``stage(name, total)`` starts a pass, ``advance()`` counts work, ``log()`` prints a line.

    On a terminal a rich progress bar shows the ETA. Without one (a log file, a pipe) a plain progress
    line with the ETA is printed every 30 s. With ``status_json`` every step is one
    ``{"stage", "completion"}`` line on stdout and nothing else is drawn.
    """

    def __init__(self, status_json: bool = False, quiet: bool = False):
        self.status_json = status_json
        self.console = Console(stderr=True, quiet=quiet and not status_json)
        self._progress: Progress | None = None
        self._task = None
        self._stage = ""
        self._total = 1
        self._done = 0
        self._start_done = 0
        self._started = 0.0
        self._last_line = 0.0

    def stage(self, name: str, total: int, done: int = 0) -> None:
        self.close()
        self._stage, self._total, self._done, self._start_done = name, max(total, 1), done, done
        self._started = self._last_line = time.monotonic()
        if self.status_json:
            self._emit()
        elif self.console.is_terminal:
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(name, total=self._total, completed=done)
        else:
            self._plain_line()

    def advance(self, n: int = 1) -> None:
        self._done += n
        if self._progress is not None:
            self._progress.advance(self._task, n)
        elif self.status_json:
            self._emit()
        elif time.monotonic() - self._last_line >= LOG_EVERY or self._done >= self._total:
            self._plain_line()

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

    def _plain_line(self) -> None:
        now = time.monotonic()
        self._last_line = now
        rate = (self._done - self._start_done) / max(now - self._started, 1e-9)
        eta = f", ETA {_clock((self._total - self._done) / rate)}" if rate > 0 and self._done < self._total else ""
        self.console.print(f"{self._stage}: {self._done}/{self._total} "
                           f"({100 * self._done / self._total:.1f}%), elapsed {_clock(now - self._started)}{eta}")

    def _emit(self) -> None:
        sys.stdout.write(json.dumps({"stage": self._stage, "completion": round(self._done / self._total, 4)})
                         + "\n")
        sys.stdout.flush()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
