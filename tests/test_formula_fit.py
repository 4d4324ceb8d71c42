"""Formula fits: scikit-learn model selection and calibrated prediction intervals."""

import numpy as np
import pytest
from sklearn.ensemble import RandomForestRegressor
from sklearn.model_selection import GridSearchCV, GroupKFold

from merf_dask import MERF
from merf_dask.simulate import gain_experiment

FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"


def test_grid_search_with_group_kfold():
    train, _, _ = gain_experiment(1, seed=2)
    search = GridSearchCV(
        MERF(RandomForestRegressor(n_estimators=20, random_state=0), formula=FORMULA,
             max_iterations=3, tol=0),
        {"fixed_effects_model__min_samples_leaf": [1, 10]}, cv=GroupKFold(n_splits=3))
    search.fit(train, groups=train["cluster"])
    assert len(search.cv_results_["mean_test_score"]) == 2
    assert np.isfinite(search.best_score_)


@pytest.mark.parametrize("seed", [0])
def test_95_percent_intervals_cover_92_to_98_percent(seed):
    train, test_known, test_new = gain_experiment(2, seed=seed)
    model = MERF(formula=FORMULA, random_state=0).fit(train)
    for test in (test_known, test_new):
        prediction, std = model.predict(test, return_std=True)
        coverage = np.mean(np.abs(test["y"] - prediction) <= 1.959964 * std)
        assert 0.92 <= coverage <= 0.98, coverage
