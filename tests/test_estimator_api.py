"""scikit-learn conventions, merf 1.0 compatibility, input handling and warnings."""

import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.ensemble import RandomForestRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression

from merf_dask import MERF, SingularFitWarning

from helpers import simulate_lmm


@pytest.fixture(scope="module")
def frame():
    return simulate_lmm(n_clusters=40, seed=1, slope=False)


def arrays(frame):
    return frame[["x1", "x2", "x3"]], np.ones((len(frame), 1)), frame["g"], frame["y"]


def small_forest():
    return RandomForestRegressor(n_estimators=20, random_state=0)


def test_init_only_stores_parameters_and_clone_works():
    forest = small_forest()
    model = MERF(forest, max_iterations=7, tol=0.01, random_state=3)
    assert model.get_params()["fixed_effects_model"] is forest
    copy = clone(model)
    assert copy.get_params(deep=False)["max_iterations"] == 7
    assert copy.fixed_effects_model is not forest  # never shared between instances


def test_default_learners_are_not_shared(frame):
    first, second = MERF(max_iterations=2, tol=0), MERF(max_iterations=2, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        first.fit(*arrays(frame))
        second.fit(*arrays(frame))
    assert first.fe_model_ is not second.fe_model_


@pytest.mark.parametrize("to_input", [
    lambda f: (f[["x1", "x2", "x3"]].to_numpy(), np.ones(len(f)), f["g"].to_numpy(),
               f["y"].to_numpy()),
    lambda f: (f[["x1", "x2", "x3"]].values.tolist(), [[1.0]] * len(f), f["g"].tolist(),
               f["y"].tolist()),
    lambda f: (f[["x1", "x2", "x3"]], pd.DataFrame({"one": np.ones(len(f))}), f[["g"]], f[["y"]]),
    lambda f: (f[["x1", "x2", "x3"]], np.ones((len(f), 1)), f["g"].str[1:].astype(int), f["y"]),
])
def test_accepted_input_types_give_the_same_model(frame, to_input):
    reference = MERF(LinearRegression(), max_iterations=5, tol=0).fit(*arrays(frame))
    model = MERF(LinearRegression(), max_iterations=5, tol=0).fit(*to_input(frame))
    np.testing.assert_allclose(model.sigma2_, reference.sigma2_, rtol=1e-10)
    np.testing.assert_allclose(np.sort(model.b_.to_numpy().ravel()),
                               np.sort(reference.b_.to_numpy().ravel()), rtol=1e-10)


def test_fitted_attributes_and_merf_aliases(frame):
    X, Z, g, y = arrays(frame)
    n_val = 60
    model = MERF(small_forest(), max_iterations=4, tol=0).fit(
        X, Z, g, y, X_val=X[:n_val], Z_val=Z[:n_val], clusters_val=g[:n_val], y_val=y[:n_val])
    assert list(model.b_.index) == list(pd.unique(g))
    assert model.D_.shape == (1, 1) and model.sigma2_ > 0
    assert len(model.gll_history_) == len(model.sigma2_history_) == len(model.D_history_) == 4
    assert len(model.val_loss_history_) == 4 and model.n_iter_ == 4
    assert model.trained_fe_model is model.fe_model_ and model.trained_b is model.b_
    assert model.gll_history is model.gll_history_
    assert model.sigma2_hat_history is model.sigma2_history_
    assert model.D_hat_history is model.D_history_


def test_predict_known_and_new_clusters(frame):
    X, Z, g, y = arrays(frame)
    model = MERF(LinearRegression(), max_iterations=5, tol=0).fit(X, Z, g, y)
    row = X.iloc[:1]
    known = model.predict(row, Z[:1], g.iloc[:1])
    new = model.predict(row, Z[:1], ["never-seen"])
    np.testing.assert_allclose(new, model.fe_model_.predict(row.to_numpy()))
    np.testing.assert_allclose(known - new, model.b_.loc[g.iloc[0]].to_numpy())
    assert model.score(X, Z, g, y) > 0.5


def test_pickle_round_trip(frame):
    model = MERF(small_forest(), max_iterations=3, tol=0).fit(*arrays(frame))
    restored = pickle.loads(pickle.dumps(model))
    X, Z, g, _ = arrays(frame)
    np.testing.assert_array_equal(restored.predict(X, Z, g), model.predict(X, Z, g))


def test_convergence_warning_when_max_iterations_is_reached(frame):
    with pytest.warns(ConvergenceWarning, match="did not converge in 2 iterations"):
        MERF(small_forest(), max_iterations=2, tol=1e-12).fit(*arrays(frame))


def test_singular_fit_warning_without_cluster_variation():
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(40), 10)
    X = rng.standard_normal((400, 2))
    noise = rng.standard_normal(400)
    noise -= np.bincount(clusters, noise)[clusters] / 10  # equal cluster means: the MLE of D is 0
    with pytest.warns(SingularFitWarning, match="boundary"):
        MERF(LinearRegression(), max_iterations=300, tol=0).fit(
            X, np.ones((400, 1)), clusters, X[:, 0] + noise)


