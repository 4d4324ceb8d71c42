"""Fixed-effects learners: the default forest and the named learners of the CLI.

Any scikit-learn regressor can be the fixed-effects learner; :mod:`merf_dask.core.ensemble` makes
its predictions inside EM honest (out-of-bag for bagged forests, cross-fitted otherwise).

Functions
---------
default_learner
    The random forest used when ``fixed_effects_model`` is None.
make_learner
    A learner by name (``LEARNERS``), as the CLI and job specs name them.
is_linear_model
    Whether a learner is a linear model (in-sample predictions are its ML estimate).
"""

from __future__ import annotations

from sklearn.base import BaseEstimator
from sklearn.ensemble import ExtraTreesRegressor, HistGradientBoostingRegressor, \
    RandomForestRegressor
from sklearn.linear_model import LinearRegression

__all__ = ["default_learner", "make_learner", "is_linear_model", "LEARNERS",
           "DEFAULT_LEAF_ROWS"]

LEARNERS = ("random-forest", "extra-trees", "histogram-forest", "gradient-boosting",
            "warm-boosting", "lightgbm", "linear")


#: The default forest's leaf size for each family. A binary fit's working response,
#: f + (y - mu) / w, is noise of about 1 / sqrt(w) around f at every row: leaves of 50 rows
#: average it (bench/results/families.md measures the choice).
DEFAULT_LEAF_ROWS = {"gaussian": 5, "binomial": 50, "poisson": 5}


def default_learner(*, random_state=None, family: str = "gaussian") -> RandomForestRegressor:
    """The default fixed-effects learner: a bagged random forest of 100 trees.

    ``min_samples_leaf`` is :data:`DEFAULT_LEAF_ROWS` of the family (5 for continuous and
    count outcomes keeps the trees, and the saved model, small on big data); ``n_jobs=-1`` uses
    every local core for an in-process fit.
    """
    return RandomForestRegressor(n_estimators=100, min_samples_leaf=DEFAULT_LEAF_ROWS[family],
                                 max_features=1.0, n_jobs=-1, random_state=random_state)


def _lightgbm(**params):
    try:
        from lightgbm import LGBMRegressor
    except ImportError as error:
        raise ImportError("this learner needs LightGBM: pip install 'merf-dask[lightgbm]'"
                          ) from error
    return LGBMRegressor(verbose=-1, **params)


def make_learner(name: str, *, random_state=None, family: str = "gaussian") -> BaseEstimator:
    """The learner called ``name``.

    Parameters
    ----------
    name : {"random-forest", "extra-trees", "histogram-forest", "gradient-boosting", \
"warm-boosting", "lightgbm", "linear"}
        ``histogram-forest`` is LightGBM's random-forest mode (30-40 x faster per fit than
        scikit-learn's forest on the same data) and ``lightgbm`` its gradient boosting, both
        from the ``lightgbm`` extra; ``gradient-boosting`` is scikit-learn's histogram gradient
        boosting, refitted in every M-step, and ``warm-boosting`` the same boosting grown
        across the EM iterations (100 rounds in all, 10 per M-step, as GPBoost alternates
        boosting rounds with the random effects; :mod:`merf_dask.core.ensemble`).
    random_state : int or None
    family : {"gaussian", "binomial", "poisson"}, default="gaussian"
        The fit's family (the default forest's leaf size depends on it).

    Returns
    -------
    estimator
    """
    if name == "random-forest":
        return default_learner(random_state=random_state, family=family)
    if name == "extra-trees":
        return ExtraTreesRegressor(n_estimators=100, min_samples_leaf=5, bootstrap=True,
                                   n_jobs=-1, random_state=random_state)
    if name == "histogram-forest":
        return _lightgbm(boosting_type="rf", n_estimators=100, num_leaves=1023,
                         min_child_samples=5, bagging_fraction=0.632, bagging_freq=1,
                         feature_fraction=1.0, random_state=random_state)
    if name == "gradient-boosting":
        return HistGradientBoostingRegressor(random_state=random_state)
    if name == "warm-boosting":
        return HistGradientBoostingRegressor(max_iter=100, early_stopping=False, warm_start=True,
                                             random_state=random_state)
    if name == "lightgbm":
        return _lightgbm(n_estimators=200, learning_rate=0.05, random_state=random_state)
    if name == "linear":
        return LinearRegression()
    raise ValueError(f"unknown learner {name!r}; choose one of {', '.join(LEARNERS)}")


def is_linear_model(learner: BaseEstimator) -> bool:
    """True for scikit-learn's linear models (``sklearn.linear_model``)."""
    return type(learner).__module__.startswith("sklearn.linear_model")
