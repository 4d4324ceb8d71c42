"""Run a command (the ``merf-dask`` CLI) and record the peak RSS of every process it starts.

:func:`run_metered` starts the command, samples every ``interval`` seconds the resident memory
of the command's process and of each of its descendants (an embedded LocalCluster's nannies and
worker processes are children of the CLI process), and timestamps every stderr line (the CLI
prints one line per EM iteration unless ``--quiet``). Processes are told apart by pid and
classified from their command line: the CLI itself, dask nannies / workers (multiprocessing
spawn children), others. A worker that disappears while the command still runs, or more worker
pids than expected, means a worker was restarted (e.g. killed for memory); the distributed
log lines at WARNING level (``DASK_LOGGING__DISTRIBUTED=warning``) are kept in ``stderr`` as
evidence.

Command line (for a quick check)::

    .venv/bin/python bench/cli_meter.py -- .venv/bin/merf-dask fit LAKE --formula ... --output ...
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import psutil

_MB = 1024**2


def _kind(process: psutil.Process, root_pid: int) -> str:
    if process.pid == root_pid:
        return "cli"
    try:
        cmdline = " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    if "multiprocessing" in cmdline and ("spawn_main" in cmdline or "forkserver" in cmdline):
        # nanny-started worker processes are multiprocessing spawn children of the CLI
        # (the nanny lives in the CLI process with processes=True in a LocalCluster)
        return "worker"
    if "resource_tracker" in cmdline:
        return "resource_tracker"
    return "other"


def run_metered(command: list[str], *, interval: float = 0.1, env: dict | None = None,
                timeout: float | None = None) -> dict:
    """Run ``command``; return wall time, exit status, stderr lines and per-process peak RSS."""
    full_env = dict(os.environ)
    full_env.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    full_env.setdefault("OPENBLAS_NUM_THREADS", "1")
    full_env.setdefault("MKL_NUM_THREADS", "1")
    if env:
        full_env.update(env)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)
    root = psutil.Process(proc.pid)
    peaks: dict[int, dict] = {}
    tree_peak = [0]
    stop = threading.Event()
    lines: list[tuple[float, str]] = []
    stdout_lines: list[str] = []

    def sample():
        while not stop.is_set():
            try:
                members = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                members = []
            total = 0
            now = time.perf_counter() - start
            for member in members:
                try:
                    rss = member.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                record = peaks.get(member.pid)
                if record is None:
                    record = peaks[member.pid] = {"pid": member.pid,
                                                  "kind": _kind(member, proc.pid),
                                                  "first_seen_s": now, "peak_rss_mb": 0.0}
                record["last_seen_s"] = now
                if rss / _MB > record["peak_rss_mb"]:
                    record["peak_rss_mb"] = rss / _MB
                    record["peak_at_s"] = now
            tree_peak[0] = max(tree_peak[0], total)
            stop.wait(interval)

    def read_stderr():
        for line in proc.stderr:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    def read_stdout():
        for line in proc.stdout:
            stdout_lines.append(line.rstrip("\n"))

    threads = [threading.Thread(target=f, daemon=True) for f in (sample, read_stderr, read_stdout)]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # the process this function started
        rc = proc.wait()
    seconds = time.perf_counter() - start
    stop.set()
    for t in threads:
        t.join(timeout=5)
    workers = [p for p in peaks.values() if p["kind"] == "worker"]
    return {
        "command": command,
        "returncode": rc,
        "wall_seconds": seconds,
        "tree_peak_rss_mb": tree_peak[0] / _MB,
        "processes": sorted(peaks.values(), key=lambda p: p["first_seen_s"]),
        "worker_peak_rss_mb": sorted((p["peak_rss_mb"] for p in workers), reverse=True),
        "n_worker_pids": len(workers),
        "stderr": [{"t": round(t, 2), "line": line} for t, line in lines],
        "stdout": stdout_lines,
    }


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    result = run_metered(argv)
    json.dump(result, sys.stdout, indent=1)
    print()
