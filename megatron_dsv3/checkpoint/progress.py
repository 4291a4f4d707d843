"""A plain progress line for long conversions: bytes done, percent, MB/s (stderr, ~2 per second)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total_bytes: int, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, max(int(total_bytes), 1), enabled
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self.stream = stream or sys.stderr

    def update(self, nbytes: int) -> None:
        self.done += int(nbytes)
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.5 or self.done >= self.total):
            self.last = now
            self._print(now, end="\r")

    def _print(self, now: float, end: str) -> None:
        rate = self.done / max(now - self.start, 1e-9) / 2**20
        self.stream.write(f"{self.label}: {self.done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB "
                          f"({100 * self.done / self.total:5.1f}%) {rate:,.1f} MiB/s{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._print(time.monotonic(), end="\n")
