"""Wall time and peak resident memory of a block of work (CPU-friendly: polls /proc, or CUDA stats)."""

import os
import resource
import threading
import time

import torch


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the process-wide high-water mark
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Measure:
    """``with Measure() as m: ...`` -> ``m.wall_s``, ``m.peak_mem_mb`` (peak process RSS while inside,
    sampled every 5 ms; on CUDA, the peak allocated device memory instead)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        self.peak_mem_mb = self.peak / 2**20
        return False
