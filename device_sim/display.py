"""The live progress display (rich, on stderr); phase lines when stderr is not a terminal."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from device_sim.worker import Counters


class Display:
    """What the parent shows while the fleet runs; a no-op when *quiet*."""

    def __init__(self, console: Console | None = None, *, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<10}"),
                                 BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 console=self.console, disable=not self.live)
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Display:
        self.progress.start()
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.progress.stop()

    def phase(self, text: str) -> None:
        """A line that stays: what the simulator is doing now."""
        if not self.quiet:
            self.console.print(f"fleet-sim: {text}", markup=False)

    def _task(self, name: str, total: int) -> TaskID:
        if name not in self._tasks:
            self._tasks[name] = self.progress.add_task(name, total=total, status="")
        return self._tasks[name]

    def enroll(self, done: int, total: int) -> None:
        self.progress.update(self._task("enroll", total), completed=done,
                             status="keys, CSRs, certificates")

    def fleet(self, c: Counters, total: int, revoking: int) -> None:
        status = (f"{c.connected} live, {c.failed} failed, {c.sent} sent, "
                  f"{c.received} received")
        if revoking:
            status += (f", revoked {revoking}: {c.revoked_gone} cut off, "
                       f"{c.reconnects_refused}/{c.reconnects} reconnects refused")
        if c.unexpected:
            status += f", {c.unexpected} dropped"
        self.progress.update(self._task("connect", total), completed=c.attempted,
                             status=status)
