"""Binary (and count) outcomes side by side: merf-dask's MERFClassifier next to GPBoost, a random
forest classifier and merf 1.0's "regression and clip" workaround.

Usage (from the repository root)::

    .venv/bin/python bench/families.py --quick          # 2,000 rows, 120 s limits (~1-2 min)
    .venv/bin/python bench/families.py --rows 20000
    .venv/bin/python bench/families.py --rows 2000000   # 1500 s per model
    .venv/bin/python bench/families.py --rows 20000 --models merf_dask gpboost
    .venv/bin/python bench/families.py --family poisson --rows 20000   # counts
    .venv/bin/python bench/families.py --rows 2000000 --deadline 15:10  # limits cut so that no model runs past 15:10 UTC

The data are bench/design.py's (the MERF paper's f and the 5/15/30/60/90-row clusters, the same
rows and cluster draws as the Gaussian side by side) put on the logit scale:

    eta = (g(x) - E g) / sd(g) + b_i,    b_i ~ N(0, 1),    y ~ Bernoulli(expit(eta)),

with g the paper's fixed-effect function (design.py's ``f_true`` = m g) standardised by its
population mean and standard deviation (exact, below), and b_i design.py's draw divided by its
standard deviation 4.5. Test rows: 10 held-out rows of every training cluster ("known") and the
100 new clusters of 50 rows ("new"). ``--family poisson`` draws counts y ~ Poisson(exp(eta)) from
the same eta instead, and fits the models' count versions.

Every model is fitted in a fresh subprocess (``families.py --one KEY --rows N`` prints one JSON
record), killed at its time limit, with **2 threads** for every model: BLAS and OpenMP
(GPBoost's ``num_threads`` too) set to 2, and scikit-learn's forests on ``n_jobs=-1`` (2 cores).
Scores on both test sets: log loss, AUC and Brier score (scikit-learn's); for counts the mean
Poisson deviance and the MSE. Results of every family and size run so far are kept in
``bench/results/families.json`` and ``families.md`` (a run replaces the family and size it ran,
written after every model); ``--quick`` writes ``families_quick.*`` (not committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.metrics import brier_score_loss, log_loss, mean_poisson_deviance, \
    mean_squared_error, roc_auc_score

from crossed import _commit_text, _library_source
from design import FEATURES, HELD_OUT_ROWS_PER_KNOWN_CLUSTER, M, NEW_CLUSTERS, SIGMA_B2, \
    TRAIN_CLUSTER_SIZES, Design, paper_design
from measure import FitMeter
from models import GPBOOST_PARAMS, GPBOOST_ROUNDS, MERF1_ITERATIONS, SEED, _warning_names
from report import _DASH, _number
from run import CHILD_ENVIRONMENT, _jsonable
from run import _environment as run_environment

from merf_dask.learners import DEFAULT_LEAF_ROWS as LEAF

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATA_SEED = 1
THREADS = 2
#: the children's BLAS/OpenMP threads: run.py's variables, at THREADS for every model
CHILD_THREADS = {name: str(THREADS) for name in CHILD_ENVIRONMENT}
TIME_LIMIT_S, QUICK_TIME_LIMIT_S, QUICK_ROWS = 1500, 120, 2_000
FORMULA = "y ~ " + " + ".join(FEATURES) + " + (1 | cluster)"
#: merf 1.0's workaround clips its regression predictions to [CLIP, 1 - CLIP]
CLIP = 1e-3
PACKAGES = ("merf-dask", "merf", "gpboost", "scikit-learn", "numpy", "pandas")

# Population moments of the paper's g(x) = 2 x1 + x2^2 + 4 1(x3 > 0) + 2 log|x1| x3, x ~ N(0, I):
# E g = 1 + 2 = 3; with c = -E log|x1| = (euler_gamma + log 2) / 2 and Var log|x1| = pi^2 / 8,
# Var g = 4 + 2 + 4 + 4 E[log^2|x1|] + 2 Cov(4 1(x3 > 0), 2 log|x1| x3)
#       = 10 + 4 (pi^2 / 8 + c^2) - 16 c / sqrt(2 pi)                (= 12.494, sd 3.535)
_C = (np.euler_gamma + np.log(2.0)) / 2
G_MEAN = 3.0
G_SD = float(np.sqrt(10 + 4 * (np.pi**2 / 8 + _C**2) - 16 * _C / np.sqrt(2 * np.pi)))
VAR_B = 1.0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------- data

def simulated_design(rows: int, seed: int = DATA_SEED, family: str = "binomial") -> Design:
    """design.paper_design's rows and clusters, y redrawn from eta (module doc): Bernoulli
    (``binomial``) or Poisson (``poisson``).

    The frames keep ``f_true`` (now the standardised log-odds or log-mean fixed part), ``b_true``
    (N(0, 1)) and ``mu_true``, the true mean of y given b; models see only ``cluster, y, x1, x2,
    x3``."""
    design = paper_design(rows, seed)
    rng = np.random.default_rng([seed, 2])  # the outcomes' own stream

    def redrawn(frame: pd.DataFrame) -> pd.DataFrame:
        f = (frame["f_true"].to_numpy() / M - G_MEAN) / G_SD
        b = frame["b_true"].to_numpy() / np.sqrt(SIGMA_B2) * np.sqrt(VAR_B)
        if family == "binomial":
            mu = expit(f + b)
            y = (rng.random(len(frame)) < mu).astype(np.int64)
        else:
            mu = np.exp(f + b)
            y = rng.poisson(mu)
        return frame.assign(y=y, f_true=f, b_true=b, mu_true=mu)

    return Design(train=redrawn(design.train), test_known=redrawn(design.test_known),
                  test_new=redrawn(design.test_new))


def _model_frame(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["cluster", "y", *FEATURES]]


def population_average(f: np.ndarray, family: str, var_b: float = VAR_B,
                       points: int = 40) -> np.ndarray:
    """E_b mean(f + b), b ~ N(0, var_b): the best prediction for a row of a cluster never seen
    (Gauss-Hermite quadrature for expit, exp(f + var_b / 2) for counts)."""
    if family == "poisson":
        return np.exp(f + var_b / 2)
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    return expit(f[:, None] + np.sqrt(var_b) * nodes[None, :]) @ (weights / weights.sum())


#: per family, the scores (key, column title) on each test set
METRICS = {"binomial": (("log_loss", "Log loss"), ("auc", "AUC"), ("brier", "Brier")),
           "poisson": (("deviance", "Poisson deviance"), ("mse", "MSE"))}


def _metric_values(family: str, y: np.ndarray, mu: np.ndarray) -> dict:
    if family == "binomial":
        return {"log_loss": log_loss(y, mu, labels=[0, 1]), "auc": roc_auc_score(y, mu),
                "brier": brier_score_loss(y, mu)}
    return {"deviance": mean_poisson_deviance(y, mu), "mse": mean_squared_error(y, mu)}


def scores(design: Design, predict: Callable[[pd.DataFrame], np.ndarray],
           family: str) -> dict:
    """METRICS[family] of the predicted mean (P(y = 1) or the mean count) on the known- and
    new-cluster test rows."""
    out = {}
    for name, frame in (("known", design.test_known), ("new", design.test_new)):
        y, mu = frame["y"].to_numpy(), np.asarray(predict(frame), dtype=float)
        out |= {f"{key}_{name}": float(value)
                for key, value in _metric_values(family, y, mu).items()}
        out |= {f"min_prediction_{name}": float(mu.min()),
                f"max_prediction_{name}": float(mu.max())}
    return out


# ------------------------------------------------------------------------------------- models

def _forest_settings(family: str) -> dict:
    """merf-dask's default forest's size for ``family``: the same trees for every forest of
    this benchmark."""
    from merf_dask.learners import default_learner
    params = default_learner(family=family).get_params()
    return {key: params[key] for key in ("n_estimators", "min_samples_leaf", "max_features",
                                         "n_jobs")}


def run_merf_dask(design: Design, family: str, *, learner: str | None = None) -> dict:
    """MERFClassifier (MERF(family="poisson") for counts) with its defaults: default forest (or
    the named ``learner``), honest predictions, Laplace ML, in this process."""
    from merf_dask import MERF, MERFClassifier
    from merf_dask.learners import make_learner

    fixed = None if learner is None else make_learner(learner, random_state=SEED, family=family)
    model = (MERFClassifier(fixed, formula=FORMULA, random_state=SEED) if family == "binomial"
             else MERF(fixed, formula=FORMULA, family=family, random_state=SEED))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            model.fit(_model_frame(design.train))
    components = model.variance_components_.set_index("grp")["vcov"]

    def predict(frame, new_levels="average"):
        frame = frame[["cluster", *FEATURES]]
        if family == "binomial":
            return model.predict_proba(frame, new_levels=new_levels)[:, 1]
        return model.predict(frame, new_levels=new_levels)

    zero = scores(design, lambda frame: predict(frame, "zero"), family)
    return {**meter.as_dict(), **scores(design, predict, family),
            "new_levels_zero": {k: v for k, v in zero.items() if k.endswith("_new")},
            "var_b": float(components["cluster"]), "iterations": model.n_iter_,
            "converged": bool(model.converged_),
            "m_step_seconds": float(sum(r.m_step_seconds for r in model.history_)),
            "e_step_seconds": float(sum(r.e_step_seconds for r in model.history_)),
            "warnings": _warning_names(caught)}


def run_merf_dask_warm_boosting(design: Design, family: str) -> dict:
    """merf-dask with the warm-boosting learner (merf_dask.learners), in this process."""
    return run_merf_dask(design, family, learner="warm-boosting")


GPBOOST_LIKELIHOODS = {"binomial": "bernoulli_logit", "poisson": "poisson"}


def run_gpboost(design: Design, family: str) -> dict:
    """GPBoost: boosted trees (models.GPBOOST_PARAMS, 250 rounds) and a grouped random intercept,
    likelihood bernoulli_logit (poisson for counts), on THREADS threads; the predicted mean from
    predict(pred_latent=False), which for new clusters averages over their effect."""
    import gpboost as gpb

    X, y = design.train[FEATURES].to_numpy(), design.train["y"].to_numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            gp_model = gpb.GPModel(group_data=design.train["cluster"].to_numpy(),
                                   likelihood=GPBOOST_LIKELIHOODS[family],
                                   num_parallel_threads=THREADS)
            booster = gpb.train(params={**GPBOOST_PARAMS, "num_threads": THREADS},
                                train_set=gpb.Dataset(X, y), gp_model=gp_model,
                                num_boost_round=GPBOOST_ROUNDS)

    def predict(frame):
        return booster.predict(data=frame[FEATURES].to_numpy(),
                               group_data_pred=frame["cluster"].to_numpy(),
                               predict_var=False, pred_latent=False)["response_mean"]

    return {**meter.as_dict(), **scores(design, predict, family),
            "var_b": float(gp_model.get_cov_pars()["Group_1"].iloc[0]),
            "iterations": GPBOOST_ROUNDS, "warnings": _warning_names(caught)}


def run_random_forest(design: Design, family: str) -> dict:
    """scikit-learn RandomForestClassifier (for counts RandomForestRegressor) with merf-dask's
    forest settings, no random effects."""
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    forest_class = RandomForestClassifier if family == "binomial" else RandomForestRegressor
    forest = forest_class(**_forest_settings(family), random_state=SEED)
    with FitMeter() as meter:
        forest.fit(design.train[FEATURES].to_numpy(), design.train["y"].to_numpy())

    def predict(frame):
        X = frame[FEATURES].to_numpy()
        return forest.predict_proba(X)[:, 1] if family == "binomial" else forest.predict(X)

    return {**meter.as_dict(), **scores(design, predict, family), "iterations": None}


def run_merf1_clip(design: Design, family: str) -> dict:
    """merf 1.0 (a regression MERF) on the 0/1 outcome (or the counts) with merf-dask's forest
    settings, 20 iterations; its predictions (f + b, b = 0 for new clusters) clipped to
    [CLIP, 1 - CLIP] (counts: to >= CLIP)."""
    from sklearn.ensemble import RandomForestRegressor

    from merf import MERF as MERF1  # merf/__init__.py calls logging.basicConfig(level=INFO)
    logging.getLogger().setLevel(logging.WARNING)

    def inputs(frame):
        return frame[FEATURES].to_numpy(), np.ones((len(frame), 1)), frame["cluster"]

    upper = 1 - CLIP if family == "binomial" else np.inf
    model = MERF1(RandomForestRegressor(**_forest_settings(family), random_state=SEED),
                  max_iterations=MERF1_ITERATIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            model.fit(*inputs(design.train), design.train["y"].to_numpy().astype(float))
    raw = {name: model.predict(*inputs(frame))
           for name, frame in (("known", design.test_known), ("new", design.test_new))}
    return {**meter.as_dict(),
            **scores(design, lambda frame: np.clip(model.predict(*inputs(frame)), CLIP, upper),
                     family),
            "share_clipped": {name: float(np.mean((p < CLIP) | (p > upper)))
                              for name, p in raw.items()},
            "var_b": float(np.asarray(model.D_hat_history[-1])[0, 0]),
            "sigma2": float(model.sigma2_hat_history[-1]),
            "iterations": len(model.gll_history), "warnings": _warning_names(caught)}


_MERF1_SKIP = ("skipped: merf 1.0 took 331 s for 5 iterations at 100k rows (merf-algorithm.md "
               "5.2); 20 iterations at 2M rows are far beyond the time limit")
#: key: ({family: label}, runner, largest training rows or None, reason to skip above it)
MODELS: dict[str, tuple[dict[str, str], Callable[[Design, str], dict], int | None, str]] = {
    "merf_dask": ({"binomial": f"merf-dask MERFClassifier, defaults (100 trees, leaf "
                               f"{LEAF['binomial']}, OOB, Laplace ML)",
                   "poisson": f"merf-dask MERF(family=\"poisson\"), defaults (100 trees, leaf "
                              f"{LEAF['poisson']}, OOB, Laplace ML)"}, run_merf_dask, None, ""),
    "merf_dask_warm_boosting": ({family: f"merf-dask, warm-boosting (100 rounds grown over the "
                                         f"iterations, cross-fitted), Laplace ML"
                                 for family in ("binomial", "poisson")},
                                run_merf_dask_warm_boosting, None, ""),
    "gpboost": ({family: f"GPBoost, {likelihood} ({GPBOOST_ROUNDS} rounds, {THREADS} threads)"
                 for family, likelihood in GPBOOST_LIKELIHOODS.items()}, run_gpboost, None, ""),
    "random_forest": ({"binomial": f"sklearn RandomForestClassifier (100 trees, leaf "
                                   f"{LEAF['binomial']}), no random effects",
                       "poisson": f"sklearn RandomForestRegressor (100 trees, leaf "
                                  f"{LEAF['poisson']}), no random effects"},
                      run_random_forest, None, ""),
    "merf1_clip": ({"binomial": f"merf 1.0 regression on 0/1 y, clipped to [{CLIP:g}, "
                                f"{1 - CLIP:g}] (100 trees, leaf {LEAF['binomial']}, "
                                f"{MERF1_ITERATIONS} it.)",
                    "poisson": f"merf 1.0 regression on the counts, clipped to >= {CLIP:g} "
                               f"(100 trees, leaf {LEAF['poisson']}, {MERF1_ITERATIONS} it.)"},
                   run_merf1_clip, 20_000, _MERF1_SKIP),
}


# -------------------------------------------------------------------------------- orchestration

#: a model is not started with less time than this before the run's --deadline
MIN_START_S = 60


def _run_model(key: str, family: str, rows: int, seed: int, time_limit_s: int,
               deadline: datetime | None) -> dict:
    labels, _, max_rows, skip_reason = MODELS[key]
    base = {"key": key, "label": labels[family], "rows": rows, "time_limit_s": time_limit_s}
    if max_rows is not None and rows > max_rows:
        return {**base, "status": "skipped", "note": skip_reason}
    limit_s, cut = time_limit_s, ""
    if deadline is not None:
        left_s = int((deadline - datetime.now(timezone.utc)).total_seconds())
        if left_s < MIN_START_S:
            return {**base, "status": "not run",
                    "note": f"not started: the run's deadline ({deadline:%H:%M} UTC) was "
                            f"{max(left_s, 0)} s away"}
        if left_s < limit_s:
            limit_s, cut = left_s, f" (cut to the run's deadline, {deadline:%H:%M} UTC)"
    base["time_limit_s"] = limit_s
    command = [sys.executable, __file__, "--one", key, "--family", family, "--rows", str(rows),
               "--seed", str(seed)]
    start = time.perf_counter()
    try:  # subprocess.run kills the child at the limit (in-process fits: no grandchildren)
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit_s,
                              env={**os.environ, **CHILD_THREADS})
    except subprocess.TimeoutExpired:
        return {**base, "status": "not finished", "note": f"not done in {limit_s} s{cut}"}
    base["subprocess_seconds"] = time.perf_counter() - start
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no stderr)"]
        return {**base, "status": "failed", "note": f"exit {done.returncode}: {lines[-1][:300]}",
                "stderr_tail": lines[-30:]}
    return {**base, "status": "ok", **json.loads(done.stdout.strip().splitlines()[-1])}


def _data_summary(design: Design, family: str) -> dict:
    train = design.train
    b = train.groupby("cluster")["b_true"].first()
    truth = {id(design.test_known): design.test_known["mu_true"].to_numpy(),
             id(design.test_new): population_average(design.test_new["f_true"].to_numpy(),
                                                     family)}
    summary = {"train_rows": len(train), "train_clusters": int(train["cluster"].nunique()),
               "test_known_rows": len(design.test_known),
               "test_new_rows": len(design.test_new),
               "test_new_clusters": int(design.test_new["cluster"].nunique()),
               "mean_y_train": float(train["y"].mean()), "max_y_train": int(train["y"].max()),
               "var_b_true": VAR_B, "var_b_realised": float(b.var()),
               "oracle": scores(design, lambda frame: truth[id(frame)], family)}
    if family == "binomial":
        summary["share_mu_true_outside_5_95"] = float(np.mean((train["mu_true"] < 0.05)
                                                              | (train["mu_true"] > 0.95)))
    return summary


def run_size(family: str, rows: int, seed: int, models: list[str], time_limit_s: int,
             deadline: datetime | None, write: Callable[[dict], None]) -> dict:
    """Every model at one size, one after the other; ``write`` gets the result after each."""
    start = time.perf_counter()
    result = {"family": family, "rows": rows, "seed": seed, "time_limit_s": time_limit_s,
              "deadline": None if deadline is None else deadline.isoformat(timespec="minutes"),
              "date_start": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_average_start": os.getloadavg(), "merf_dask": _library_source(),
              "data": _data_summary(simulated_design(rows, seed, family), family), "runs": [],
              "not_run": [{"what": MODELS[key][0][family],
                           "reason": "left out of this run (--models)"}
                          for key in MODELS if key not in models]}
    for key in models:
        run = _run_model(key, family, rows, seed, time_limit_s, deadline)
        _log(f"[{family}, {rows:,} rows] {key}: {run['status']}"
             + (f", fit {run['fit_seconds']:.1f} s" if run["status"] == "ok"
                else f" ({run.get('note', '')})"))
        result["runs"].append(run)
        result |= {"load_average_end": os.getloadavg(), "wall_seconds": time.perf_counter() - start,
                   "date_end": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write(result)
    return result


# ------------------------------------------------------------------------------------- report

HEADER = f"""# Binary and count outcomes: merf-dask's MERFClassifier side by side

