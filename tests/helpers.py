"""Test helpers: simulated linear mixed-model data, and real `dask scheduler` / `dask worker`
processes (started in a session of their own and stopped by process group)."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def simulate_lmm(*, n_clusters=120, seed=0, slope=True, min_size=1, max_size=40,
                 beta=(1.5, -2.0, 0.5), intercept=3.0, D=((2.0, 0.3), (0.3, 0.5)), sigma2=1.0):
    """Linear mixed-model data with a random intercept (and slope on ``t``), uneven clusters."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(min_size, max_size + 1, n_clusters)
    codes = np.repeat(np.arange(n_clusters), sizes)
    n = len(codes)
    X = rng.standard_normal((n, len(beta)))
    t = rng.uniform(-1, 1, n)
    D = np.asarray(D) if slope else np.asarray(D)[:1, :1]
    b = rng.multivariate_normal(np.zeros(len(D)), D, n_clusters)
    Z = np.column_stack([np.ones(n), t]) if slope else np.ones((n, 1))
    y = intercept + X @ np.asarray(beta) + np.einsum("nq,nq->n", Z, b[codes]) \
        + rng.normal(0, np.sqrt(sigma2), n)
    frame = pd.DataFrame(X, columns=[f"x{i + 1}" for i in range(len(beta))])
    frame["t"] = t
    frame["g"] = np.array([f"g{c}" for c in range(n_clusters)])[codes]
    frame["y"] = y
    return frame


DASK = Path(sys.executable).with_name("dask")


def spawn_dask(args: list[str], log: Path) -> subprocess.Popen:
    """Start ``dask ARGS`` (e.g. ``scheduler ...`` or ``worker ...``) with output to ``log``."""
    with Path(log).open("w") as out:
        # a session of its own: stopping the group also stops anything the process started
        return subprocess.Popen([str(DASK), *args], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_process_groups(processes: list[subprocess.Popen]) -> None:
    """SIGTERM the processes' groups, then SIGKILL those still running after 10 s."""
    for proc in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in processes:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
