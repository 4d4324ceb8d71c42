"""Out-of-core scaling of merf-dask: fit time, memory and overhead from 1M to 20M rows.

For each size: simulate a lake (rows / 100 clusters) with ``merf-dask simulate``, fit
``y ~ x1 + x2 + x3 + (1 | cluster)`` through the CLI on an embedded LocalCluster of 2 workers with
a 1 GiB memory limit each (``--n-workers 2 --memory-limit 1GiB``), and record

* the fit's wall time (the CLI process: cluster start, lake read, EM, save), its iterations and
  seconds per EM iteration (``m_step_seconds + e_step_seconds`` of the model's history: on a
  Dask client the M-step only submits tasks, so the learner's fit is waited for inside the
  E-step's figure);
* the peak RSS of every worker process (:mod:`cli_meter` samples the CLI's child processes);
  more worker pids than workers means a worker was restarted (killed for memory);
* the model size (``model_size_bytes`` of the model directory's manifest);
* one *equivalent plain fit* of the same learner (:mod:`equivalent`): for a forest, as many
  trees as the M-step grows, each on a bootstrap of ``n_rows / stride`` rows (``max_samples``);
  for a cross-fitted learner, one fit on all rows. Cost ratio = seconds per iteration / plain
  fit; the whole fit's cost ratio = the CLI's wall time (cluster start, reads and save
  included) / (iterations x plain fit), the target's literal reading. ``--learners`` fits every
  named learner on every size's lake;
* the share of the machine's CPU stolen by the hypervisor during the fit and during the plain
  fit (:class:`measure.StolenCPU`): on a shared VM, a ratio measured under unequal steal is noise.

Optionally (``--profile-rows``) one in-process fit of 2 iterations on the same kind of cluster
with ``distributed``'s task stream, to split the worker time of the second (steady-state)
iteration by task prefix: ``fit_members`` (the learner's fit), ``e_step`` (the learner's
prediction and the E-step), ``m_step_pieces``, ``partition_arrays`` and the Parquet read (I/O and
data preparation) and the rest (scheduling, reductions). And the per-iteration
round-trip overhead: seconds per EM iteration on a tiny lake with a linear learner, where the
work itself is negligible.

Usage::

    .venv/bin/python bench/scaling.py [--rows 1000000 2000000 5000000 10000000 20000000]
        [--iterations 3] [--learners random-forest gradient-boosting ...] [--lake-dir /tmp]
        [--profile-rows 1000000] [--keep-lakes]

Each size's record is also written to ``bench/results/scaling_runs/<rows>.json`` and reused by
later runs with ``--reuse`` (so sizes can be run one at a time); ``--report-only`` rebuilds
``scaling.json``, ``scaling.md`` and ``scaling.png`` from those records.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_meter import run_metered  # noqa: E402
from equivalent import equivalent_plain_learner  # noqa: E402
from measure import StolenCPU  # noqa: E402

ROOT = HERE.parent
CLI = str(ROOT / ".venv" / "bin" / "merf-dask")
RESULTS = HERE / "results"
RUNS = RESULTS / "scaling_runs"
FORMULA = "y ~ x1 + x2 + x3 + (1 | cluster)"
N_WORKERS = 2
MEMORY_LIMIT = "1GiB"
DEFAULT_LEARNER = "random-forest"


def simulate(rows: int, lake: Path) -> float:
    if lake.exists():
        shutil.rmtree(lake)
    start = time.perf_counter()
    subprocess.run([CLI, "simulate", "--rows", str(rows), "--clusters", str(rows // 100),
                    "--output", str(lake)], check=True, capture_output=True)
    return time.perf_counter() - start


def cli_fit(lake: Path, model: Path, iterations: int, timeout: float | None,
            learner: str = DEFAULT_LEARNER) -> dict:
    for path in (model, Path(f"{model}.checkpoint.parquet")):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return run_metered([CLI, "fit", str(lake), "--formula", FORMULA, "--output", str(model),
                        "--n-workers", str(N_WORKERS), "--memory-limit", MEMORY_LIMIT,
                        "--max-iterations", str(iterations), "--learner", learner, "--quiet"],
                       interval=0.2, timeout=timeout)


def fit_record(rows: int, metered: dict, model: Path, learner: str = DEFAULT_LEARNER) -> dict:
    """One size's record from a metered CLI run and its model directory."""
    record = {"rows": rows, "clusters": rows // 100, "learner": learner,
              "returncode": metered["returncode"],
              "fit_wall_seconds": metered["wall_seconds"],
              "worker_peak_rss_mb": metered["worker_peak_rss_mb"],
              "n_worker_pids": metered["n_worker_pids"],
              "cli_peak_rss_mb": max((p["peak_rss_mb"] for p in metered["processes"]
                                      if p["kind"] == "cli"), default=None),
              "tree_peak_rss_mb": metered["tree_peak_rss_mb"],
              "workers_restarted": metered["n_worker_pids"] > N_WORKERS,
              "stderr_tail": [entry["line"] for entry in metered["stderr"][-20:]],
              **plain_learner(learner, rows)[1]}
    manifest_path = model / "manifest.json"
    if metered["returncode"] == 0 and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        history = manifest["history"]
        per_iteration = [h["m_step_seconds"] + h["e_step_seconds"] for h in history]
        record.update(iterations=manifest["n_iter"], converged=manifest["converged"],
                      seconds_per_iteration=per_iteration,
                      mean_seconds_per_iteration=float(np.mean(per_iteration)),
                      em_seconds=float(np.sum(per_iteration)),
                      outside_em_seconds=metered["wall_seconds"] - float(np.sum(per_iteration)),
                      model_size_bytes=manifest["model_size_bytes"],
                      sigma2=history[-1]["sigma2"], var_b=history[-1]["D"][0][0][0])
    return record


