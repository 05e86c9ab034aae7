"""Progress of long loops: a tqdm bar on a terminal, and a plain line every few seconds in a log.

tqdm alone either draws nothing when stdout is not a terminal (``disable=None``) or fills a log file with
carriage returns. ``Progress`` draws the bar only on a terminal; otherwise it prints one line every
``every`` seconds (and one at the end), so a run redirected to a file or a CI log still shows that it moves.

The time left is estimated from the steps after the first: the first step of a jitted loop includes its
compilation (seconds, against milliseconds a step), which would otherwise inflate the estimate a hundredfold.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

EVERY_SECONDS = 5.0


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether `stream` (default: stdout and stderr both) is an interactive terminal."""
    streams = (stream,) if stream is not None else (sys.stdout, sys.stderr)
    return all(getattr(s, "isatty", lambda: False)() for s in streams)


class Progress:
    """Counts `total` units of work under `desc`; a context manager.

    ``update(n, **postfix)`` advances the count; ``postfix`` values (a loss, an epoch) are shown next to it.
    ``write(line)`` prints a line without breaking the bar. ``tty`` overrides the terminal check and
    ``clock`` the time source (both for tests).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "step",
        *,
        every: float = EVERY_SECONDS,
        tty: bool | None = None,
        leave: bool = False,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self._stream = stream
        self._clock = clock
        self._start = self._last = clock()
        self._first: tuple[float, int] | None = None  # (time, count) when the first update (compilation) ended
        self._bar = None
        self._closed = False
        if on_terminal() if tty is None else tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    def _line(self, done: bool = False) -> str:
        elapsed = self._clock() - self._start
        if self.total:
            count = f"{self.count:,}/{self.total:,} {self.unit}s ({100 * self.count / self.total:.0f}%)"
        else:
            count = f"{self.count:,} {self.unit}s"
        timing = f"{elapsed:.0f} s"
        if not done and self.total and self._first is not None and self._first[1] < self.count < self.total:
            first_time, first_count = self._first  # the rate of the steps after the first: no compilation in it
            per_unit = (self._clock() - first_time) / (self.count - first_count)
            timing += f", about {per_unit * (self.total - self.count):.0f} s left"
        extra = "".join(f", {key} {value}" for key, value in self.postfix.items())
        return f"{self.desc}: {'done, ' if done else ''}{count} in {timing}{extra}"

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        self.postfix.update(postfix)
        first = self._first is None
        if first:
            self._first = (self._clock(), self.count)
        if self._bar is not None:
            if first:  # restart tqdm's clock and rate after the first step, as for the log lines
                self._bar.reset(total=self.total)
                self._bar.initial = self._bar.n = self._bar.last_print_n = self.count
            else:
                self._bar.update(n)
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            return
        now = self._clock()
        if now - self._last >= self.every:
            self._last = now
            print(self._line(), file=self.stream, flush=True)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._clock() - self._start >= self.every:  # short work needs no closing line
            print(self._line(done=True), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(iterable: Iterable, total: int | None = None, desc: str = "", unit: str = "item", **kwargs) -> Iterator:
    """Iterates `iterable` under a `Progress` (the drop-in for ``tqdm(iterable, total=..., desc=...)``)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, unit, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()
