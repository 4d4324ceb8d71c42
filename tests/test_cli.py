"""The merf-dask CLI end to end on small lakes, with real processes, Parquet files and clusters.

Bad input must end with exit status 1, one line on stderr naming the problem, no traceback and
nothing written.
"""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from merf_dask import MERF
from merf_dask.io.lake import write_lake
from merf_dask.simulate import simulate_frame

FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"


def merf_dask(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "from merf_dask.cli import main; main()", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_clean_failure(result, *fragments):
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("merf-dask: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    result = merf_dask("simulate", "--rows", "3000", "--clusters", "60", "--output",
                       str(root / "lake"), "--seed", "4")
    assert result.returncode == 0, result.stderr
    return root / "lake"


@pytest.fixture(scope="module")
def model_dir(lake):
    output = lake.parent / "model"
    result = merf_dask("fit", str(lake), "--formula", FORMULA, "--output", str(output),
                       "--n-workers", "2", "--max-iterations", "5")
    assert result.returncode == 0, result.stderr
    assert "iteration   1" in result.stderr  # one progress line per EM iteration
    return output


def test_fit_writes_a_loadable_model_and_report(model_dir):
    files = {p.name for p in model_dir.iterdir()}
    assert {"manifest.json", "learner.skops", "random_effects_0.parquet", "report.html",
            "convergence.png"} <= files
    model = MERF.load(model_dir)
    assert len(model.b_) == 60 and model.sigma2_ > 0


def test_predict_evaluate_show(lake, model_dir, tmp_path):
    output = tmp_path / "predictions"
    result = merf_dask("predict", str(lake), "--model", str(model_dir), "--output", str(output),
                       "--intervals")
    assert result.returncode == 0, result.stderr
    predictions = pd.read_parquet(output)
    assert len(predictions) == 3000
    assert {"prediction", "prediction_std", "x1", "cluster"} <= set(predictions.columns)
    evaluation = merf_dask("evaluate", str(lake), "--model", str(model_dir))
    assert evaluation.returncode == 0 and "known clusters" in evaluation.stdout
    shown = merf_dask("show", str(model_dir))
    assert shown.returncode == 0 and "Residual" in shown.stdout and "(Intercept)" in shown.stdout


def test_tampered_model_is_refused(model_dir, tmp_path):
    copy = tmp_path / "model"
    subprocess.run(["cp", "-r", str(model_dir), str(copy)], check=True)
    effects = pd.read_parquet(copy / "random_effects_0.parquet")
    effects.iloc[0, 1] += 1.0
    effects.to_parquet(copy / "random_effects_0.parquet", index=False)
    assert_clean_failure(merf_dask("show", str(copy)), "random_effects_0.parquet", "modified")


@pytest.mark.parametrize("formula, fragment", [
    ("y ~ x1 + nope + (1 | cluster)", "nope"),
    ("y ~ x1 + (1 | cluster", "invalid formula"),
])
def test_bad_formulas(lake, tmp_path, formula, fragment):
    output = tmp_path / "model"
    assert_clean_failure(merf_dask("fit", str(lake), "--formula", formula, "--output",
                                   str(output)), fragment)
    assert not output.exists()


def test_existing_output_is_not_replaced(lake, model_dir):
    before = (model_dir / "manifest.json").read_bytes()
    assert_clean_failure(merf_dask("fit", str(lake), "--formula", FORMULA, "--output",
                                   str(model_dir)), "already exists", "--overwrite")
    assert (model_dir / "manifest.json").read_bytes() == before


def test_missing_and_empty_and_corrupt_lakes(tmp_path):
    output = tmp_path / "model"
    assert_clean_failure(merf_dask("fit", str(tmp_path / "absent"), "--formula", FORMULA,
                                   "--output", str(output)), "absent")
    (tmp_path / "empty").mkdir()
    assert_clean_failure(merf_dask("fit", str(tmp_path / "empty"), "--formula", FORMULA,
                                   "--output", str(output)), "empty")
    corrupt = tmp_path / "corrupt"
    write_lake(simulate_frame(n_rows=200, n_clusters=10), corrupt, cluster_column="cluster")
    victim = sorted(corrupt.rglob("*.parquet"))[0]
    victim.write_bytes(b"not parquet at all")
    assert_clean_failure(merf_dask("fit", str(corrupt), "--formula", FORMULA, "--output",
                                   str(output)), victim.name)
    assert not output.exists()


def test_nan_target_and_unwritable_output(tmp_path):
    frame = simulate_frame(n_rows=300, n_clusters=10)
    frame.loc[5, "y"] = np.nan
    lake = tmp_path / "nan-lake"
    write_lake(frame, lake, cluster_column="cluster")
    output = tmp_path / "model"
    assert_clean_failure(merf_dask("fit", str(lake), "--formula", FORMULA, "--output",
                                   str(output), "--n-workers", "1"), "'y'")
    assert not output.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_clean_failure(merf_dask("simulate", "--rows", "100", "--clusters", "5", "--output",
                                   str(blocker / "lake")), "a-file")


def test_job_spec_stands_for_the_flags(lake, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"lake: {lake}\nformula: '{FORMULA}'\noutput: {tmp_path / 'job-model'}\n"
                   "max_iterations: 1\nn_workers: 1\nquiet: true\n")
    result = merf_dask("fit", "--job", str(job))
    assert result.returncode == 0, result.stderr
    assert MERF.load(tmp_path / "job-model").n_iter_ == 1
    # one iteration cannot converge (no GLL change yet): the warning is one line, like errors
    assert result.stderr.strip().splitlines() == [
        "merf-dask: warning: MERF did not converge in 1 iterations (relative GLL change inf > "
        "tol=0.001); increase max_iterations"], result.stderr
