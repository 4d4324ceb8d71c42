"""merf's gain experiment, re-run with merf-dask's defaults, next to the published notebook values.

For each of the six (m, Var(b)) scenarios of :data:`merf_dask.simulate.GAIN_SCENARIOS` and each
repetition (seed 1000 * scenario + repetition), :func:`merf_dask.simulate.gain_experiment` gives
500 training rows of 100 known clusters, 4,500 held-out rows of those clusters and 5,000 rows of
100 new clusters. A plain random forest (scikit-learn, 100 trees) and merf-dask's default MERF are
fitted on the same rows; the gain is 100 * (MSE_rf - MSE_merf) / MSE_rf, averaged over repetitions.

The published values are the "MERF Gain Experiment" notebook's (merf 0.2/0.3 with out-of-bag
predictions, 300 trees, 100 iterations, 10 repetitions; merf-algorithm.md section 2.2).

run_gain
    Fit and score every scenario and repetition; summarise per scenario.
gain_markdown
    The summary as a Markdown table.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.ensemble import RandomForestRegressor

from design import model_inputs
from merf_dask import MERF
from merf_dask.simulate import GAIN_SCENARIOS, gain_experiment

PUBLISHED_GAIN_KNOWN = (17.7, 50.0, 68.7, 5.5, 19.2, 33.8)
PUBLISHED_GAIN_NEW = (1.3, 3.4, -0.4, 0.4, 2.5, 4.7)


def _gain(mse_rf: float, mse_merf: float) -> float:
    return 100.0 * (mse_rf - mse_merf) / mse_rf


def _mse(y: np.ndarray, prediction: np.ndarray) -> float:
    return float(np.mean((y - prediction) ** 2))


def _one_repetition(scenario: int, repetition: int) -> dict:
    train, test_known, test_new = gain_experiment(scenario, seed=1000 * scenario + repetition)
    X, Z, clusters, y = model_inputs(train)
    forest = RandomForestRegressor(n_estimators=100, n_jobs=-1, random_state=repetition)
    forest.fit(X, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merf = MERF(random_state=repetition).fit(X, Z, clusters, y)
    record = {"scenario": scenario, "repetition": repetition, "iterations": merf.n_iter_,
              "sigma2": float(merf.sigma2_), "var_b": float(merf.D_[0, 0]),
              "warnings": sorted({w.category.__name__ for w in caught})}
    for name, frame in (("known", test_known), ("new", test_new)):
        X_test, Z_test, clusters_test, y_test = model_inputs(frame)
        mse_rf = _mse(y_test, forest.predict(X_test))
        mse_merf = _mse(y_test, merf.predict(X_test, Z_test, clusters_test))
        record.update({f"mse_rf_{name}": mse_rf, f"mse_merf_{name}": mse_merf,
                       f"gain_{name}": _gain(mse_rf, mse_merf)})
    return record


def _summary(scenario: int, records: list[dict]) -> dict:
    m, sigma_b2 = GAIN_SCENARIOS[scenario]

    def mean(field):
        return float(np.mean([r[field] for r in records]))

    def sd(field):
        return float(np.std([r[field] for r in records], ddof=1)) if len(records) > 1 else None

    return {"scenario": scenario, "m": m, "sigma_b2": sigma_b2, "repetitions": len(records),
            **{f"mean_{field}": mean(field) for field in (
                "mse_rf_known", "mse_merf_known", "gain_known", "mse_rf_new", "mse_merf_new",
                "gain_new", "sigma2", "var_b", "iterations")},
            "sd_gain_known": sd("gain_known"), "sd_gain_new": sd("gain_new"),
            "published_gain_known": PUBLISHED_GAIN_KNOWN[scenario],
            "published_gain_new": PUBLISHED_GAIN_NEW[scenario],
            "warnings": sorted({name for r in records for name in r["warnings"]})}


def run_gain(repetitions: int, progress=print) -> dict:
    """Every scenario x repetition; returns the records, per-scenario summaries and wall time."""
    start = time.perf_counter()
    records, summaries = [], []
    for scenario in range(len(GAIN_SCENARIOS)):
        scenario_records = [_one_repetition(scenario, rep) for rep in range(repetitions)]
        records += scenario_records
        summaries.append(_summary(scenario, scenario_records))
        progress(f"gain scenario {scenario}: done after {time.perf_counter() - start:.0f} s")
    return {"repetitions": repetitions, "records": records, "summary": summaries,
            "wall_seconds": time.perf_counter() - start}


def _with_sd(mean: float, sd: float | None) -> str:
    return f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f}"


def gain_markdown(result: dict) -> str:
    """Per-scenario gains (mean ± sd over repetitions) next to the notebook's."""
    lines = [f"merf's gain experiment, {result['repetitions']} repetitions per scenario "
             f"({result['wall_seconds'] / 60:.1f} min). merf-dask defaults (100 trees, "
             "min_samples_leaf 5, OOB, <= 20 iterations, tol 1e-3) vs scikit-learn "
             "RandomForestRegressor(100 trees). Notebook: merf 0.2/0.3 (OOB), 300 trees, "
             "100 iterations, 10 repetitions. sigma2 true = 1.", "",
             "| exp | m | Var(b) | MSE RF known | MSE merf-dask known | gain known (ours) "
             "| gain known (notebook) | MSE RF new | MSE merf-dask new | gain new (ours) "
             "| gain new (notebook) | sigma2 est. | Var(b) est. | iterations (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        lines.append("| " + " | ".join([
            str(s["scenario"]), f"{s['m']}", f"{s['sigma_b2']}",
            f"{s['mean_mse_rf_known']:.2f}", f"{s['mean_mse_merf_known']:.2f}",
            _with_sd(s["mean_gain_known"], s["sd_gain_known"]), f"{s['published_gain_known']}",
            f"{s['mean_mse_rf_new']:.2f}", f"{s['mean_mse_merf_new']:.2f}",
            _with_sd(s["mean_gain_new"], s["sd_gain_new"]), f"{s['published_gain_new']}",
            f"{s['mean_sigma2']:.2f}", f"{s['mean_var_b']:.2f}",
            f"{s['mean_iterations']:.1f}"]) + " |")
    warned = sorted({name for s in result["summary"] for name in s["warnings"]})
    if warned:
        lines += ["", "Warnings raised by merf-dask during these fits: " + ", ".join(warned)
                  + " (per scenario in gain.json)."]
    return "\n".join(lines) + "\n"
