"""Progress in a log file: whole lines at most once a minute, never a bar redrawn with carriage returns."""

from __future__ import annotations

import io
import sys

import pytest

from hybridft.progress import LineProgress, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_at_most_once_a_minute_with_the_share_done_and_the_postfix():
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(3222, "student", every=60, file=out, clock=clock)
    for _ in range(100):
        bar.update(1)
        clock.now += 0.5  # 100 steps in 50 s: no line yet
    assert out.getvalue() == ""
    bar.set_postfix(loss="0.4100")
    clock.now = 63.0
    bar.update(530)
    assert out.getvalue() == "[hybridft] student: 630 of 3,222 steps (20%), 1 min 3 s, loss=0.4100\n"
    clock.now = 70.0
    bar.update(1)  # 7 s after the last line
    assert out.getvalue().count("\n") == 1


def test_bytes_are_shown_as_a_share_of_the_file_and_other_units_in_the_plural():
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(3 * 1024 * 1024, "predict", unit="B", every=1, file=out, clock=clock)
    clock.now = 5.0
    bar.update(1024 * 1024)
    batches = LineProgress(40, "teacher outputs", unit="batch", every=1, file=out, clock=clock)
    clock.now = 10.0
    batches.update(10)
    assert out.getvalue().splitlines() == ["[hybridft] predict: 33% of 3.0 MB read, 5 s",
                                           "[hybridft] teacher outputs: 10 of 40 batches (25%), 5 s"]  # its own start


def test_a_log_file_gets_lines_a_terminal_gets_tqdm_and_disabled_shows_nothing(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file: isatty() is False
    assert isinstance(progress_bar(10, "student", True), LineProgress)
    disabled = progress_bar(10, "student", False)
    disabled.update(10)
    disabled.close()
    assert sys.stderr.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress_bar(10, "student", True)
    assert not isinstance(bar, LineProgress)
    bar.update(10)
    bar.close()
    assert "\r" in sys.stderr.getvalue()  # tqdm's bar, redrawn in place
