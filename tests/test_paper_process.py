"""On the paper's data-generating process, out-of-bag EM keeps sigma2 honest and beats a forest."""

import numpy as np
import pytest
from sklearn.ensemble import RandomForestRegressor

from merf_dask import MERF
from merf_dask.simulate import gain_experiment

FEATURES = ["x1", "x2", "x3"]


def fit_and_score(model, train, test):
    ones = np.ones((len(train), 1))
    model.fit(train[FEATURES], ones, train["cluster"], train["y"])
    prediction = model.predict(test[FEATURES], np.ones((len(test), 1)), test["cluster"])
    return np.mean((test["y"] - prediction) ** 2)


@pytest.fixture(scope="module")
def scenario():
    return gain_experiment(2, seed=3)  # m = 0.6, sigma_b2 = 4.5, sigma_e2 = 1


def test_default_model_keeps_sigma2_near_truth_and_beats_a_forest(scenario):
    train, test_known, _ = scenario
    model = MERF(random_state=0)
    merf_mse = fit_and_score(model, train, test_known)
    forest = RandomForestRegressor(n_estimators=100, random_state=0).fit(train[FEATURES],
                                                                       train["y"])
    forest_mse = np.mean((test_known["y"] - forest.predict(test_known[FEATURES])) ** 2)
    assert model.oob_
    assert 0.7 < model.sigma2_ < 2.5, model.sigma2_
    assert merf_mse < 0.7 * forest_mse, (merf_mse, forest_mse)


def test_in_sample_predictions_collapse_sigma2(scenario):
    """With merf 1.0's forest, in-sample EM (oob=False) drives sigma2 to a fraction of its true
    value; the same forest with out-of-bag predictions does not."""
    train, test_known, _ = scenario
    merf_forest = RandomForestRegressor(n_estimators=100, random_state=0)
    in_sample = MERF(merf_forest, oob=False, max_iterations=10, tol=0)
    out_of_bag = MERF(merf_forest, oob=True, max_iterations=10, tol=0)
    fit_and_score(in_sample, train, test_known)
    fit_and_score(out_of_bag, train, test_known)
    assert in_sample.sigma2_ < 0.5, in_sample.sigma2_
    assert 0.7 < out_of_bag.sigma2_ < 2.5, out_of_bag.sigma2_