`bench/families.py`: bench/design.py's data (the MERF paper's g(x), training clusters of
{'/'.join(map(str, TRAIN_CLUSTER_SIZES))} rows, the Gaussian side by side's rows, x and cluster
draws) on the logit scale: **eta = (g(x) - 3) / {G_SD:.3f} + b_i** (g standardised by its
population mean and sd), **b_i ~ N(0, {VAR_B:g})** (design.py's b_i / 4.5),
**y ~ Bernoulli(expit(eta))**; counts (`--family poisson`, where run): y ~ Poisson(exp(eta)).
Test rows: {HELD_OUT_ROWS_PER_KNOWN_CLUSTER} held-out rows of every training cluster ("known")
and {NEW_CLUSTERS} new clusters of 50 rows ("new"). One data seed ({DATA_SEED}).

Models (fixed effects from {', '.join(FEATURES)}; every one in its own subprocess, killed at the
time limit, **{THREADS} threads each**: `OPENBLAS/MKL/OMP_NUM_THREADS={THREADS}`, scikit-learn
forests `n_jobs=-1`, GPBoost `num_threads={THREADS}`):

* merf-dask `MERFClassifier(formula="y ~ x1 + x2 + x3 + (1 | cluster)", random_state=0)`
  (counts: `MERF(..., family="poisson")`): default forest (100 trees, min_samples_leaf
  {LEAF['binomial']} for binary outcomes, {LEAF['poisson']} for counts, max_features 1.0, honest
  out-of-bag predictions), Laplace ML, default `max_iterations` (20) and
  tol, pandas in-process; new clusters get the population-averaged prediction
  (`new_levels="average"`, the default);
* merf-dask with the `warm-boosting` learner (scikit-learn's histogram boosting, 100 rounds
  grown over the first 10 iterations on the working response, cross-fitted on 2 folds), the
  rest as above;
* GPBoost `GPModel(group_data=cluster, likelihood="bernoulli_logit")` (counts: `"poisson"`) +
  `gpb.train` with bench/models.py's parameters (learning rate 0.05, max depth 6, 64 leaves,
  min_data_in_leaf 20, **{GPBOOST_ROUNDS} rounds fixed**, no CV), predictions from
  `predict(..., predict_var=False, pred_latent=False)`;
