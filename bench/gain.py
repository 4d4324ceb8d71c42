"""merf's gain experiment, re-run with merf-dask, next to the published notebook values.

For each of the six (m, Var(b)) scenarios of :data:`merf_dask.simulate.GAIN_SCENARIOS` and each
repetition (seed 1000 * scenario + repetition), :func:`merf_dask.simulate.gain_experiment` gives
500 training rows of 100 known clusters, 4,500 held-out rows of those clusters and 5,000 rows of
100 new clusters. On the same rows we fit a plain random forest (scikit-learn, 100 trees) and two
merf-dask variants (:data:`MERF_VARIANTS`): its default forest (min_samples_leaf 5), the plain
forest's settings (min_samples_leaf 1) with OOB, so the gain of the random effects alone shows,
and the ``warm-boosting`` learner.
The gain is 100 * (MSE_rf - MSE_merf) / MSE_rf, averaged over repetitions.

The published values are the "MERF Gain Experiment" notebook's (merf 0.2/0.3 with out-of-bag
predictions, 300 trees, 100 iterations, 10 repetitions; merf-algorithm.md section 2.2).

run_gain
    Fit and score every scenario and repetition; summarise per scenario.
gain_markdown
    The summary as two Markdown tables (gains; MSEs and estimates).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.ensemble import RandomForestRegressor

from design import model_inputs
from merf_dask import MERF
from merf_dask.learners import make_learner
from merf_dask.simulate import GAIN_SCENARIOS, gain_experiment

PUBLISHED_GAIN_KNOWN = (17.7, 50.0, 68.7, 5.5, 19.2, 33.8)
PUBLISHED_GAIN_NEW = (1.3, 3.4, -0.4, 0.4, 2.5, 4.7)
#: merf-dask variant -> fixed-effects learner for a repetition (None: merf-dask's default)
MERF_VARIANTS = {
    "default": lambda repetition: None,
    "leaf1": lambda repetition: RandomForestRegressor(n_estimators=100, oob_score=True,
                                                      n_jobs=-1, random_state=repetition),
    "warm_boosting": lambda repetition: make_learner("warm-boosting", random_state=repetition),
}
VARIANT_LABELS = {"default": "default", "leaf1": "leaf 1", "warm_boosting": "warm-boosting"}
_SUMMED_FIELDS = [f"mse_rf_{part}" for part in ("known", "new")] + [
    f"{field}_{variant}" for variant in MERF_VARIANTS
    for field in ("mse_known", "mse_new", "gain_known", "gain_new", "sigma2", "var_b",
                  "iterations")]


def _mse(y: np.ndarray, prediction: np.ndarray) -> float:
    return float(np.mean((y - prediction) ** 2))


def _one_repetition(scenario: int, repetition: int) -> dict:
    train, test_known, test_new = gain_experiment(scenario, seed=1000 * scenario + repetition)
    X, Z, clusters, y = model_inputs(train)
    tests = {"known": model_inputs(test_known), "new": model_inputs(test_new)}
    forest = RandomForestRegressor(n_estimators=100, n_jobs=-1, random_state=repetition)
    forest.fit(X, y)
    record = {"scenario": scenario, "repetition": repetition, "warnings": []}
    for part, (X_test, _, _, y_test) in tests.items():
        record[f"mse_rf_{part}"] = _mse(y_test, forest.predict(X_test))
    for variant, learner in MERF_VARIANTS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merf = MERF(learner(repetition), random_state=repetition).fit(X, Z, clusters, y)
        record.update({f"iterations_{variant}": merf.n_iter_,
                       f"sigma2_{variant}": float(merf.sigma2_),
                       f"var_b_{variant}": float(merf.D_[0, 0])})
        record["warnings"] += [f"{variant}: {w.category.__name__}" for w in caught]
        for part, (X_test, Z_test, clusters_test, y_test) in tests.items():
            mse = _mse(y_test, merf.predict(X_test, Z_test, clusters_test))
            mse_rf = record[f"mse_rf_{part}"]
            record[f"mse_{part}_{variant}"] = mse
            record[f"gain_{part}_{variant}"] = 100.0 * (mse_rf - mse) / mse_rf
    record["warnings"] = sorted(set(record["warnings"]))
    return record


def _summary(scenario: int, records: list[dict]) -> dict:
    m, sigma_b2 = GAIN_SCENARIOS[scenario]
    summary = {"scenario": scenario, "m": m, "sigma_b2": sigma_b2, "repetitions": len(records),
               "published_gain_known": PUBLISHED_GAIN_KNOWN[scenario],
               "published_gain_new": PUBLISHED_GAIN_NEW[scenario],
               "warnings": sorted({name for r in records for name in r["warnings"]})}
    for field in _SUMMED_FIELDS:
        values = [r[field] for r in records]
        summary[f"mean_{field}"] = float(np.mean(values))
        summary[f"sd_{field}"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return summary


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


def _mean_sd(summary: dict, field: str) -> str:
    mean, sd = summary[f"mean_{field}"], summary[f"sd_{field}"]
    return f"{mean:.1f}" if sd is None else f"{mean:.1f} ± {sd:.1f}"


def _variant_pair(summary: dict, field: str, digits: int = 2) -> str:
    return " / ".join(f"{summary[f'mean_{field}_{variant}']:.{digits}f}"
                      for variant in MERF_VARIANTS)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def gain_markdown(result: dict) -> str:
    """Per-scenario gains (mean ± sd over repetitions) next to the notebook's; MSEs, estimates."""
    summaries = result["summary"]
    labels = [VARIANT_LABELS[variant] for variant in MERF_VARIANTS]
    lines = [f"merf's gain experiment, {result['repetitions']} repetitions per scenario "
             f"({result['wall_seconds'] / 60:.1f} min). Gain over scikit-learn "
             "RandomForestRegressor(100 trees) = 100 (MSE_rf - MSE_merf) / MSE_rf, mean ± sd "
             "over repetitions. merf-dask *default*: 100 trees, min_samples_leaf 5, OOB, <= 20 "
             "iterations, tol 1e-3; *leaf 1*: the same with the RF baseline's forest "
             "(min_samples_leaf 1); *warm-boosting*: the learner of that name "
             "(merf_dask.learners). Notebook: merf 0.2/0.3 (OOB), 300 trees, 100 iterations, "
             "10 repetitions.", "",
             _row(["exp", "m", "Var(b)", *[f"gain known, {label}" for label in labels],
                   "gain known, notebook", *[f"gain new, {label}" for label in labels],
                   "gain new, notebook"]),
             "|---" * (5 + 2 * len(labels)) + "|"]
    for s in summaries:
        lines.append(_row([str(s["scenario"]), f"{s['m']}", f"{s['sigma_b2']}",
                           *[_mean_sd(s, f"gain_known_{variant}") for variant in MERF_VARIANTS],
                           f"{s['published_gain_known']}",
                           *[_mean_sd(s, f"gain_new_{variant}") for variant in MERF_VARIANTS],
                           f"{s['published_gain_new']}"]))
    lines += ["", f"Mean MSEs and estimates (true sigma2 = 1; {' / '.join(labels)}):", "",
              f"| exp | MSE known: RF, {', '.join(labels)} | MSE new: RF, {', '.join(labels)} "
              "| sigma2 est. | Var(b) est. (true) | iterations |",
              "|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(_row([
            str(s["scenario"]),
            ", ".join(f"{s[f'mean_mse_{field}']:.2f}" for field in
                      ["rf_known", *[f"known_{variant}" for variant in MERF_VARIANTS]]),
            ", ".join(f"{s[f'mean_mse_{field}']:.2f}" for field in
                      ["rf_new", *[f"new_{variant}" for variant in MERF_VARIANTS]]),
            _variant_pair(s, "sigma2"), f"{_variant_pair(s, 'var_b')} ({s['sigma_b2']})",
            _variant_pair(s, "iterations", digits=1)]))
    warned = sorted({name for s in summaries for name in s["warnings"]})
    if warned:
        lines += ["", "Warnings raised by merf-dask during these fits: " + ", ".join(warned)
                  + " (per scenario in gain.json)."]
    return "\n".join(lines) + "\n"
