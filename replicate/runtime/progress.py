"""Progress of long work (pretraining, the linear probe, fine-tuning), on rank 0 only: a tqdm bar on a terminal;
in a log file (``nohup replicate run ... > log``) whole lines instead, at every tenth of the work and at least every
ten minutes, so a background run says where it is without tqdm's carriage returns. Output only: never what a run
computes."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from replicate.core import distributed as D

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class LogLines:
    """The part of tqdm's interface the loops use (iterate, ``update``, ``set_postfix``, ``close``), written as one
    line per tenth of ``total`` and at least every ``interval`` seconds. The rate counts only this process's work
    (from ``initial``), so a resumed run's time left is not skewed by the steps it inherited."""

    def __init__(self, iterable: Iterable | None = None, *, total: int, initial: int = 0, desc: str,
                 unit: str = "it", interval: float = 600.0, file=None):
        self.iterable, self.total, self.n, self.initial = iterable, total, initial, initial
        self.desc, self.unit, self.interval, self.file = desc, unit, interval, file or sys.stderr
        self.postfix: str | None = None
        self.t0 = self.last = time.monotonic()
        self.next_mark = self._mark_after(initial)

    def _mark_after(self, n: int) -> int:
        """The first tenth of ``total`` above ``n`` (the last is ``total`` itself)."""
        k = n * 10 // self.total + 1 if self.total else 10
        return -(-k * self.total // 10)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n >= self.next_mark or now - self.last >= self.interval:
            self.next_mark = self._mark_after(self.n)
            self.last = now
            line = tqdm.format_meter(self.n, self.total, now - self.t0, prefix=self.desc, unit=self.unit,
                                     postfix=self.postfix, initial=self.initial, bar_format=LINE_FORMAT)
            print(line, file=self.file, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int, initial: int = 0, desc: str, unit: str = "it",
             enabled: bool = True):
    """A bar on a terminal, lines in a log, nothing when ``enabled`` is false (``--quiet``) or off rank 0."""
    if not (enabled and D.is_main()):
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return LogLines(iterable, total=total, initial=initial, desc=desc, unit=unit)