* scikit-learn `RandomForestClassifier` (counts: `RandomForestRegressor`) with merf-dask's forest
  settings for the family (the same trees), no random effects;
* merf 1.0's workaround: `merf.MERF` regression on the 0/1 outcome (the same forest,
  {MERF1_ITERATIONS} iterations), predictions (b = 0 for new clusters) clipped to
  [{CLIP:g}, {1 - CLIP:g}] (counts: to >= {CLIP:g}); not run at 2M rows.

Measured: **fit time** (the fit only, data in memory), **peak RSS** of the model's process
during the fit (sampled every 20 ms), and on both test sets scikit-learn's **log loss** (which
clips probabilities at machine epsilon), **AUC** and **Brier score** (counts: mean Poisson
deviance and MSE); the estimated Var(b) (true {VAR_B:g}). The oracle row scores the true mean
(known clusters) and the true population-averaged one, E_b mean(f + b) (new clusters): the
floor. Machine: a 2-vCPU VM with 23 GB, **2 shared cores**, so times are noisy (1.5-2 x between
runs); scores and estimates are deterministic given the seeds.
"""

FAMILY_TITLES = {"binomial": "Binary outcomes", "poisson": "Counts"}


def _notes(run: dict) -> str:
    notes = []
    if run.get("converged") is False:
        notes.append("stopped at max_iterations")
    if "share_clipped" in run:
        notes.append("raw predictions clipped: {known:.1%} known, {new:.1%} new".format(
            **run["share_clipped"]))
    notes += [f"warned {name}" for name in run.get("warnings", [])]
    if run["status"] != "ok":
        notes.append(run["note"])
    return "; ".join(notes)


def _row(family: str, label: str, run: dict, cells: list[str], notes: str) -> str:
    """cells: fit, RSS, then after the scores Var(b) and iterations."""
    values = [_number(run.get(f"{metric}_{where}"), 3)
              for where in ("known", "new") for metric, _ in METRICS[family]]
    return "| " + " | ".join([label, *cells[:2], *values, *cells[2:], notes]) + " |"


def _size_markdown(result: dict) -> list[str]:
    family, data = result["family"], result["data"]
    load = f"{result['load_average_start'][0]:.1f}-{result.get('load_average_end', [0])[0]:.1f}"
    outcome = (f"{data['mean_y_train']:.1%} of training y are 1, "
               f"{data['share_mu_true_outside_5_95']:.1%} of true probabilities outside "
               "[0.05, 0.95]" if family == "binomial" else
               f"training counts average {data['mean_y_train']:.2f} (largest {data['max_y_train']})")
    titles = [f"{title} {where}" for where in ("known", "new") for _, title in METRICS[family]]
    lines = [f"## {FAMILY_TITLES[family]}, {result['rows']:,} training rows", "",
             f"{data['train_clusters']:,} training clusters, {data['test_known_rows']:,} "
             f"known-cluster and {data['test_new_rows']:,} new-cluster test rows; {outcome}. "
             f"Run {result['date_start']} to {result.get('date_end', '?')} "
             f"({result.get('wall_seconds', 0) / 60:.1f} min, load average {load}), merf-dask "
             f"{_commit_text(result['merf_dask'])}, time limit {result['time_limit_s']} s per "
             "model.", "",
             "| " + " | ".join(["Model", "Fit (s)", "Peak RSS (MB)", *titles, "Var(b) est.",
                                "Iterations", "Notes"]) + " |",
             "|" + "---|" * (6 + len(titles))]
    for run in result["runs"]:
        fit = {"ok": _number(run.get("fit_seconds"), 1),
               "not finished": f"> {run['time_limit_s']}"}.get(run["status"], _DASH)
        lines.append(_row(family, run["label"], run, [
            fit, _number(run.get("peak_rss_mb"), 0), _number(run.get("var_b"), 3),
            _DASH if run.get("iterations") is None else str(run["iterations"])], _notes(run)))
    lines.append(_row(family, "Oracle: true means (floor)", data["oracle"], [
        _DASH, _DASH, f"{data['var_b_true']:g} (true); realised {data['var_b_realised']:.3f}",
        _DASH], "new clusters: E_b mean(f + b)"))
    merf = next((run for run in result["runs"] if run["key"] == "merf_dask"
                 and run["status"] == "ok"), None)
    if merf:
        zero = ", ".join(f"{title} {merf['new_levels_zero'][f'{key}_new']:.3f}"
                         for key, title in METRICS[family])
        lines += ["", f"merf-dask: M-step {merf['m_step_seconds']:.1f} s and E-step "
                      f"{merf['e_step_seconds']:.1f} s in all; with `new_levels=\"zero\"` "
                      f"(b = 0, the median cluster) the new clusters score {zero}."]
    if result["not_run"]:
        lines += ["", *[f"* Not run: {item['what']}: {item['reason']}"
                        for item in result["not_run"]]]
    return lines


def _existing_findings(path: Path) -> str:
    """The hand-written "## Findings" section of an earlier report, kept across reruns."""
    text = path.read_text() if path.exists() else ""
    return text[text.index("## Findings"):] if "## Findings" in text else ""


def _order(name: str) -> tuple:
    family, rows = name.split()
    return list(METRICS).index(family), int(rows)


def write_results(result: dict, quick: bool) -> Path:
    """Put one size's result into families.json (replacing that family and size) and rewrite
    the .md."""
    stem = "families_quick" if quick else "families"
    json_path, md_path = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md"
    results = json.loads(json_path.read_text()) if json_path.exists() else {"sizes": {}}
    results["environment"] = {**run_environment(PACKAGES), "child_environment": CHILD_THREADS}
    results["sizes"][f"{result['family']} {result['rows']}"] = result
    results["sizes"] = dict(sorted(results["sizes"].items(), key=lambda item: _order(item[0])))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=_jsonable))
    lines = [HEADER]
    for size in results["sizes"].values():
        lines += [*_size_markdown(size), ""]
    findings = _existing_findings(md_path)
    md_path.write_text("\n".join(lines) + ("\n" + findings if findings else ""))
    return md_path


# ---------------------------------------------------------------------------------------- main

def _deadline(text: str | None) -> datetime | None:
    """HH:MM (UTC, today) as a datetime."""
    if text is None:
        return None
    hours, minutes = map(int, text.split(":"))
    return datetime.now(timezone.utc).replace(hour=hours, minute=minutes, second=0,
                                              microsecond=0)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ROWS:,} rows, {QUICK_TIME_LIMIT_S} s limits; writes "
                             "families_quick.*")
    parser.add_argument("--rows", type=int, nargs="+",
                        help="training rows, multiples of 200 (e.g. 20000 2000000)")
    parser.add_argument("--family", choices=list(METRICS), default="binomial",
                        help="binary outcomes (default) or counts")
    parser.add_argument("--seed", type=int, default=DATA_SEED, help="data seed")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), metavar="KEY",
                        help=f"run only these models (default: all of {', '.join(MODELS)})")
    parser.add_argument("--time-limit", type=int,
                        help=f"seconds per model (default {TIME_LIMIT_S}; --quick "
                             f"{QUICK_TIME_LIMIT_S})")
    parser.add_argument("--deadline", metavar="HH:MM",
                        help="UTC time by which every model must end: a model's limit is cut "
                             f"to it, and none starts less than {MIN_START_S} s before it")
    parser.add_argument("--one", choices=sorted(MODELS), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    rows_list = args.rows or ([QUICK_ROWS] if args.quick else [20_000])
    if args.one:
        record = MODELS[args.one][1](simulated_design(rows_list[0], args.seed, args.family),
                                     args.family)
        print(json.dumps(record, default=_jsonable))
        return
    time_limit_s = args.time_limit or (QUICK_TIME_LIMIT_S if args.quick else TIME_LIMIT_S)
    md_path = RESULTS_DIR / ("families_quick.md" if args.quick else "families.md")
    for rows in rows_list:
        run_size(args.family, rows, args.seed, args.models or list(MODELS), time_limit_s,
                 _deadline(args.deadline), lambda result: write_results(result, args.quick))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
