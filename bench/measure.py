"""Wall time and peak memory of one fit.

:class:`FitMeter` is a context manager: it times the block with ``time.perf_counter`` and samples,
every 20 ms in a background thread, the resident memory (RSS) of this process plus all of its
descendants (Dask workers of a LocalCluster are child processes). It reports the peak RSS during
the block and the peak minus the RSS just before the block. ``ru_maxrss`` of this process (the
kernel's high-water mark) is recorded as a cross-check for in-process fits. :class:`StolenCPU`
records how much of the machine's CPU the hypervisor gave to other machines meanwhile.
"""

from __future__ import annotations

import resource
import threading
import time

import psutil

_SAMPLE_SECONDS = 0.02
_MB = 1024**2


def _tree_rss_bytes(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that just exited
            pass
    return total


class FitMeter:
    """Time a block and record the peak RSS of the process tree while it runs."""

    def __init__(self):
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._peak_bytes = 0
        self.seconds = float("nan")

    def _sample(self):
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._peak_bytes = max(self._peak_bytes, _tree_rss_bytes(self._process))

    def __enter__(self) -> FitMeter:
        self._baseline_bytes = _tree_rss_bytes(self._process)
        self._peak_bytes = self._baseline_bytes
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info):
        self.seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self._peak_bytes = max(self._peak_bytes, _tree_rss_bytes(self._process))

    def as_dict(self) -> dict:
        """Fit seconds, peak RSS and its increase over the pre-fit RSS, in MB."""
        return {
            "fit_seconds": self.seconds,
            "peak_rss_mb": self._peak_bytes / _MB,
            "fit_rss_increase_mb": (self._peak_bytes - self._baseline_bytes) / _MB,
            # Linux reports ru_maxrss in KiB
            "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


class StolenCPU:
    """The share of this machine's CPU time taken by the hypervisor for other machines while a
    block runs (Linux's ``steal``; 0 where the kernel does not report it).

    On a shared VM a fit and the plain fit it is compared with can run at different speeds with
    the same work; recording the steal of each says when a cost ratio is noise.
    """

    share = float("nan")

    def __enter__(self) -> StolenCPU:
        self._start = psutil.cpu_times()
        return self

    def __exit__(self, *exc) -> None:
        end = psutil.cpu_times()
        total = sum(end) - sum(self._start)
        stolen = getattr(end, "steal", 0.0) - getattr(self._start, "steal", 0.0)
        self.share = stolen / total if total > 0 else 0.0
