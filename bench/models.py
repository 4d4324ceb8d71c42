"""The models of the side-by-side benchmark, each fitted and scored on one :class:`Design`.

Every ``run_*`` function fits one model on ``design.train`` inside a :class:`FitMeter` (so only the
fit is timed and memory-sampled) and returns one record: fit seconds, peak RSS, MSE on held-out
rows of known clusters and on rows of new clusters, the estimated residual variance ``sigma2`` and
random-intercept variance ``var_b`` where the model has them, iterations, and caught warnings.

MODELS maps a model key (``--one KEY``) to its :class:`ModelSpec`: label, runner, time limit and
the largest row count it is run at.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestRegressor

from design import FEATURES, Design, model_inputs
from equivalent import equivalent_plain_learner
from measure import FitMeter

SEED = 0
MERF_DASK_WORKERS = 2
GPBOOST_ROUNDS = 250
#: peers.md section 3: 2 OpenMP threads on this busy 2-core VM made GPBoost ~10x slower than 1
GPBOOST_THREADS = 1
GPBOOST_PARAMS = dict(learning_rate=0.05, max_depth=6, num_leaves=64, min_data_in_leaf=20,
                      num_threads=GPBOOST_THREADS, verbose=-1)
MERF1_ITERATIONS = 20


def _mse(frame: pd.DataFrame, prediction) -> float:
    return float(np.mean((frame["y"].to_numpy() - np.asarray(prediction)) ** 2))


def _warning_names(caught: list[warnings.WarningMessage]) -> list[str]:
    """Distinct warnings as 'Category: start of the message'."""
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:80]}"
                   for w in caught})


def _scored(meter: FitMeter, design: Design, predict: Callable[[pd.DataFrame], np.ndarray],
            **estimates) -> dict:
    return {**meter.as_dict(),
            "mse_known": _mse(design.test_known, predict(design.test_known)),
            "mse_new": _mse(design.test_new, predict(design.test_new)),
            **estimates}


# ------------------------------------------------------------------------------- merf-dask

#: LightGBM's default threads (all cores, OpenMP; it does not follow OMP_NUM_THREADS) made a
#: 1,000-row fit take 19-35 s on this loaded 2-core VM instead of 0.6-2 s with one thread
LIGHTGBM_LEARNERS = ("histogram-forest", "lightgbm")


def make_learner(name: str):
    """merf_dask.learners.make_learner, with LightGBM's learners on 1 thread (like GPBoost)."""
    from merf_dask.learners import make_learner as make
    learner = make(name, random_state=SEED)
    if name in LIGHTGBM_LEARNERS:
        learner.set_params(n_jobs=1)
    return learner


