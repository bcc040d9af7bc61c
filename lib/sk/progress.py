"""A progress bar on stderr, only when stderr is a terminal and the work is long."""

import sys
import time


class Progress:
    def __init__(self, label, total=None, stream=None, min_total=2000, quiet=False):
        self.stream = stream or sys.stderr
        self.label, self.total, self.done = label, total, 0
        self.enabled = (not quiet and self.stream.isatty()
                        and (total is None or total >= min_total))
        self._last = 0.0

    def __call__(self, n):
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (self.total is None or self.done < self.total):
            return
        self._last = now
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total}")
        else:
            self.stream.write(f"\r{self.label} {self.done}")
        self.stream.flush()

    def close(self):
        if self.enabled and self.done:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
