"""How ``merf-dask fit`` shows its EM iterations on stderr, with real processes, lakes, clusters
and a pseudo-terminal: a tqdm bar on a terminal, one line per iteration elsewhere or without
tqdm, nothing with ``--quiet``.
"""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import tempfile
import termios
import time

import pytest

from merf_dask import MERF
from merf_dask.io.lake import write_lake
from merf_dask.simulate import simulate_frame

FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"
# two iterations cannot converge: every run ends with this warning, as one line
NOT_CONVERGED = "merf-dask: warning: MERF did not converge in 2 iterations"
ITERATION_LINE = re.compile(r"^iteration +(\d+)  GLL=", flags=re.MULTILINE)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    path = tmp_path_factory.mktemp("progress") / "lake"
    write_lake(simulate_frame(n_rows=2000, n_clusters=40, seed=3), path, cluster_column="cluster")
    return path


def fit_command(lake, output, *flags, tqdm=True):
    """``merf-dask fit`` of two iterations on one worker; with ``tqdm=False``, as if tqdm were
    not installed."""
    block = "" if tqdm else "import sys; sys.modules['tqdm'] = None; "
    return [sys.executable, "-c", f"{block}from merf_dask.cli import main; main()", "fit",
            str(lake), "--formula", FORMULA, "--output", str(output), "--n-workers", "1",
            "--max-iterations", "2", *flags]


def run_on_a_terminal(command, timeout=300):
    """Run ``command`` with stderr on a pseudo-terminal of 120 columns.

    Returns
    -------
    (returncode, stdout, what the terminal received with "\\r\\n" read as "\\n")
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    with tempfile.TemporaryFile("w+") as stdout:  # a file: a full pipe would stall the command
        proc = subprocess.Popen(command, stdout=stdout, stderr=slave)
        os.close(slave)
        received, deadline = b"", time.monotonic() + timeout
        try:
            while True:
                ready, _, _ = select.select([master], [], [], max(0, deadline - time.monotonic()))
                if not ready:
                    proc.kill()
                    pytest.fail(f"no end in {timeout} s; the terminal got {received!r}")
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the command and its workers closed the terminal
                    break
                if not chunk:
                    break
                received += chunk
        finally:
            os.close(master)
        returncode = proc.wait(timeout=60)
        stdout.seek(0)
        return returncode, stdout.read(), received.decode().replace("\r\n", "\n")


def test_lines_when_stderr_is_not_a_terminal(lake, tmp_path):
    result = subprocess.run(fit_command(lake, tmp_path / "model"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert [int(n) for n in ITERATION_LINE.findall(result.stderr)] == [1, 2], result.stderr
    assert "\r" not in result.stderr and "EM:" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[-1].startswith(NOT_CONVERGED), result.stderr
    assert "model written to" in result.stdout


def test_a_bar_on_a_terminal(lake, tmp_path):
    returncode, stdout, terminal = run_on_a_terminal(fit_command(lake, tmp_path / "model"))
    assert returncode == 0, terminal
    assert not ITERATION_LINE.search(terminal), terminal  # the bar instead of the lines
    # the bar is redrawn in place (carriage returns) up to 2/2 with the last GLL and sigma2
    history = MERF.load(tmp_path / "model").history_
    draws = terminal.split("\r")
    assert any(re.match(r"EM:  50%\|.*\| 1/2 ", draw) for draw in draws), terminal
    last = [draw for draw in draws if re.match(r"EM: 100%\|.*\| 2/2 ", draw)]
    assert last, terminal
    assert f"GLL={history[-1].gll:.6g}, sigma2={history[-1].sigma2:.4g}]" in last[-1], terminal
    # the warning that comes while the bar is drawn is a line of its own above it
    assert any(line.startswith(NOT_CONVERGED) for line in draws), terminal
    assert "Traceback" not in terminal and "model written to" in stdout


def test_lines_on_a_terminal_without_tqdm(lake, tmp_path):
    returncode, _, terminal = run_on_a_terminal(fit_command(lake, tmp_path / "model", tqdm=False))
    assert returncode == 0, terminal
    assert [int(n) for n in ITERATION_LINE.findall(terminal)] == [1, 2], terminal
    assert "EM:" not in terminal and "\r" not in terminal, terminal


def test_nothing_with_quiet_even_on_a_terminal(lake, tmp_path):
    returncode, stdout, terminal = run_on_a_terminal(fit_command(lake, tmp_path / "model",
                                                                 "--quiet"))
    assert returncode == 0, terminal
    assert terminal.splitlines() == [terminal.strip()] and terminal.startswith(NOT_CONVERGED), \
        terminal  # only the warning
    assert stdout == ""
    assert MERF.load(tmp_path / "model").n_iter_ == 2
