"""``merf-dask fit --job SPEC``: job-spec values are checked with the types of the flags they
stand for, with real processes, Parquet lakes and clusters.

A bad spec must end with exit status 2 (a usage error) and one line on stderr naming the file,
the key and the value, before anything is written and before any cluster is started: those
runs import ``distributed`` only to fail with exit status 1, so starting a cluster is noticed.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from merf_dask import MERF
from merf_dask.cli import checkpoint_path
from merf_dask.io.lake import write_lake
from merf_dask.simulate import simulate_frame

FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"
EXAMPLE = Path(__file__).parents[1] / "jobs" / "example-fit.yaml"


def merf_dask(*args, cwd=None, cluster=True):
    """``merf-dask ARGS``; with ``cluster=False``, ``distributed`` cannot be imported."""
    block = "" if cluster else "import sys; sys.modules['distributed'] = None; "
    return subprocess.run([sys.executable, "-c", f"{block}from merf_dask.cli import main; main()",
                           *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    path = tmp_path_factory.mktemp("jobs") / "lake"
    write_lake(simulate_frame(n_rows=3000, n_clusters=60, seed=2), path, cluster_column="cluster")
    return path


def write_job(directory: Path, text: str, name="job.yaml") -> Path:
    job = directory / name
    job.write_text(text)
    return job


def assert_refused(result, job: Path, *fragments):
    """Exit status 2 and exactly one line, ``merf-dask: error: job spec JOB: ...``."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip()
    assert line.startswith(f"merf-dask: error: job spec {job}: "), line
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture(scope="module")
def model_dir(lake):
    """A fit from a spec that gives every kind of value, two of them overridden by flags."""
    output = lake.parent / "model"
    job = write_job(lake.parent, f"lake: {lake}\nformula: '{FORMULA}'\noutput: {output}\n"
                    "n_workers: 1\nmemory_limit: 1GiB\nmax_iterations: 5\nlearner: extra-trees\n"
                    "seed: 7\noverwrite: false\nquiet: false\n")
    result = merf_dask("fit", "--job", str(job), "--max-iterations", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # --quiet wins over quiet: false: no summary
    return output


def test_a_valid_spec_fits_and_flags_win(model_dir):
    model = MERF.load(model_dir)
    assert model.n_iter_ == 2  # --max-iterations 2 wins over max_iterations: 5
    assert type(model.fixed_effects_model).__name__ == "ExtraTreesRegressor"
    assert model.random_state == 7
    assert not Path(checkpoint_path(str(model_dir))).exists()  # removed once the model is written


@pytest.mark.parametrize("values, fragments", [
    ("n_workers: 0", ["n_workers: 0 is not in the range x>=1"]),  # used to hang
    ("n_workers: one", ["n_workers: 'one' is not a valid integer"]),  # used to be a traceback
    ("max_iterations: 0", ["max_iterations: 0 is not in the range x>=1"]),
    # as the flag: --max-iterations 2.5 is no integer either
    ("max_iterations: 2.5", ["max_iterations: '2.5' is not a valid integer"]),
    ("learner: gbm", ["learner: 'gbm' is not one of 'random-forest'"]),
    ("quiet: 'false'", ["quiet: 'false' is not a YAML boolean (true or false)"]),
    ("scheduler:", ["scheduler: None is not a valid text"]),
    ("n-workers: 2\nbogus: 1", ["unknown keys bogus, n-workers", "(allowed: cluster_config,"]),
])
def test_bad_values_are_refused_in_one_line(lake, tmp_path, values, fragments):
    output = tmp_path / "model"
    job = write_job(tmp_path, f"lake: {lake}\nformula: '{FORMULA}'\noutput: {output}\n{values}\n")
    assert_refused(merf_dask("fit", "--job", str(job), cluster=False), job, *fragments)
    assert not output.exists() and not Path(checkpoint_path(str(output))).exists()


@pytest.mark.parametrize("text, fragments", [
    ("- lake\n- formula\n", ["expected a mapping of keys to values, got ['lake', 'formula']"]),
    ("lake: [a, b\nformula: y ~ x\n", ["invalid YAML: expected ',' or ']'", "(line 2, column"]),
])
def test_documents_that_are_not_a_mapping_are_refused_in_one_line(tmp_path, text, fragments):
    job = write_job(tmp_path, text)
    assert_refused(merf_dask("fit", "--job", str(job), cluster=False), job, *fragments)


def test_a_quoted_false_does_not_replace_an_existing_model(model_dir, lake, tmp_path):
    before = (model_dir / "manifest.json").read_bytes()
    job = write_job(tmp_path, f"lake: {lake}\nformula: '{FORMULA}'\noutput: {model_dir}\n"
                    "overwrite: 'false'\n")
    assert_refused(merf_dask("fit", "--job", str(job), cluster=False), job,
                   "overwrite: 'false' is not a YAML boolean")
    assert (model_dir / "manifest.json").read_bytes() == before


def test_a_bad_value_is_refused_even_where_a_flag_overrides_it(lake, tmp_path):
    output = tmp_path / "model"
    job = write_job(tmp_path, f"lake: {lake}\nformula: '{FORMULA}'\noutput: {output}\n"
                    "n_workers: 0\n")
    assert_refused(merf_dask("fit", "--job", str(job), "--n-workers", "1", cluster=False), job,
                   "n_workers: 0")
    assert not output.exists()


def test_missing_required_values_are_one_line(tmp_path):
    job = write_job(tmp_path, f"formula: '{FORMULA}'\n")
    result = merf_dask("fit", "--job", str(job), cluster=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "merf-dask: error: missing lake, output (give them as flags or in --job)"]


def test_the_example_spec_is_valid(tmp_path):
    # valid: the run gets past the checks to starting its cluster, which cannot be imported
    result = merf_dask("fit", "--job", str(EXAMPLE), cwd=tmp_path, cluster=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        "merf-dask: error: import of distributed halted; None in sys.modules"], result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["fit", "lake", "--n-workers", "0"], "Invalid value for '--n-workers': 0 is not in the range"),
    (["fit", "lake", "--learner", "forest"], "Invalid value for '--learner'"),
    (["predict", "lake", "--output", "out"], "Missing option '--model'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_bad_flags_are_one_line_as_in_job_specs(tmp_path, args, fragment):
    result = merf_dask(*args, cwd=tmp_path, cluster=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]], result.stderr
    assert result.stderr.startswith("merf-dask: error: ") and fragment in result.stderr
    assert not list(tmp_path.iterdir())
