"""Progress of a phase a user waits for (decode, null model, analysis, page): items done, items/s and an ETA.

In a terminal one line is redrawn in place; elsewhere (a SLURM log) a plain line is printed every ``every_s``
seconds and at the end. Silent when ``enabled`` is False (ranks other than 0) or when the phase ends before
``delay_s``: a phase of a few seconds prints nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def rate_text(rate: float) -> str:
    """Items per second: whole numbers from 100 on (``1,190``), 3 significant digits below (``42.5``)."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def duration(seconds: float) -> str:
    """``seconds`` as ``42 s``, ``3 min 05 s`` or ``2 h 07 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts ``total`` items of a phase named ``what`` (e.g. ``"analysis"``, units ``"units"``).

    Use as a context manager, calling ``advance(n)`` as items finish; the closing line says how long it took.
    """

    def __init__(self, what: str, total: int, unit: str = "units", enabled: bool = True, done: int = 0,
                 stream: TextIO | None = None, every_s: float = 30.0, delay_s: float = 2.0) -> None:
        self.what, self.total, self.unit = what, max(0, int(total)), unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.2 if self.terminal else every_s
        self.delay_s = delay_s
        self.done = self._first = int(done)  # items already done before this process started (a resumed phase)
        self._started = self._shown = time.monotonic()
        self._printed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        elif self._printed and self.terminal:
            self.stream.write("\n")

    def line(self, now: float | None = None) -> str:
        """``analysis: 1,024/24,576 units (4%), 310 units/s, ETA 57 s``."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._started, 1e-9)
        rate = (self.done - self._first) / elapsed
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        left = self.total - self.done
        eta = f", ETA {duration(left / rate)}" if rate > 0 and left > 0 else ""
        return f"{self.what}: {self.done:,}/{self.total:,} {self.unit}{share}, {rate_text(rate)} {self.unit}/s{eta}"

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        now = time.monotonic()
        due = not self._printed or now - self._shown >= self.every_s  # the first line once ``delay_s`` has passed
        if self.enabled and now - self._started >= self.delay_s and due:
            self._show(self.line(now))
            self._shown = now

    def close(self) -> None:
        """The closing line (when anything was shown, or the phase took longer than ``delay_s``)."""
        now = time.monotonic()
        if self.enabled and (self._printed or now - self._started >= self.delay_s):
            rate = (self.done - self._first) / max(now - self._started, 1e-9)
            self._show(f"{self.what}: {self.done:,}/{self.total:,} {self.unit} done in {duration(now - self._started)}"
                       f" ({rate_text(rate)} {self.unit}/s)")
            if self.terminal:
                self.stream.write("\n")
        self.enabled = False

    def _show(self, text: str) -> None:
        if self.terminal:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._printed = True
