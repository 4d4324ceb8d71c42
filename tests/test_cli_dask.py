"""``dask merf ...``: the ``dask_cli`` entry point, through the real ``dask`` executable of the
environment, on a small Parquet lake and a real cluster."""

import subprocess

import pytest

from helpers import DASK
from merf_dask import MERF
from merf_dask.io.lake import write_lake
from merf_dask.simulate import simulate_frame

FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"


def dask(*args, cwd=None):
    return subprocess.run([str(DASK), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def commands(help_text: str) -> list[str]:
    """The names under "Commands:" in a click help text."""
    listing = help_text.split("Commands:\n", 1)[1]
    return [line.split()[0] for line in listing.splitlines() if line.startswith("  ")]


def test_dask_lists_merf():
    result = dask("--help")
    assert result.returncode == 0, result.stderr
    assert "merf" in commands(result.stdout) and "cli" not in commands(result.stdout)
    assert "Warning" not in result.stderr, result.stderr  # the entry point loaded cleanly


def test_dask_merf_lists_the_commands():
    result = dask("merf", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: dask merf ")
    assert {"fit", "predict", "evaluate", "show"} <= set(commands(result.stdout))


def test_both_programs_name_merf_dask_in_their_version():
    merf_dask = subprocess.run([str(DASK.with_name("merf-dask")), "--version"],
                               capture_output=True, text=True, timeout=300)
    assert merf_dask.stdout == dask("merf", "--version").stdout == "merf-dask, version 0.1.0\n"


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    path = tmp_path_factory.mktemp("dask-merf") / "lake"
    write_lake(simulate_frame(n_rows=2000, n_clusters=40, seed=5), path, cluster_column="cluster")
    return path


def test_dask_merf_fit_and_show(lake):
    output = lake.parent / "model"
    fitted = dask("merf", "fit", str(lake), "--formula", FORMULA, "--output", str(output),
                  "--n-workers", "1", "--max-iterations", "2")
    assert fitted.returncode == 0, fitted.stderr
    assert "model written to" in fitted.stdout
    assert MERF.load(output).n_iter_ == 2
    # warnings are one line as under merf-dask (set up by the group, not by main())
    assert fitted.stderr.splitlines()[-1].startswith(
        "merf-dask: warning: MERF did not converge in 2 iterations"), fitted.stderr
    assert "Traceback" not in fitted.stderr and "warnings.warn" not in fitted.stderr
    shown = dask("merf", "show", str(output))
    assert shown.returncode == 0, shown.stderr
    assert "(Intercept)" in shown.stdout and "Residual" in shown.stdout


def test_dask_merf_errors_are_one_line(lake, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"lake: {lake}\nformula: '{FORMULA}'\noutput: {tmp_path / 'model'}\n"
                   "n_workers: 0\n")
    refused = dask("merf", "fit", "--job", str(job))
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"merf-dask: error: job spec {job}: n_workers: 0 is not in the range x>=1"]
    missing = dask("merf", "show", str(tmp_path / "absent"))
    assert missing.returncode == 1
    assert len(missing.stderr.splitlines()) == 1, missing.stderr
    assert missing.stderr.startswith("merf-dask: error: ") and "absent" in missing.stderr
