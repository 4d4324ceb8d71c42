"""A linear learner turns MERF's EM into EM for a linear mixed model: it must reach the
maximum-likelihood estimates that statsmodels MixedLM (reml=False) finds by direct optimisation."""

import warnings

import numpy as np
import pytest
import statsmodels.formula.api as smf
from sklearn.linear_model import LinearRegression

from merf_dask import MERF

from helpers import simulate_lmm


@pytest.fixture(scope="module")
def lmm_fits():
    frame = simulate_lmm(n_clusters=150, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' optimiser chatter
        reference = smf.mixedlm("y ~ x1 + x2 + x3", frame, groups=frame["g"],
                                re_formula="~t").fit(reml=False, method="lbfgs", gtol=1e-10)
    Z = np.column_stack([np.ones(len(frame)), frame["t"]])
    model = MERF(LinearRegression(), max_iterations=5000, tol=1e-13).fit(
        frame[["x1", "x2", "x3"]], Z, frame["g"], frame["y"])
    return frame, reference, model


def test_fixed_effects_match(lmm_fits):
    _, reference, model = lmm_fits
    ours = np.concatenate([[model.fe_model_.intercept_], model.fe_model_.coef_])
    theirs = reference.fe_params[["Intercept", "x1", "x2", "x3"]].to_numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-3)


def test_variance_components_match(lmm_fits):
    _, reference, model = lmm_fits
    assert model.converged_
    np.testing.assert_allclose(model.sigma2_, reference.scale, rtol=1e-3)
    np.testing.assert_allclose(model.D_, reference.cov_re.to_numpy(), rtol=1e-3)


def test_random_effects_match(lmm_fits):
    _, reference, model = lmm_fits
    blups = np.array([reference.random_effects[g].to_numpy() for g in model.b_.index])
    np.testing.assert_allclose(model.b_.to_numpy(), blups, rtol=1e-2, atol=1e-3)