def test_no_singular_warning_with_real_cluster_variation(frame):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SingularFitWarning)
        MERF(LinearRegression(), max_iterations=50, tol=0).fit(*arrays(frame))


def test_any_number_of_random_effect_columns():
    frame = simulate_lmm(n_clusters=50, seed=2)
    Z = np.column_stack([np.ones(len(frame)), frame["t"], frame["t"] ** 2])
    model = MERF(LinearRegression(), max_iterations=10, tol=0).fit(
        frame[["x1", "x2", "x3"]], Z, frame["g"], frame["y"])
    assert model.b_.shape == (50, 3) and model.D_.shape == (3, 3)


@pytest.mark.parametrize("corrupt, message", [
    (lambda X, Z, g, y: (X.assign(x2=np.where(X.index == 3, np.nan, X["x2"])), Z, g, y),
     "X contains NaN or infinite values in column 'x2'"),
    (lambda X, Z, g, y: (X, np.where(np.arange(len(Z))[:, None] == 5, np.inf, Z), g, y),
     "Z contains NaN or infinite"),
    (lambda X, Z, g, y: (X, Z, g, y.where(y.index != 7)), "y contains 1 NaN or infinite"),
    (lambda X, Z, g, y: (X, Z, g, y.iloc[:-1]), "inconsistent numbers of rows"),
    (lambda X, Z, g, y: (X.iloc[:0], Z[:0], g.iloc[:0], y.iloc[:0]), "X is empty"),
    (lambda X, Z, g, y: (X, np.empty((len(X), 0)), g, y), "Z has no columns"),
    (lambda X, Z, g, y: (X, Z, g.where(g.index != 2), y), "clusters has 1 missing ids"),
])
def test_bad_input_gives_one_clear_error(frame, corrupt, message):
    with pytest.raises(ValueError, match=message):
        MERF(LinearRegression(), max_iterations=2).fit(*corrupt(*arrays(frame)))


def test_unknown_and_invalid_parameters_are_rejected(frame):
    with pytest.raises(ValueError, match="Invalid parameter 'n_trees'"):
        MERF().set_params(n_trees=10)
    with pytest.raises(ValueError, match="max_iterations"):
        MERF(max_iterations=0).fit(*arrays(frame))
    with pytest.raises(ValueError, match="n_folds"):
        MERF(n_folds=1).fit(*arrays(frame))


def test_saved_model_keeps_its_iteration_history(frame, tmp_path):
    model = MERF(LinearRegression(), max_iterations=4, tol=0).fit(*arrays(frame))
    model.save(tmp_path / "model")
    loaded = MERF.load(tmp_path / "model")
    assert len(loaded.history_) == 4
    assert np.isinf(loaded.history_[0].relative_change)  # the first iteration has no previous
    for saved, original in zip(loaded.history_, model.history_):
        for name in ("iteration", "gll", "relative_change", "sigma2", "m_step_seconds",
                     "e_step_seconds", "val_mse"):
            assert getattr(saved, name) == getattr(original, name), name
        np.testing.assert_array_equal(saved.D, original.D)


@pytest.mark.parametrize("content", [b"not parquet", "plain parquet"])
def test_a_file_in_the_checkpoints_place_that_is_not_one_is_named(frame, tmp_path, content):
    path = tmp_path / "fit.checkpoint.parquet"
    if content == "plain parquet":
        pd.DataFrame({"a": [1.0]}).to_parquet(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="fit.checkpoint.parquet is not a merf-dask checkpoint"):
        MERF(LinearRegression(), max_iterations=2, checkpoint=str(path)).fit(*arrays(frame))
    assert path.exists()  # the user's file is left as it was
