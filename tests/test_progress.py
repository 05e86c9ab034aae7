"""The examples' progress: a line every few seconds when the output is a log, a tqdm bar on a terminal."""

from __future__ import annotations

import io
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))
import progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_log_gets_a_line_every_few_seconds_and_one_at_the_end():
    clock, log = Clock(), io.StringIO()
    with progress.Progress(100, "pretraining", "step", every=5.0, tty=False, stream=log, clock=clock) as bar:
        for _ in range(10):
            clock.now += 1.0  # 10 steps a second... of fake time: one update per second
            bar.update(10, loss="0.5")
    lines = log.getvalue().splitlines()
    assert lines == [
        "pretraining: 50/100 steps (50%) in 5 s, about 5 s left, loss 0.5",
        "pretraining: 100/100 steps (100%) in 10 s, loss 0.5",
        "pretraining: done, 100/100 steps (100%) in 10 s, loss 0.5",
    ]
    assert "\r" not in log.getvalue()


def test_the_time_left_leaves_out_the_first_step_which_compiles():
    """A jitted loop's first step compiles (100 s here), the others take 0.125 s: 59 steps left are 7 s, not 144 s."""
    clock, log = Clock(), io.StringIO()
    with progress.Progress(100, "training", "step", every=5.0, tty=False, stream=log, clock=clock) as bar:
        clock.now += 100.0
        bar.update()
        for _ in range(99):
            clock.now += 0.125
            bar.update()
    lines = log.getvalue().splitlines()
    assert lines[0] == "training: 1/100 steps (1%) in 100 s"  # no estimate yet: only the compiling step is timed
    assert lines[1] == "training: 41/100 steps (41%) in 105 s, about 7 s left"


def test_a_terminal_bar_rates_the_steps_after_the_first(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress.Progress(10, "fine-tune", tty=True, leave=True) as bar:
        bar.update()
        assert (bar._bar.n, bar._bar.initial) == (1, 1)  # tqdm's clock restarted after the first step
        bar.update(9)
    assert "10/10" in err.getvalue()


def test_short_work_in_a_log_prints_nothing_but_written_lines():
    clock, log = Clock(), io.StringIO()
    with progress.Progress(3, "quick", every=5.0, tty=False, stream=log, clock=clock) as bar:
        bar.update()
        bar.write("a line of the story")
        bar.update(2)
    assert log.getvalue() == "a line of the story\n"


def test_track_counts_an_iterable_without_a_length():
    clock, log = Clock(), io.StringIO()

    def items():
        for i in range(4):
            clock.now += 3.0
            yield i

    assert list(
        progress.track(items(), desc="reading", unit="chunk", every=5.0, tty=False, stream=log, clock=clock)
    ) == [
        0,
        1,
        2,
        3,
    ]
    assert log.getvalue().splitlines() == [
        "reading: 2 chunks in 6 s",
        "reading: 4 chunks in 12 s",
        "reading: done, 4 chunks in 12 s",
    ]


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)  # tqdm draws on stderr
    with progress.Progress(4, "fine-tune", tty=True, leave=True) as bar:
        bar.update(4, loss="0.1")
    assert "fine-tune" in err.getvalue() and "4/4" in err.getvalue() and "loss=0.1" in err.getvalue()
    assert not progress.on_terminal(io.StringIO())
