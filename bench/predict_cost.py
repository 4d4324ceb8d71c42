"""What the honest prediction of every row costs next to the fit, learner by learner.

Every EM iteration fits the learner's members (:func:`merf_dask.core.ensemble.fit_members`) and then
predicts every training row with members that did not train on it
(:func:`merf_dask.core.ensemble.honest_predictions`). The prediction is work a plain fit of the
learner never does, so an iteration costs at least ``fit + predict``: a cost ratio below
``1 + predict / fit`` (relative to the members' fit) is out of reach however little the EM,
scheduling and I/O add. This script measures both halves of one M-step's learner work, on one
thread (as every task on a Dask worker runs), for every named learner on the paper's process at
``--rows`` rows (default 1,000,000, rows/100 clusters), with the plan merf-dask's defaults make:

* bagged forests: 100 trees, each on the clusters of one residue class (rows / stride rows), and
  ``ceil(100 / e) = 37`` honest trees per row;
* cross-fitted learners: 2 members of rows / 2 rows each, each row predicted by the other one.

It also times the fitted default forest predicting the same rows in their own order and in the
leaf order of its first tree (:func:`merf_dask.core.ensemble.predict_fixed_effects`): the cache effect
that the honest predictions of trees use.

Usage::

    .venv/bin/python bench/predict_cost.py [--rows 1000000]

Writes ``bench/results/predict_cost.json`` and ``predict_cost.md``.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"  # before numpy / scikit-learn / LightGBM start their pools

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import StolenCPU  # noqa: E402

from merf_dask.core.em import PartitionArrays  # noqa: E402
from merf_dask.core.ensemble import (assemble_model, fit_members, honest_predictions,  # noqa: E402
                                plan_members, predict_fixed_effects, training_pieces)
from merf_dask.learners import LEARNERS, make_learner  # noqa: E402
from merf_dask.simulate import simulate_frame  # noqa: E402

RESULTS = HERE / "results"
HONEST_LEARNERS = [name for name in LEARNERS if name != "linear"]  # linear fits in-sample


def training_rows(n_rows: int) -> PartitionArrays:
    """The paper's process, rows/100 clusters, as the arrays of one partition."""
    frame = simulate_frame(n_rows=n_rows, n_clusters=n_rows // 100, seed=0)
    codes, cluster_ids = pd.factorize(frame["cluster"])
    return PartitionArrays.from_arrays(
        X=frame[["x1", "x2", "x3"]].to_numpy(), Z=[np.ones((n_rows, 1))],
        y=frame["y"].to_numpy(), codes=[codes.astype(np.int64)], levels=[cluster_ids])


def one_thread(learner):
    if "n_jobs" in learner.get_params():
        learner.set_params(n_jobs=1)
    return learner


def learner_cost(name: str, part: PartitionArrays) -> dict:
    """Seconds of one M-step's member fits and of the honest predictions of every row."""
    plan = plan_members(one_thread(make_learner(name, random_state=0)), honest=True,
                        n_rows=len(part.y), n_folds=2, member_rows="auto", seed=0)
    residue_of_row = part.residues(plan)
    pieces = training_pieces(plan, X=part.X, y=part.y, keys=part.keys,
                             residue_of_row=residue_of_row)
    with StolenCPU() as stolen:
        start = time.perf_counter()
        fitted = [member for residue, members in plan.chunks(1)
                  for member in fit_members(plan, members, pieces[residue])]
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        honest_predictions(plan, fitted, X=part.X, keys=part.keys, residue_of_row=residue_of_row)
        predict_seconds = time.perf_counter() - start
    return {"learner": name, "members": plan.n_members,
            "rows_per_member": len(part.y) / plan.stride, "honest_members_per_row": plan.n_honest,
            "fit_seconds": fit_seconds, "predict_seconds": predict_seconds,
            "predict_over_fit": predict_seconds / fit_seconds,
            "cost_ratio_floor": 1 + predict_seconds / fit_seconds,
            "cpu_stolen_share": stolen.share, "plan": plan, "fitted": fitted}


def leaf_order_effect(cost: dict, part: PartitionArrays) -> dict:
    """The default forest predicting every row: in the rows' own order and in leaf order."""
    forest = assemble_model(cost["plan"], cost["fitted"], part.X.shape[1]).set_params(n_jobs=1)
    with StolenCPU() as stolen:
        start = time.perf_counter()
        forest.predict(part.X)
        own_order = time.perf_counter() - start
        start = time.perf_counter()
        predict_fixed_effects(forest, part.X)
        leaf_order = time.perf_counter() - start
    row_trees = len(part.y) * len(forest.estimators_)
    return {"trees": len(forest.estimators_), "rows": len(part.y),
            "own_order_seconds": own_order, "leaf_order_seconds": leaf_order,
            "own_order_ns_per_row_tree": 1e9 * own_order / row_trees,
            "leaf_order_ns_per_row_tree": 1e9 * leaf_order / row_trees,
            "speed_up": own_order / leaf_order, "cpu_stolen_share": stolen.share}


def markdown(result: dict) -> str:
    lines = [f"One M-step's learner work at {result['rows']:,} rows (paper process, "
             f"{result['rows'] // 100:,} clusters), one thread, merf-dask's default plan. "
             "The honest prediction is work a plain fit never does: an EM iteration costs at "
             "least fit + predict, so its cost ratio (against the members' fit) is at least "
             "1 + predict / fit.", "",
             "| Learner | Members x rows each | Honest members per row | Fit (s) | Predict (s) "
             "| Predict / fit | Cost-ratio floor | CPU stolen (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["learners"]:
        lines.append(f"| {r['learner']} | {r['members']} x {r['rows_per_member']:,.0f} "
                     f"| {r['honest_members_per_row']} | {r['fit_seconds']:.1f} "
                     f"| {r['predict_seconds']:.1f} | {r['predict_over_fit']:.2f} "
                     f"| {r['cost_ratio_floor']:.2f} | {100 * r['cpu_stolen_share']:.0f} |")
    leaf = result["leaf_order"]
    lines += ["", f"The default forest ({leaf['trees']} trees) predicting all {leaf['rows']:,} "
              f"rows on one thread: {leaf['own_order_seconds']:.1f} s in the rows' own order "
              f"({leaf['own_order_ns_per_row_tree']:.0f} ns per row and tree), "
              f"{leaf['leaf_order_seconds']:.1f} s in the leaf order of its first tree "
              f"({leaf['leaf_order_ns_per_row_tree']:.0f} ns; {leaf['speed_up']:.1f} x faster; "
              f"CPU stolen {100 * leaf['cpu_stolen_share']:.0f} %)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    part = training_rows(args.rows)
    costs = []
    for name in HONEST_LEARNERS:
        costs.append(learner_cost(name, part))
        print(name, {k: v for k, v in costs[-1].items() if k not in ("plan", "fitted")},
              flush=True)
    leaf = leaf_order_effect(next(c for c in costs if c["learner"] == "random-forest"), part)
    result = {"rows": args.rows, "environment": {"cpu_count": os.cpu_count(),
                                                 "platform": platform.platform()},
              "learners": [{k: v for k, v in c.items() if k not in ("plan", "fitted")}
                           for c in costs],
              "leaf_order": leaf}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "predict_cost.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
