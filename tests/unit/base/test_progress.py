"""Progress lines: items done, items/s and an ETA; plain lines in a log, one redrawn line in a terminal; silent when
disabled or shorter than its delay."""

from __future__ import annotations

import io

from amax_lightning.base import progress as progress_module
from amax_lightning.base.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (0.4, 42, 185, 7620)] == ["0 s", "42 s", "3 min 05 s", "2 h 07 min"]


def test_a_log_gets_a_line_after_the_delay_then_every_interval_and_a_closing_line(monkeypatch):
    clock, log = Clock(), io.StringIO()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    with Progress("analysis", 1000, "units", stream=log, every_s=30, delay_s=2) as progress:
        clock.now += 1
        progress.advance(100)  # before the delay: nothing
        clock.now += 4
        progress.advance(150)  # 250 units in 5 s: 50 units/s, 750 left: 15 s
        clock.now += 10
        progress.advance(250)  # within the interval: nothing
        clock.now += 25
        progress.advance(500)
    lines = log.getvalue().splitlines()
    assert lines[0] == "analysis: 250/1,000 units (25%), 50 units/s, ETA 15 s"
    assert lines[1] == "analysis: 1,000/1,000 units (100%), 25 units/s"
    assert lines[2] == "analysis: 1,000/1,000 units done in 40 s (25 units/s)"
    assert len(lines) == 3


def test_a_terminal_line_is_redrawn_in_place(monkeypatch):
    clock, terminal = Clock(), Terminal()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    with Progress("page", 10, "units", stream=terminal, delay_s=0) as progress:
        for _ in range(10):
            clock.now += 1
            progress.advance()
    text = terminal.getvalue()
    assert text.count("\r") == 11 and text.endswith("\n") and "\n" not in text[:-1]


def test_a_resumed_phase_counts_its_rate_from_what_it_did_itself(monkeypatch):
    clock, log = Clock(), io.StringIO()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    progress = Progress("analysis", 100, stream=log, done=60, delay_s=0)
    clock.now += 2
    progress.advance(20)
    assert log.getvalue().splitlines()[0] == "analysis: 80/100 units (80%), 10 units/s, ETA 2 s"


def test_disabled_or_short_phases_print_nothing(monkeypatch):
    clock, log = Clock(), io.StringIO()
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    with Progress("other rank", 10, stream=log, enabled=False, delay_s=0) as progress:
        clock.now += 5
        progress.advance(10)
    with Progress("quick", 10, stream=log, delay_s=2) as progress:
        clock.now += 1
        progress.advance(10)
    assert log.getvalue() == ""
