"""Model directories that cannot run code when they are loaded (issue 18).

An attacker here can write the model directory and recompute every SHA-256 in the manifest and
the manifest's own digest. Their pickle must never be unpickled (the file it would create never
appears), only the learners merf-dask trusts load without ``trusted=True``, every named learner
comes back predicting exactly what it predicted, and with a signing key set any change to any
file, the manifest or the signature is refused. Refusals are one line.
"""

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import warnings

import joblib
import numpy as np
import pytest
import skops.io
from click.testing import CliRunner
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import RandomForestRegressor, StackingRegressor, VotingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.utils import all_estimators
from threadpoolctl import threadpool_limits

from helpers import simulate_lmm
from merf_dask import MERF
from merf_dask.cli import cli
from merf_dask.io.lake import write_lake
from merf_dask.io.learner_file import PICKLE_FILE, SKOPS_FILE, UntrustedModelError, \
    dump_learner, load_learner
from merf_dask.io.signing import KEY_FILE_VARIABLE, KEY_VARIABLE, SIGNATURE, SignatureError
from merf_dask.learners import LEARNERS, make_learner

FORMULA = "y ~ x1 + x2 + x3 + (1 + t | g)"
FEATURES = ["x1", "x2", "x3"]
KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def no_signing_key(monkeypatch):
    """No key from the environment running the tests; tests that sign set one."""
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    monkeypatch.delenv(KEY_FILE_VARIABLE, raising=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Forests of one thread: a threaded forest sums its trees in the order they finish, which
    changes the last bit of a prediction from call to call."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def frame():
    return simulate_lmm(n_clusters=30, max_size=12, seed=3)


def fit(learner, frame, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MERF(learner, formula=FORMULA, random_state=0,
                    **{"max_iterations": 2, **params}).fit(frame)


@pytest.fixture(scope="module")
def forest_model(frame):
    return fit(RandomForestRegressor(n_estimators=20, min_samples_leaf=5, n_jobs=1,
                                     random_state=0), frame)


@pytest.fixture
def saved(forest_model, tmp_path):
    forest_model.save(tmp_path / "model", report=False)
    return tmp_path / "model"


class ShrunkMean(RegressorMixin, BaseEstimator):
    """A learner of a type merf-dask does not trust: the mean of y, shrunk."""

    def __init__(self, shrinkage=0.5):
        self.shrinkage = shrinkage

    def fit(self, X, y):
        self.mean_ = self.shrinkage * float(np.mean(y))
        return self

    def predict(self, X):
        return np.full(len(X), self.mean_)


class Payload:
    """Unpickled, it runs a shell command that creates ``marker`` (what an attacker's would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def malicious_pickle(marker) -> bytes:
    buffer = io.BytesIO()
    joblib.dump({"fitted": Payload(marker), "unfitted": None}, buffer)
    return buffer.getvalue()


def _manifest(directory) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def rewrite(directory, *, files=None, remove=(), edit=None) -> None:
    """Change a model directory as an attacker who can write it would: write ``files`` (name ->
    bytes), remove ``remove``, apply ``edit`` to the manifest, and recompute the SHA-256s and
    the manifest's own digest."""
    manifest = _manifest(directory)
    for name, content in (files or {}).items():
        (directory / name).write_bytes(content)
        manifest["sha256"][name] = hashlib.sha256(content).hexdigest()
    for name in remove:
        (directory / name).unlink()
        del manifest["sha256"][name]
    if edit is not None:
        edit(manifest)
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    manifest["manifest_sha256"] = hashlib.sha256(
        json.dumps(content, sort_keys=True).encode()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_the_payload_runs_when_unpickled(tmp_path):
    """The control: the malicious learner file does what the other tests say never happens."""
    joblib.load(io.BytesIO(malicious_pickle(tmp_path / "ran")))
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("trusted", [False, True])
def test_a_pickle_in_place_of_the_skops_file_is_never_unpickled(saved, tmp_path, trusted):
    marker = tmp_path / "ran"
    rewrite(saved, files={SKOPS_FILE: malicious_pickle(marker)})
    with pytest.raises(UntrustedModelError) as error:
        MERF.load(saved, trusted=trusted)  # a file named .skops is read by skops, trusted or not
    assert "learner.skops is not a skops file" in one_line(error)
    assert not marker.exists()


def test_a_pickle_named_as_the_learner_file_is_refused(saved, tmp_path):
    marker = tmp_path / "ran"
    rewrite(saved, files={PICKLE_FILE: malicious_pickle(marker)}, remove=[SKOPS_FILE],
            edit=lambda manifest: manifest.update(learner_file=PICKLE_FILE))
    with pytest.raises(UntrustedModelError) as error:
        MERF.load(saved)
    message = one_line(error)
    assert "learner.joblib is a pickle" in message and "trusted=True" in message
    assert not marker.exists()


@pytest.mark.parametrize("fitted", [ShrunkMean().fit(np.zeros((2, 3)), np.ones(2)), os.system],
                         ids=["own class", "function"])
def test_a_skops_file_with_untrusted_types_is_refused(saved, fitted):
    rewrite(saved, files={SKOPS_FILE: skops.io.dumps({"fitted": fitted, "unfitted": None})})
    with pytest.raises(UntrustedModelError) as error:
        MERF.load(saved)
    message = one_line(error)
    assert "holds types merf-dask does not trust" in message
    assert ("test_model_trust.ShrunkMean" if fitted is not os.system else "system") in message


def merf_dask(*args):
    return subprocess.run([sys.executable, "-c", "from merf_dask.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_predict_refuses_a_replaced_learner_in_one_line(saved, frame, tmp_path):
    write_lake(frame, tmp_path / "lake", cluster_column="g")
    marker = tmp_path / "ran"
    rewrite(saved, files={SKOPS_FILE: malicious_pickle(marker)})
    result = merf_dask("predict", str(tmp_path / "lake"), "--model", str(saved), "--output",
                       str(tmp_path / "predictions"))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("merf-dask: ")]
    assert "merf-dask: error:" in result.stderr and "is not a skops file" in result.stderr
    assert not marker.exists() and not (tmp_path / "predictions").exists()


@pytest.fixture
def invoke(monkeypatch):
    """``merf-dask ARGS`` in this process; the group's environment defaults are undone after."""
    monkeypatch.setenv("DASK_LOGGING__DISTRIBUTED", "critical")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    return lambda *args: CliRunner().invoke(cli, [str(arg) for arg in args])


def test_a_learner_of_your_own_is_pickled_and_loads_only_when_trusted(frame, tmp_path, invoke):
    model = fit(ShrunkMean(), frame)
    with pytest.warns(UserWarning, match="test_model_trust.ShrunkMean.*saved as a pickle"):
        model.save(tmp_path / "model", report=False)
    assert _manifest(tmp_path / "model")["learner_file"] == PICKLE_FILE
    with pytest.raises(UntrustedModelError) as error:
        MERF.load(tmp_path / "model")
    assert "is a pickle" in one_line(error)
    loaded = MERF.load(tmp_path / "model", trusted=True)
    np.testing.assert_array_equal(loaded.predict(frame), model.predict(frame))

    refused = invoke("show", tmp_path / "model")
    assert refused.exit_code == 1
    assert refused.stderr.strip().startswith("merf-dask: error:")
    assert len(refused.stderr.strip().splitlines()) == 1 and "--trust-model" in refused.stderr
    shown = invoke("show", tmp_path / "model", "--trust-model")
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.startswith("Mixed Effects Random Forest")


@pytest.mark.parametrize("command", ["predict", "evaluate", "show"])
def test_every_command_that_loads_a_model_says_what_trusting_means(invoke, command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "--trust-model" in text and "arbitrary code" in text
    assert "only for model directories you or your pipeline wrote" in text


def small(name):
    """The named learner with few trees and one thread."""
    learner = make_learner(name, random_state=0)
    if "n_estimators" in learner.get_params():
        learner.set_params(n_estimators=20)
    if "n_jobs" in learner.get_params():
        learner.set_params(n_jobs=1)
    return learner


@pytest.mark.parametrize("oob", [True, False], ids=["honest", "in-sample"])
@pytest.mark.parametrize("name", LEARNERS)
def test_every_named_learner_round_trips_as_data(frame, tmp_path, name, oob):
    pytest.importorskip("lightgbm")
    model = fit(small(name), frame, oob=oob)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "saved as a pickle"
        model.save(tmp_path / "model", report=False)
    assert _manifest(tmp_path / "model")["learner_file"] == SKOPS_FILE
    assert not (tmp_path / "model" / PICKLE_FILE).exists()
    loaded = MERF.load(tmp_path / "model")
    assert type(loaded.fe_model_) is type(model.fe_model_)
    for member, original in zip(getattr(loaded.fe_model_, "members", []),
                                getattr(model.fe_model_, "members", [])):
        assert type(member) is type(original)
    assert loaded.fixed_effects_model.get_params() == model.fixed_effects_model.get_params()
    new_clusters = frame.assign(g="unseen")
    for rows in (frame, new_clusters):
        np.testing.assert_array_equal(loaded.predict(rows), model.predict(rows))
    np.testing.assert_array_equal(loaded.fe_model_.predict(frame[FEATURES].to_numpy()),
                                  model.fe_model_.predict(frame[FEATURES].to_numpy()))


def _regressors():
    """Every scikit-learn regressor that fits one target with its defaults (with two
    estimators for the ensembles that need them), but those that wrap a regressor you give."""
    wrappers = {"MultiOutputRegressor", "RegressorChain", "TransformedTargetRegressor"}
    regressors = []
    for name, cls in all_estimators(type_filter="regressor"):
        if name in wrappers or name.startswith("MultiTask") or name in ("CCA", "PLSCanonical"):
            continue  # MultiTask*, CCA and PLSCanonical: several targets
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated regressors still count
            regressor = cls([("linear", LinearRegression()), ("ridge", Ridge())]) \
                if cls in (StackingRegressor, VotingRegressor) else cls()
        regressors.append(pytest.param(regressor, id=name))
    return regressors


@pytest.mark.filterwarnings("ignore::FutureWarning")  # deprecated regressors still count
@pytest.mark.parametrize("regressor", _regressors())
def test_scikit_learn_regressors_are_stored_as_data(regressor):
    rng = np.random.default_rng(0)
    X = rng.uniform(0.5, 2, (60, 3))
    y = X @ [1.0, 2.0, 3.0] + rng.uniform(0, 0.1, 60)  # positive, for Poisson and Gamma
    X = X[:, :1] if type(regressor).__name__ == "IsotonicRegression" else X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter
        regressor.fit(X, y)
        file_name, content = dump_learner({"fitted": regressor, "unfitted": None})
    assert file_name == SKOPS_FILE
    loaded = load_learner(file_name, content, source="learner.skops")["fitted"]
    np.testing.assert_array_equal(loaded.predict(X), regressor.predict(X))


# ----------------------------------------------------------------------- signing

@pytest.fixture
def signed(forest_model, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    forest_model.save(tmp_path / "signed", report=False)
    return tmp_path / "signed"


def test_a_signed_model_loads_with_its_key(signed, forest_model, frame):
    assert (signed / SIGNATURE).read_text().startswith("hmac-sha256 ")
    np.testing.assert_array_equal(MERF.load(signed).predict(frame), forest_model.predict(frame))


def _flip_last_byte(content: bytes) -> bytes:
    return content[:-1] + bytes([content[-1] ^ 1])


def test_a_signed_model_altered_in_any_file_is_refused(signed, tmp_path):
    names = sorted(_manifest(signed)["sha256"])  # every file but the manifest and signature
    assert SKOPS_FILE in names and len(names) > 1
    for name in names:
        altered = tmp_path / f"altered-{name}"
        shutil.copytree(signed, altered)
        rewrite(altered, files={name: _flip_last_byte((altered / name).read_bytes())})
        with pytest.raises(SignatureError) as error:
            MERF.load(altered)
        assert "signature does not match the manifest" in one_line(error), name


@pytest.mark.parametrize("edit", [
    lambda manifest: manifest.update(sigma2=manifest["sigma2"] * 2),
    lambda manifest: manifest.update(learner_file=PICKLE_FILE),
    lambda manifest: manifest["sha256"].pop(min(set(manifest["sha256"]) - {SKOPS_FILE})),
], ids=["sigma2", "learner file", "a file's hash"])
def test_a_signed_model_with_an_altered_manifest_is_refused(signed, edit):
    rewrite(signed, edit=edit)
    with pytest.raises(SignatureError, match="does not match"):
        MERF.load(signed)


def test_an_altered_signature_is_refused(signed):
    (signed / SIGNATURE).write_bytes(_flip_last_byte((signed / SIGNATURE).read_bytes().strip()))
    with pytest.raises(SignatureError, match="does not match"):
        MERF.load(signed)


def test_another_key_is_refused(signed, monkeypatch):
    monkeypatch.setenv(KEY_VARIABLE, KEY[::-1])
    with pytest.raises(SignatureError, match="signed with another key"):
        MERF.load(signed)


def test_an_unsigned_model_is_refused_while_a_key_is_set(saved, monkeypatch, invoke):
    assert not (saved / SIGNATURE).exists()
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    with pytest.raises(SignatureError) as error:
        MERF.load(saved)
    assert "is not signed" in one_line(error)
    result = invoke("show", saved)
    assert result.exit_code == 1 and "merf-dask: error:" in result.stderr
    assert "is not signed" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_without_a_key_nothing_changes(signed, monkeypatch, forest_model, frame):
    monkeypatch.delenv(KEY_VARIABLE)
    np.testing.assert_array_equal(MERF.load(signed).predict(frame), forest_model.predict(frame))


def test_the_key_can_come_from_a_file(signed, monkeypatch, tmp_path):
    (tmp_path / "key").write_text(KEY + "\n")  # as `openssl rand -hex 32 > key` leaves it
    monkeypatch.delenv(KEY_VARIABLE)
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(tmp_path / "key"))
    MERF.load(signed)


@pytest.mark.parametrize("setting, message", [
    ({KEY_VARIABLE: "short"}, "has 5 bytes; use at least 16"),
    ({KEY_VARIABLE: ""}, "has 0 bytes"),
    ({KEY_VARIABLE: KEY, KEY_FILE_VARIABLE: "key"}, "set one of them"),
    ({KEY_FILE_VARIABLE: "/nonexistent/key"}, "cannot read the signing key"),
], ids=["short", "empty", "both", "missing file"])
def test_an_unusable_key_is_refused_before_anything_is_written(forest_model, tmp_path,
                                                               monkeypatch, setting, message):
    for variable, value in setting.items():
        monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=message):
        forest_model.save(tmp_path / "model", report=False)
    assert not (tmp_path / "model").exists()


def test_fit_refuses_an_unusable_key_before_it_fits(frame, tmp_path, invoke, monkeypatch):
    write_lake(frame, tmp_path / "lake", cluster_column="g")
    monkeypatch.setenv(KEY_VARIABLE, "short")
    result = invoke("fit", tmp_path / "lake", "--formula", FORMULA, "--output",
                    tmp_path / "model", "--n-workers", "1")
    assert result.exit_code == 1
    assert result.stderr.strip() == ("merf-dask: error: the signing key (MERF_DASK_SIGNING_KEY) "
                                     "has 5 bytes; use at least 16 (e.g. openssl rand -hex 32)")
    assert not (tmp_path / "model").exists()


# ----------------------------------------------------------------------- older formats

@pytest.mark.parametrize("version", [1, 2])
def test_an_older_format_names_its_version_and_says_to_fit_again(saved, invoke, version):
    """Formats 1 and 2 hold the learner as a pickle: no load of this version unpickles it, even
    trusted, and their layout is not this version's; the message says so in one line."""
    marker = saved.parent / "ran"

    def edit(manifest):
        manifest.update(format_version=version)
        del manifest["learner_file"]
    rewrite(saved, files={PICKLE_FILE: malicious_pickle(marker)}, remove=[SKOPS_FILE], edit=edit)
    for trusted in (False, True):
        with pytest.raises(ValueError) as error:
            MERF.load(saved, trusted=trusted)
        message = one_line(error)
        assert f"format version {version} (its learner a pickle" in message
        assert "reads format version 3: fit the model again with this version and save it" \
            in message
    result = invoke("show", saved, "--trust-model")
    assert result.exit_code == 1 and f"format version {version}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