def _merf_dask(design: Design, *, client=None, learner: str = "random-forest") -> dict:
    from merf_dask import MERF

    X, Z, clusters, y = model_inputs(design.train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            model = MERF(make_learner(learner), random_state=SEED,
                         client=client).fit(X, Z, clusters, y)

    def predict(frame):
        X_test, Z_test, clusters_test, _ = model_inputs(frame)
        return model.predict(X_test, Z_test, clusters_test)

    record = _scored(meter, design, predict, sigma2=float(model.sigma2_),
                     var_b=float(model.D_[0, 0]), iterations=model.n_iter_,
                     converged=bool(model.converged_), warnings=_warning_names(caught))
    plain_learner, plan_shape = equivalent_plain_learner(make_learner(learner), len(y))
    with FitMeter() as plain:  # what one M-step stands for, on the same rows (equivalent.py)
        plain_learner.fit(X, y)
    m_step_seconds = sum(r.m_step_seconds for r in model.history_)
    e_step_seconds = sum(r.e_step_seconds for r in model.history_)
    record.update(
        learner=learner,
        **plan_shape,
        plain_fit_seconds=plain.seconds,
        per_iteration_cost_ratio=meter.seconds / (model.n_iter_ * plain.seconds),
        m_step_seconds=m_step_seconds,
        e_step_seconds=e_step_seconds,
        other_seconds=meter.seconds - m_step_seconds - e_step_seconds,
    )
    return record


def _merf_dask_runner(learner: str) -> Callable[[Design], dict]:
    def run(design: Design) -> dict:
        return _merf_dask(design, learner=learner)
    run.__doc__ = f"merf-dask with the {learner!r} learner (merf_dask.learners), in this process."
    return run


def run_merf_dask(design: Design) -> dict:
    """merf-dask with its defaults (random forest), in this process."""
    return _merf_dask(design)


def _merf_dask_cluster(design: Design, *, learner: str = "random-forest") -> dict:
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    with LocalCluster(n_workers=MERF_DASK_WORKERS, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        cluster_start_seconds = time.perf_counter() - start
        record = _merf_dask(design, client=client, learner=learner)
    record["cluster_start_seconds"] = cluster_start_seconds
    return record


def run_merf_dask_cluster(design: Design) -> dict:
    """merf-dask (default forest) on a LocalCluster of 2 single-threaded worker processes."""
    return _merf_dask_cluster(design)


def run_merf_dask_cluster_warm_boosting(design: Design) -> dict:
    """merf-dask's warm-boosting learner on a LocalCluster of 2 single-threaded workers."""
    return _merf_dask_cluster(design, learner="warm-boosting")


# -------------------------------------------------------------------------------- merf 1.0

def _merf1(design: Design, forest: RandomForestRegressor) -> dict:
    from merf import MERF as MERF1  # merf/__init__.py calls logging.basicConfig(level=INFO)
    logging.getLogger().setLevel(logging.WARNING)

    X, Z, clusters, y = model_inputs(design.train)
    model = MERF1(forest, max_iterations=MERF1_ITERATIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            model.fit(X, Z, clusters, y)

    def predict(frame):
        X_test, Z_test, clusters_test, _ = model_inputs(frame)
        return model.predict(X_test, Z_test, clusters_test)

    return _scored(meter, design, predict, sigma2=float(model.sigma2_hat_history[-1]),
                   var_b=float(np.asarray(model.D_hat_history[-1])[0, 0]),
                   iterations=len(model.gll_history), warnings=_warning_names(caught))


def run_merf1_default(design: Design) -> dict:
    """merf 1.0 with its defaults: 300 trees, 20 iterations, in-sample f-hat."""
    return _merf1(design, RandomForestRegressor(n_estimators=300, n_jobs=-1, random_state=SEED))


def run_merf1_matched(design: Design) -> dict:
    """merf 1.0 with merf-dask's default forest (100 trees, min_samples_leaf=5), 20 iterations."""
    return _merf1(design, RandomForestRegressor(n_estimators=100, min_samples_leaf=5,
                                                n_jobs=-1, random_state=SEED))


# ------------------------------------------------------------------------ other baselines

def run_random_forest(design: Design) -> dict:
    """Plain scikit-learn random forest (100 trees), no random effects."""
    X, _, _, y = model_inputs(design.train)
    forest = RandomForestRegressor(n_estimators=100, n_jobs=-1, random_state=SEED)
    with FitMeter() as meter:
        forest.fit(X, y)
    return _scored(meter, design, lambda frame: forest.predict(frame[FEATURES].to_numpy()),
                   iterations=None)


def run_gpboost(design: Design) -> dict:
    """GPBoost: boosted trees plus a grouped random intercept, a fixed number of rounds."""
    import gpboost as gpb

    X, _, clusters, y = model_inputs(design.train)
    with FitMeter() as meter:
        gp_model = gpb.GPModel(group_data=clusters.to_numpy(), likelihood="gaussian",
                               num_parallel_threads=GPBOOST_THREADS)
        booster = gpb.train(params=GPBOOST_PARAMS, train_set=gpb.Dataset(X, y),
                            gp_model=gp_model, num_boost_round=GPBOOST_ROUNDS)

    def predict(frame):
        return booster.predict(data=frame[FEATURES].to_numpy(),
                               group_data_pred=frame["cluster"].to_numpy(),
                               predict_var=False, pred_latent=False)["response_mean"]

    variances = gp_model.get_cov_pars()
    return _scored(meter, design, predict, sigma2=float(variances["Error_var"].iloc[0]),
                   var_b=float(variances["Group_1"].iloc[0]), iterations=GPBOOST_ROUNDS)


def run_mixedlm(design: Design) -> dict:
    """statsmodels MixedLM, linear fixed part, random intercept, REML; BLUPs for known clusters."""
    import statsmodels.formula.api as smf

    train = design.train
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            result = smf.mixedlm("y ~ x1 + x2 + x3", train, groups=train["cluster"]).fit(reml=True)
    blup = pd.Series({cluster: effects.iloc[0]
                      for cluster, effects in result.random_effects.items()})

    def predict(frame):
        fixed_part = np.asarray(result.predict(frame))
        return fixed_part + frame["cluster"].map(blup).fillna(0.0).to_numpy()

    return _scored(meter, design, predict, sigma2=float(result.scale),
                   var_b=float(result.cov_re.iloc[0, 0]),
                   iterations=None, warnings=_warning_names(caught))


# ------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelSpec:
    """How the benchmark runs one model."""

    label: str
    run: Callable[[Design], dict]
    time_limit_s: int = 900
    #: above this many training rows the model is skipped (with ``skip_reason``)
    max_rows: int | None = None
    skip_reason: str = ""


_MERF1_SKIP = ("skipped: merf 1.0 took 331 s for 5 iterations at 100k rows "
               "(merf-algorithm.md 5.2); 20 iterations at this size exceed the run's budget")

def _merf_dask_models() -> dict[str, ModelSpec]:
    from merf_dask.learners import LEARNERS
    models = {"merf_dask": ModelSpec("merf-dask, in-process, random-forest (defaults)",
                                     run_merf_dask)}
    for learner in LEARNERS:
        if learner in ("random-forest", "linear"):
            continue
        threads = ", 1 thread" if learner in LIGHTGBM_LEARNERS else ""
        models["merf_dask_" + learner.replace("-", "_")] = ModelSpec(
            f"merf-dask, in-process, {learner}{threads}", _merf_dask_runner(learner))
    models["merf_dask_cluster"] = ModelSpec(
        "merf-dask, LocalCluster 2x1 thread, random-forest", run_merf_dask_cluster)
    models["merf_dask_cluster_warm_boosting"] = ModelSpec(
        "merf-dask, LocalCluster 2x1 thread, warm-boosting", run_merf_dask_cluster_warm_boosting)
    return models


MODELS: dict[str, ModelSpec] = {
    **_merf_dask_models(),
    "merf1_default": ModelSpec("merf 1.0, defaults (300 trees, 20 it.)", run_merf1_default,
                               time_limit_s=360, max_rows=20_000, skip_reason=_MERF1_SKIP),
    "merf1_matched": ModelSpec("merf 1.0, merf-dask's forest (100 trees, leaf 5), 20 it.",
                               run_merf1_matched, max_rows=20_000, skip_reason=_MERF1_SKIP),
    "random_forest": ModelSpec("sklearn RandomForest (100 trees), no random effects",
                               run_random_forest, max_rows=200_000,
                               skip_reason="skipped above 200k rows: its 100 fully grown trees "
                                           "took 82 s and 2.1 GB at 200k rows (table_200k.md); "
                                           "10x the rows is ~10x both, past the 900 s limit "
                                           "and most of this machine's 24 GB"),
    "gpboost": ModelSpec(f"GPBoost ({GPBOOST_ROUNDS} rounds, {GPBOOST_THREADS} thread)",
                         run_gpboost),
    "mixedlm": ModelSpec("statsmodels MixedLM, linear, REML", run_mixedlm),
}