def plain_learner(learner: str, rows: int):
    """The equivalent plain fit of the learner called ``learner`` on ``rows`` rows, on this
    machine's 2 cores, and the plan's shape (:func:`equivalent.equivalent_plain_learner`)."""
    from merf_dask.learners import make_learner

    estimator, shape = equivalent_plain_learner(make_learner(learner, random_state=0), rows)
    if "n_jobs" in estimator.get_params():
        estimator.set_params(n_jobs=N_WORKERS)
    return estimator, shape


def plain_fit_seconds(lake: Path, rows: int, learner: str = DEFAULT_LEARNER) -> float:
    """Seconds of one fit of :func:`plain_learner` on the lake's rows."""
    import pandas as pd

    frame = pd.read_parquet(lake, columns=["x1", "x2", "x3", "y"])
    X, y = frame[["x1", "x2", "x3"]].to_numpy(), frame["y"].to_numpy()
    del frame
    estimator, _ = plain_learner(learner, rows)
    start = time.perf_counter()
    estimator.fit(X, y)
    return time.perf_counter() - start


def _prefix(key) -> str:
    from dask.utils import key_split
    return key_split(key)


class _IterationEnds(logging.Handler):
    """Records when the EM loop logs each finished iteration (``time.time()``, the clock of the
    task stream's start and stop times)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        from merf_dask.core.em import IterationRecord
        if record.args and isinstance(record.args[0], IterationRecord):
            self.times.append(time.time())


def profile(lake: Path) -> dict:
    """Worker time by task prefix in the second EM iteration of an in-process fit (task stream).

    The first iteration also holds the fit's start (the layout pass that finds every
    partition's clusters), so the second is the one every later iteration repeats.
    """
    from distributed import Client, LocalCluster, get_task_stream

    from merf_dask import MERF
    from merf_dask.io.lake import read_lake
    from merf_dask.learners import make_learner

    iteration_ends = _IterationEnds()
    em_logger = logging.getLogger("merf_dask")
    em_logger.addHandler(iteration_ends)
    level = em_logger.level
    em_logger.setLevel(logging.INFO)
    try:
        with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, memory_limit=MEMORY_LIMIT,
                          dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
                Client(cluster) as client:
            frame = read_lake(str(lake), columns=["x1", "x2", "x3", "y", "cluster"],
                              cluster_column="cluster")
            model = MERF(make_learner("random-forest", random_state=0), formula=FORMULA,
                         max_iterations=2, tol=0, random_state=0, client=client)
            with get_task_stream(client) as stream:
                model.fit(frame)
            tasks = stream.data
    finally:
        em_logger.removeHandler(iteration_ends)
        em_logger.setLevel(level)
    first_end, second_end = iteration_ends.times[:2]
    by_prefix: dict[str, float] = {}
    for task in tasks:
        seconds = sum(s["stop"] - s["start"] for s in task["startstops"]
                      if s["action"] == "compute" and first_end <= s["start"] <= second_end)
        if seconds:
            by_prefix[_prefix(task["key"])] = by_prefix.get(_prefix(task["key"]), 0.0) + seconds
    busy = sum(by_prefix.values())
    wall = second_end - first_end
    second = model.history_[1]
    return {"iteration": 2, "iteration_wall_seconds": wall, "worker_seconds_by_prefix": by_prefix,
            "worker_busy_seconds": busy,
            "worker_idle_seconds": N_WORKERS * wall - busy,
            "learner_fit_share_of_busy": by_prefix.get("fit_members", 0.0) / busy if busy else None,
            "history": [{"m_step_seconds": second.m_step_seconds,
                         "e_step_seconds": second.e_step_seconds}]}


def round_trip_overhead(lake_dir: Path) -> dict:
    """Seconds per EM iteration on a tiny lake (2,000 rows) with a linear learner."""
    from distributed import Client, LocalCluster

    from merf_dask import MERF
    from merf_dask.io.lake import read_lake
    from merf_dask.learners import make_learner

    lake = lake_dir / "scaling_tiny_lake"
    simulate(2_000, lake)
    with LocalCluster(n_workers=N_WORKERS, threads_per_worker=1, memory_limit=MEMORY_LIMIT,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        frame = read_lake(str(lake), columns=["x1", "x2", "x3", "y", "cluster"],
                          cluster_column="cluster")
        model = MERF(make_learner("linear"), formula=FORMULA, max_iterations=5, tol=0.0,
                     random_state=0, client=client)
        start = time.perf_counter()
        model.fit(frame)
        wall = time.perf_counter() - start
    shutil.rmtree(lake)
    per_iteration = [r.m_step_seconds + r.e_step_seconds for r in model.history_]
    return {"rows": 2_000, "n_partitions": frame.npartitions, "iterations": model.n_iter_,
            "fit_wall_seconds": wall, "seconds_per_iteration": per_iteration,
            "median_seconds_per_iteration": float(np.median(per_iteration))}


# ------------------------------------------------------------------------------ report

def _fmt(value, digits=1):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def whole_fit_ratio(record: dict) -> float | None:
    """The CLI's whole wall time over iterations x one equivalent plain fit."""
    if not (record.get("iterations") and record.get("plain_fit_seconds")):
        return None
    return record["fit_wall_seconds"] / (record["iterations"] * record["plain_fit_seconds"])


