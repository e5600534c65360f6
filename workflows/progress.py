"""Progress for people and for logs: a tqdm bar on a terminal, plain periodic lines anywhere else.

`ray job logs`, CI logs and files keep every carriage return a bar writes, so a bar there is one
unreadable line of redraws; a line every `LOG_EVERY_S` seconds (and one at the end) reads well."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 30.0


def wants_bar(progress: bool | None) -> bool:
    """True: a bar; False: plain lines; None: a bar only when stderr is a terminal."""
    if progress is None:
        return sys.stderr.isatty()
    return progress


class Progress:
    """`with Progress(total, desc, unit, progress) as p: p.update(n)`; see `wants_bar` for `progress`."""

    def __init__(self, total: int, desc: str, unit: str = "it", progress: bool | None = None, initial: int = 0):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, smoothing=0.1, dynamic_ncols=True) \
            if wants_bar(progress) else None
        self.start = self.last = time.monotonic()
        self.first = initial

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= LOG_EVERY_S:
            self._line()

    def _line(self) -> None:
        self.last = now = time.monotonic()
        rate = (self.n - self.first) / max(now - self.start, 1e-9)
        eta = f", about {(self.total - self.n) / rate:.0f}s left" if rate > 0 and self.n < self.total else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / max(self.total, 1):.0f}%), "
              f"{rate:.3g} {self.unit}/s{eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.last is not None:
            self._line()
        self.last = None
