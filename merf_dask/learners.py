"""Fixed-effects learners and their honest predictions at the training rows.

MERF's EM needs f(X_i) at the training rows. The authors' own code uses the forest's out-of-bag
(OOB) predictions there ("#!!!need to use the out-of-bag predictions"): in-sample predictions of a
forest grown to purity nearly interpolate the working response, which drives sigma2 towards zero.

Functions
---------
default_learner
    The random forest used when ``fixed_effects_model`` is None.
supports_oob
    Whether a learner can give out-of-bag predictions (a bagged ensemble with ``oob_score``).
fit_fixed_effects
    Fit a fresh clone of the learner on the working response and return it with its honest
    (out-of-bag) or in-sample predictions at the training rows.
forest_tree_params
    The per-tree parameters of a scikit-learn forest, for growing its trees elsewhere.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import RandomForestRegressor
from sklearn.ensemble._forest import BaseForest
from sklearn.tree import DecisionTreeRegressor

__all__ = ["default_learner", "supports_oob", "fit_fixed_effects", "forest_tree_params",
           "is_bagged_forest"]


def default_learner(*, random_state=None) -> RandomForestRegressor:
    """The default fixed-effects learner: a bagged random forest with out-of-bag predictions.

    ``min_samples_leaf=5`` keeps the trees (and the saved model) small on big data at no cost in
    accuracy on the paper's process; ``n_jobs=-1`` uses every local core.
    """
    return RandomForestRegressor(n_estimators=100, min_samples_leaf=5, max_features=1.0,
                                 oob_score=True, n_jobs=-1, random_state=random_state)


def supports_oob(learner: BaseEstimator) -> bool:
    """True when ``learner`` is a bagged ensemble that can compute out-of-bag predictions."""
    params = learner.get_params(deep=False)
    return "oob_score" in params and "bootstrap" in params


def is_bagged_forest(learner: BaseEstimator) -> bool:
    """True for a scikit-learn forest of decision trees (random forest or extra trees)."""
    return isinstance(learner, BaseForest) and isinstance(learner.estimator, DecisionTreeRegressor)


def _with_oob(learner: BaseEstimator) -> BaseEstimator:
    return clone(learner).set_params(oob_score=True, bootstrap=True)


def fit_fixed_effects(learner: BaseEstimator, X: np.ndarray, y: np.ndarray, *, use_oob: bool
                      ) -> tuple[BaseEstimator, np.ndarray]:
    """Fit a fresh clone of ``learner`` and predict the training rows.

    Parameters
    ----------
    learner : estimator
        Unfitted template; it is cloned, never modified.
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
        The working response y - Z b.
    use_oob : bool
        Return out-of-bag predictions (the learner must support them, see :func:`supports_oob`);
        otherwise in-sample ``predict(X)``.

    Returns
    -------
    fitted : estimator
    f_hat : ndarray of shape (n_samples,)
        Predictions at the training rows. Rows that no tree left out of its bootstrap (possible
        with very few trees) get their in-sample prediction.
    """
    if not use_oob:
        fitted = clone(learner).fit(X, y)
        return fitted, np.asarray(fitted.predict(X), dtype=float)
    with warnings.catch_warnings():
        # sklearn warns when some rows are never out of bag; they are filled in below
        warnings.filterwarnings("ignore", message=".*out-of-bag", category=UserWarning)
        fitted = _with_oob(learner).fit(X, y)
    f_hat = np.asarray(fitted.oob_prediction_, dtype=float).reshape(-1)
    never_oob = ~np.isfinite(f_hat)
    if never_oob.any():
        f_hat[never_oob] = fitted.predict(X[never_oob])
    return fitted, f_hat


_TREE_PARAMS = ("criterion", "max_depth", "min_samples_split", "min_samples_leaf",
                "min_weight_fraction_leaf", "max_features", "max_leaf_nodes",
                "min_impurity_decrease", "ccp_alpha", "monotonic_cst")


def forest_tree_params(forest: BaseForest) -> dict:
    """Parameters of one tree of ``forest``, for growing its trees on the workers.

    Returns
    -------
    dict
        Keyword arguments of :class:`~sklearn.tree.DecisionTreeRegressor` (or ``ExtraTreeRegressor``
        for extra trees), without ``random_state``.
    """
    params = forest.get_params(deep=False)
    return {name: params[name] for name in _TREE_PARAMS if name in params}