def _cost_ratio_check(ratios: dict) -> dict:
    """The cost-ratio target over the sizes that have a ratio."""
    values = {rows: ratio for rows, ratio in ratios.items() if ratio}
    return {"values": values, "target": "<= 1.3 at >= 1M rows",
            "holds": all(v <= 1.3 for v in values.values()) if values else None}


def checks(records: list[dict]) -> dict:
    done = {r["rows"]: r for r in records if r.get("mean_seconds_per_iteration")}
    out = {}
    if 1_000_000 in done:
        base = done[1_000_000]["mean_seconds_per_iteration"]
        largest = max(done)
        out["linear_growth"] = {
            "largest_rows": largest,
            "per_iteration_ratio_to_1m": done[largest]["mean_seconds_per_iteration"] / base,
            "allowed": largest / 1_000_000 * 1.25 if largest != 20_000_000 else 25.0,
            "target": "20M rows cost at most 25 x 1M rows (seconds per EM iteration)"}
        out["linear_growth"]["holds"] = (out["linear_growth"]["per_iteration_ratio_to_1m"]
                                         <= out["linear_growth"]["allowed"])
    out["cost_ratio"] = _cost_ratio_check(
        {rows: r.get("cost_ratio") for rows, r in done.items()})
    out["whole_fit_cost_ratio"] = _cost_ratio_check(
        {rows: whole_fit_ratio(r) for rows, r in done.items()})
    out["no_worker_restarts"] = all(not r["workers_restarted"] for r in records)
    out["all_completed"] = all(r["returncode"] == 0 for r in records)
    return out


def _stolen(record: dict) -> str:
    """CPU stolen by the hypervisor during the fit and the plain fit, in percent ('–' for
    records from before it was measured)."""
    stolen = record.get("cpu_stolen_share")
    if not stolen:
        return "–"
    return f"{100 * stolen['fit']:.0f} / {100 * stolen['plain_fit']:.0f}"


