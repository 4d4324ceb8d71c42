"""Every named learner recovers the paper's variance components with honest predictions in EM.

The data come from the paper's process (:func:`merf_dask.simulate.simulate_frame`): a random
intercept with sigma_b2 = 4.5 and noise sigma_e2 = 1 (its defaults, repeated here as the truth).
"""

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from merf_dask import MERF
from merf_dask.core import ensemble
from merf_dask.core.ensemble import BoostingStages, FoldEnsemble
from merf_dask.learners import LEARNERS, make_learner
from merf_dask.simulate import simulate_frame

pytest.importorskip("lightgbm")

FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"
TRUE_SIGMA2, TRUE_D = 1.0, 4.5  # simulate_frame's sigma_e2 and sigma_b2
N_ROWS, N_CLUSTERS, SEED = 3000, 200, 0
NAMES = [name for name in LEARNERS if name != "linear"]


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_library():
    """OpenMP learners (scikit-learn's histogram boosting, LightGBM) spin-wait for their threads
    and slow down many-fold on a busy machine with few cores: the tests use one thread."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def data():
    return simulate_frame(n_rows=N_ROWS, n_clusters=N_CLUSTERS, seed=SEED)


@pytest.fixture(scope="module")
def true_b():
    """The realised random intercepts: simulate_frame draws them first from its generator."""
    b = np.random.default_rng(SEED).normal(0.0, np.sqrt(TRUE_D), N_CLUSTERS)
    return dict(zip([f"c{i}" for i in range(N_CLUSTERS)], b))


def small(name):
    """The named learner with fewer trees (same kind) and one thread, to keep the tests fast."""
    learner = make_learner(name, random_state=0)
    if name in ("random-forest", "extra-trees", "histogram-forest"):
        learner.set_params(n_estimators=30)
    if name in ("histogram-forest", "lightgbm"):
        learner.set_params(n_jobs=1)
    return learner


def fit(learner, data, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MERF(learner, formula=FORMULA, random_state=0, **{"max_iterations": 10, **params}
                    ).fit(data)


@pytest.fixture(scope="module")
def fitted(data):
    return {name: fit(small(name), data) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_learner_recovers_the_variance_components(fitted, name):
    model = fitted[name]
    assert model.oob_
    sigma2, D = model.sigma2_, model.D_[0, 0]
    assert 0.7 * TRUE_SIGMA2 <= sigma2 <= 2.5 * TRUE_SIGMA2, (name, sigma2, D)
    assert abs(D - TRUE_D) <= 0.25 * TRUE_D, (name, sigma2, D)


@pytest.mark.parametrize("name", NAMES)
def test_learner_recovers_the_random_effects(fitted, true_b, data, name):
    model = fitted[name]
    b = model.b_["Intercept"] if "Intercept" in model.b_ else model.b_.iloc[:, 0]
    truth = np.array([true_b[c] for c in b.index])
    assert np.corrcoef(b.to_numpy(), truth)[0, 1] > 0.95, name
    prediction = model.predict(data)
    assert prediction.shape == (len(data),) and np.all(np.isfinite(prediction))


@pytest.mark.parametrize("name, model_type", [
    ("random-forest", RandomForestRegressor),
    ("gradient-boosting", FoldEnsemble),
    ("lightgbm", FoldEnsemble),
    ("histogram-forest", FoldEnsemble),
])
def test_fitted_model_kind(fitted, name, model_type):
    model = fitted[name]
    assert isinstance(model.fe_model_, model_type)
    if model_type is FoldEnsemble:
        template = small(name)
        assert len(model.fe_model_.members) == 2  # n_folds=2, and 3000 rows < member_rows
        assert all(type(m) is type(template) for m in model.fe_model_.members)
        seeds = [m.get_params()["random_state"] for m in model.fe_model_.members]
        assert len(set(seeds)) == len(seeds), seeds  # every member has its own seed
        X = data_features(model)
        np.testing.assert_allclose(
            model.fe_model_.predict(X),
            np.mean([m.predict(X) for m in model.fe_model_.members], axis=0), rtol=1e-12)
    else:
        assert len(model.fe_model_.estimators_) == 30


def data_features(model):
    return np.random.default_rng(1).standard_normal((100, model.n_features_in_))


def test_cross_fit_has_n_folds_members(data):
    model = fit(HistGradientBoostingRegressor(max_iter=30, random_state=0), data, n_folds=3,
                max_iterations=2, tol=0)
    assert isinstance(model.fe_model_, FoldEnsemble)
    assert len(model.fe_model_.members) == 3
    assert all(isinstance(m, HistGradientBoostingRegressor) for m in model.fe_model_.members)


def test_in_sample_forest_collapses_sigma2(data):
    """merf 1.0's forest (fully grown trees) with in-sample predictions drives sigma2 below half
    its true value; the same forest with out-of-bag predictions stays near it."""
    forest = RandomForestRegressor(n_estimators=30, max_features=1.0, random_state=0)
    in_sample = fit(clone(forest), data, oob=False, tol=0)
    honest = fit(clone(forest), data, oob=True, tol=0)
    assert not in_sample.oob_ and honest.oob_
    # one in-sample member: the model is the forest itself
    assert isinstance(in_sample.fe_model_, RandomForestRegressor)
    assert in_sample.sigma2_ < 0.5 * TRUE_SIGMA2, in_sample.sigma2_
    assert 0.7 * TRUE_SIGMA2 <= honest.sigma2_ <= 2.5 * TRUE_SIGMA2, honest.sigma2_


@pytest.mark.parametrize("learner", [
    KNeighborsRegressor(n_neighbors=20),
    make_pipeline(StandardScaler(), KNeighborsRegressor(n_neighbors=20)),
], ids=["knn", "pipeline"])
def test_any_sklearn_regressor_is_cross_fitted(data, true_b, learner):
    model = fit(learner, data)
    assert model.oob_
    assert isinstance(model.fe_model_, FoldEnsemble)
    assert len(model.fe_model_.members) == 2
    assert all(type(m) is type(learner) for m in model.fe_model_.members)
    if isinstance(learner, Pipeline):
        assert all(m is not learner for m in model.fe_model_.members)  # cloned, not shared
    b = model.b_.iloc[:, 0]
    truth = np.array([true_b[c] for c in b.index])
    assert np.corrcoef(b.to_numpy(), truth)[0, 1] > 0.95
    assert abs(model.D_[0, 0] - TRUE_D) <= 0.25 * TRUE_D, model.D_
    # random effects help: the mixed model beats its own fixed part on the training clusters
    y = data["y"].to_numpy()
    mixed = np.mean((y - model.predict(data)) ** 2)
    fixed_only = np.mean((y - model.fe_model_.predict(data[["x1", "x2", "x3"]].to_numpy())) ** 2)
    assert mixed < 0.5 * fixed_only, (mixed, fixed_only)


def rounds(member):
    return [stage.n_iter_ for stage in member.stages]


def test_warm_boosting_grows_over_the_first_m_steps_then_stays(fitted, data, monkeypatch):
    """The warm-started members get a stage of 10 rounds in each of the first 10 M-steps and
    hold the learner's 100 after them; EM does not stop while they grow, even at a loose tol,
    and the M-steps after them fit nothing. The model averages the two members' sums."""
    model = fitted["warm-boosting"]
    assert isinstance(model.fe_model_, FoldEnsemble) and len(model.fe_model_.members) == 2
    assert all(isinstance(m, BoostingStages) for m in model.fe_model_.members)
    X = data_features(model)
    np.testing.assert_allclose(
        model.fe_model_.members[0].predict(X),
        np.sum([stage.predict(X) for stage in model.fe_model_.members[0].stages], axis=0),
        rtol=1e-12)
    member_fits = []
    grow = ensemble._fit_fold_member
    monkeypatch.setattr(ensemble, "_fit_fold_member",
                        lambda *args, **kwargs: member_fits.append(1) or grow(*args, **kwargs))
    loose = fit(make_learner("warm-boosting", random_state=0), data, tol=0.5, max_iterations=14)
    assert 11 <= loose.n_iter_ <= 14  # stopped by tol once the members were grown
    assert [rounds(m) for m in loose.fe_model_.members] == [[10] * 10] * 2
    assert len(member_fits) == 2 * 10  # no member is fitted after the 10th M-step
    monkeypatch.undo()
    short = fit(make_learner("warm-boosting", random_state=0), data, tol=0, max_iterations=3)
    assert short.n_iter_ == 3
    assert [rounds(m) for m in short.fe_model_.members] == [[10] * 3] * 2