def _learner_table(records: list[dict]) -> list[str]:
    """Cost ratio of every learner, one row per (rows, learner)."""
    lines = ["| Rows | Learner | Iterations | s / iteration | Plain fit, equivalent (s) "
             "| Cost ratio | Cost ratio, whole fit | CPU stolen, fit / plain (%) "
             "| Peak RSS worker 1 / 2 (MB) | sigma2 | D |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["rows"], r.get("learner", DEFAULT_LEARNER))):
        peaks = " / ".join(_fmt(v, 0) for v in r["worker_peak_rss_mb"][:2])
        lines.append("| " + " | ".join([
            f"{r['rows']:,}", r.get("learner", DEFAULT_LEARNER), str(r.get("iterations", "–")),
            _fmt(r.get("mean_seconds_per_iteration")), _fmt(r.get("plain_fit_seconds")),
            _fmt(r.get("cost_ratio"), 2), _fmt(whole_fit_ratio(r), 2), _stolen(r), peaks,
            _fmt(r.get("sigma2"), 2),
            _fmt(r.get("var_b"), 2)]) + " |")
    return lines


def write_report(records: list[dict], extra: dict) -> None:
    by_learner = records
    records = sorted((r for r in records if r.get("learner", DEFAULT_LEARNER) == DEFAULT_LEARNER),
                     key=lambda r: r["rows"])
    result = {"records": records, "learner_records": by_learner, **extra,
              "checks": checks(records)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    lines = ["| Rows | Clusters | Trees x rows each | Iterations | Fit wall (s) | s / iteration "
             "| Outside EM (s) | Plain fit, equivalent (s) | Cost ratio | Cost ratio, whole fit "
             "| CPU stolen, fit / plain (%) | Peak RSS worker 1 / 2 (MB) | Worker restarts "
             "| Model (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        peaks = " / ".join(_fmt(v, 0) for v in r["worker_peak_rss_mb"][:2])
        lines.append("| " + " | ".join([
            f"{r['rows']:,}", f"{r['clusters']:,}",
            f"{r['n_members']} x {r['rows_per_member']:,.0f}",
            str(r.get("iterations", "–")),
            _fmt(r["fit_wall_seconds"]), _fmt(r.get("mean_seconds_per_iteration")),
            _fmt(r.get("outside_em_seconds")), _fmt(r.get("plain_fit_seconds")),
            _fmt(r.get("cost_ratio"), 2), _fmt(whole_fit_ratio(r), 2), _stolen(r), peaks,
            "yes" if r["workers_restarted"] else "none",
            _fmt(r.get("model_size_bytes", float("nan")) / 1e6)]) + " |")
    md = ["Scaling of `merf-dask fit` (CLI, embedded LocalCluster, 2 workers x 1 thread, "
          f"memory limit {MEMORY_LIMIT} each), paper process, rows/100 clusters, "
          "default random forest (100 trees, min_samples_leaf 5).", "", *lines, ""]
    c = result["checks"]
    if "linear_growth" in c:
        g = c["linear_growth"]
        md.append(f"* Linear growth: s/iteration at {g['largest_rows']:,} rows = "
                  f"{g['per_iteration_ratio_to_1m']:.1f} x 1M (allowed {g['allowed']:.1f}): "
                  f"{'holds' if g['holds'] else 'does NOT hold'}.")
    for name, label in (("cost_ratio", "Cost ratio"),
                        ("whole_fit_cost_ratio", "Whole fit's cost ratio")):
        values = ", ".join(f"{k:,}: {v:.2f}" for k, v in c[name]["values"].items())
        md.append(f"* {label} <= 1.3: {c[name]['holds']} ({values}).")
    md.append(f"* No worker restarted: {c['no_worker_restarts']}; all fits completed: "
              f"{c['all_completed']}.")
    if len({r.get("learner", DEFAULT_LEARNER) for r in by_learner}) > 1:
        md += ["", "Every learner (`--learner`), same CLI fit and machine; the equivalent plain "
               "fit is the forest of the M-step's trees for bagged forests (`max_samples` = "
               "rows / stride) and one fit on all rows for cross-fitted learners:", "",
               *_learner_table(by_learner)]
    for p in [extra[k] for k in ("profile", "profile_1m") if extra.get(k)]:
        md += ["", f"Worker time by task prefix, the second EM iteration at {p['rows']:,} rows "
               f"(in-process fit, task stream; wall {p['iteration_wall_seconds']:.1f} s, "
               f"{N_WORKERS} workers, idle {p['worker_idle_seconds']:.1f} worker-s):", "",
               "| Task prefix | Worker seconds | Share of busy |", "|---|---|---|"]
        rest = 0.0
        for name, seconds in sorted(p["worker_seconds_by_prefix"].items(),
                                    key=lambda kv: -kv[1]):
            if seconds < 0.05:
                rest += seconds
                continue
            share = 100 * seconds / p["worker_busy_seconds"]
            md.append(f"| {name} | {seconds:.1f} | {share:.0f} % |")
        md.append(f"| all others (getitem, itemgetter, add_sums, ...) | {rest:.2f} | 0 % |")
    if extra.get("round_trip"):
        t = extra["round_trip"]
        md += ["", f"Per-iteration round trip (tiny lake, {t['rows']:,} rows in "
               f"{t['n_partitions']} partitions, linear learner): median "
               f"{t['median_seconds_per_iteration']:.2f} s per EM iteration."]
    (RESULTS / "scaling.md").write_text("\n".join(md) + "\n")
    _plot(records)


def _plot(records: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.get("mean_seconds_per_iteration")]
    if not done:
        return
    rows = np.array([r["rows"] for r in done], dtype=float)
    per_it = np.array([r["mean_seconds_per_iteration"] for r in done])
    wall = np.array([r["fit_wall_seconds"] / r["iterations"] for r in done])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.loglog(rows, per_it, "o-", label="seconds per EM iteration")
    ax.loglog(rows, wall, "s--", label="CLI fit wall time / iterations")
    reference = np.array([rows.min(), 2e7])
    ax.loglog(reference, per_it[0] * reference / rows[0], ":", color="grey",
              label="linear reference (from the smallest size)")
    plain = [(r["rows"], r["plain_fit_seconds"]) for r in done if r.get("plain_fit_seconds")]
    if plain:
        ax.loglog(*zip(*plain), "^-",
                  label="equivalent plain fit of the same trees (timed after each fit)")
    ax.set_xlabel("training rows")
    ax.set_ylabel("seconds")
    ax.set_title("merf-dask fit, 2 workers x 1 GiB, default forest (2-core VM)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "scaling.png", dpi=120)


# ------------------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+",
                        default=[1_000_000, 2_000_000, 5_000_000, 10_000_000, 20_000_000])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--learners", nargs="+", default=[DEFAULT_LEARNER],
                        help="merf_dask.learners names; each is fitted on every size's lake")
    parser.add_argument("--lake-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--profile-rows", type=int, default=None,
                        help="also profile the second EM iteration at this size (task stream; "
                             "kept as 'profile_1m' at 1M rows, 'profile' otherwise)")
    parser.add_argument("--round-trip", action="store_true",
                        help="also time EM iterations on a tiny lake (round-trip overhead)")
    parser.add_argument("--reuse", action="store_true", help="reuse scaling_runs/<rows>.json")
    parser.add_argument("--keep-lakes", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=None, help="per fit, seconds")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    extra_path = RUNS / "extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    if not args.report_only:
        extra["environment"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "load_average_start": os.getloadavg()}
        for rows in args.rows:
            lake = args.lake_dir / f"scaling_lake_{rows}"
            model = args.lake_dir / f"scaling_model_{rows}"
            pending = [learner for learner in args.learners
                       if not (args.reuse and _record_path(rows, learner).exists())]
            profiling = args.profile_rows == rows
            if not (pending or profiling):
                continue
            print(f"{rows:,} rows: simulating", flush=True)
            simulate_seconds = simulate(rows, lake)
            for learner in pending:
                path = _record_path(rows, learner)
                print(f"{rows:,} rows: fitting with {learner}", flush=True)
                with StolenCPU() as fit_steal:
                    metered = cli_fit(lake, model, args.iterations, args.timeout, learner)
                record = fit_record(rows, metered, model, learner)
                record["simulate_seconds"] = simulate_seconds
                record["load_average_after_fit"] = os.getloadavg()
                with StolenCPU() as plain_steal:
                    record["plain_fit_seconds"] = plain_fit_seconds(lake, rows, learner)
                record["cpu_stolen_share"] = {"fit": fit_steal.share,
                                              "plain_fit": plain_steal.share}
                if record.get("mean_seconds_per_iteration"):
                    record["cost_ratio"] = (record["mean_seconds_per_iteration"]
                                            / record["plain_fit_seconds"])
                path.write_text(json.dumps(record, indent=1, default=float) + "\n")
                print(json.dumps({k: v for k, v in record.items() if k != "stderr_tail"},
                                 default=float), flush=True)
                shutil.rmtree(model, ignore_errors=True)
            if profiling:
                print(f"{rows:,} rows: profiling", flush=True)
                extra["profile" if rows != 1_000_000 else "profile_1m"] = {
                    "rows": rows, **profile(lake)}
                extra_path.write_text(json.dumps(extra, indent=1, default=float) + "\n")
            if not args.keep_lakes:
                shutil.rmtree(lake, ignore_errors=True)
        if args.round_trip:
            extra["round_trip"] = round_trip_overhead(args.lake_dir)
        extra["environment"]["load_average_end"] = os.getloadavg()
        extra_path.write_text(json.dumps(extra, indent=1, default=float) + "\n")
    records = [json.loads(p.read_text()) for p in RUNS.glob("[0-9]*.json")]
    write_report(records, extra)


def _record_path(rows: int, learner: str) -> Path:
    return RUNS / (f"{rows}.json" if learner == DEFAULT_LEARNER else f"{rows}-{learner}.json")


if __name__ == "__main__":
    main()
