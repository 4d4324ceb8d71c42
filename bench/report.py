"""Markdown tables and the comparison plot of the side-by-side benchmark.

results_markdown
    The main table (one row per model and row count, plus the oracle), the merf-dask
    per-iteration cost table and the list of what was not run.
write_plot
    ``comparison.png``: fit time, peak memory, MSE on known and on new clusters, per model.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)

_DASH = "–"


def _number(value, digits: int = 2) -> str:
    return _DASH if value is None else f"{value:,.{digits}f}"


def _notes(run: dict) -> str:
    notes = []
    if run.get("cluster_start_seconds") is not None:
        notes.append(f"cluster start {run['cluster_start_seconds']:.1f} s, not in fit time")
    if run.get("converged") is False:
        notes.append("stopped at max_iterations")
    notes += [f"warned {name}" for name in run.get("warnings", [])]
    if run["status"] != "ok":
        notes.append(run["note"])
    return "; ".join(notes)


def _model_row(run: dict) -> str:
    fit_time = {"ok": _number(run.get("fit_seconds"), 1),
                "not finished": f"> {run.get('time_limit_s')}",
                }.get(run["status"], _DASH)
    cells = [run["label"], f"{run['rows']:,}", fit_time,
             _number(run.get("peak_rss_mb"), 0), _number(run.get("fit_rss_increase_mb"), 0),
             _number(run.get("mse_known")), _number(run.get("mse_new")),
             _number(run.get("sigma2")), _number(run.get("var_b")),
             _DASH if run.get("iterations") is None else str(run["iterations"]), _notes(run)]
    return "| " + " | ".join(cells) + " |"


def _oracle_row(oracle: dict) -> str:
    cells = ["Oracle: true f(x) and b_i (floor)", f"{oracle['rows']:,}", _DASH, _DASH, _DASH,
             _number(oracle["mse_known"]), _number(oracle["mse_new"]), "1 (true)",
             f"{oracle['var_b_true']:.2f} (true); realised {oracle['var_b_realised']:.2f}",
             _DASH, "what no model can beat"]
    return "| " + " | ".join(cells) + " |"


def _main_table(results: dict) -> list[str]:
    lines = ["| Model | Train rows | Fit time (s) | Peak RSS (MB) | RSS increase in fit (MB) "
             "| MSE known clusters | MSE new clusters | sigma2 est. | Var(b) est. | Iterations "
             "| Notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rows in results["settings"]["rows"]:
        lines += [_model_row(run) for run in results["runs"] if run["rows"] == rows]
        lines += [_oracle_row(o) for o in results["oracle"] if o["rows"] == rows]
    return lines


def _cost_table(results: dict) -> list[str]:
    lines = ["| merf-dask run | Train rows | Iterations | Fit (s) "
             "| Members x rows each | Equivalent plain fit (s) "
             "| Cost ratio fit / (iterations x plain fit) "
             "| M-step total (s) | E-step total (s) | Other (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        if run.get("per_iteration_cost_ratio") is None:
            continue
        lines.append("| " + " | ".join([
            run["label"], f"{run['rows']:,}", str(run["iterations"]),
            _number(run["fit_seconds"], 1), f"{run['n_members']} x {run['rows_per_member']:,.0f}",
            _number(run["plain_fit_seconds"], 1),
            _number(run["per_iteration_cost_ratio"]), _number(run["m_step_seconds"], 1),
            _number(run["e_step_seconds"], 3), _number(run["other_seconds"], 1)]) + " |")
    return lines


def results_markdown(results: dict) -> str:
    """The Markdown report of a side-by-side run."""
    settings = results["settings"]
    lines = [f"Paper process, m = {settings['m']}, Var(b) = {settings['sigma_b2']} "
             f"(sigma_b = {settings['sigma_b2'] ** 0.5:g} as a standard deviation), "
             f"sigma_e2 = {settings['sigma_e2']}, seed {settings['seed']}; MSE on "
             "10 held-out rows of every training cluster and on 100 new clusters of 50 rows. "
             f"Machine: {results['environment']['cpu_count']} shared cores, load average "
             f"{results['environment']['load_average_start'][0]:.1f} at the start and "
             f"{results['environment']['load_average_end'][0]:.1f} at the end; "
             f"run took {results['wall_seconds'] / 60:.1f} min.", "",
             *_main_table(results), "",
             "Per-iteration cost of merf-dask (target <= 1.3). The plain fit is what one "
             "M-step stands for (`bench/equivalent.py`), timed in the same process right after "
             "the MERF fit: a forest with as many trees as the M-step grows, each on a bootstrap "
             "of rows / stride rows (the M-step's members each fit the clusters of one residue "
             "class modulo the stride, the power of two >= rows / member_rows), or one fit of "
             "any other learner on all rows (it is cross-fitted on disjoint folds). The M-step "
             "column is the learner's fit (on a Dask client, until every member is fitted); the "
             "E-step column includes the honest predictions.", "",
             *_cost_table(results), "", "Not run:", ""]
    lines += [f"* {item['what']}: {item['reason']}" for item in results["not_run"]]
    return "\n".join(lines) + "\n"


def write_plot(results: dict, path) -> None:
    """Bar charts of fit time, peak RSS and the two MSEs for every model and row count."""
    panels = [("fit_seconds", "Fit time (s, log scale)"), ("peak_rss_mb", "Peak RSS (MB)"),
              ("mse_known", "MSE, known clusters"), ("mse_new", "MSE, new clusters")]
    runs = results["runs"]
    labels = [f"{run['key']}\n{run['rows'] // 1000}k" for run in runs]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for ax, (field, title) in zip(axes.flat, panels):
        heights, hatches = [], []
        for run in runs:
            unfinished = field == "fit_seconds" and run["status"] == "not finished"
            heights.append(run["time_limit_s"] if unfinished else (run.get(field) or 0.0))
            hatches.append("//" if unfinished else "")
        bars = ax.bar(range(len(runs)), heights, color="tab:blue")
        for bar, hatch in zip(bars, hatches):
            if hatch:
                bar.set_hatch(hatch)
                bar.set_facecolor("lightgrey")
        if field.startswith("mse"):
            for oracle in results["oracle"]:
                ax.axhline(oracle[field], color="tab:red", linestyle="--", linewidth=1,
                           label=f"oracle, {oracle['rows'] // 1000}k rows")
            ax.legend(fontsize=8)
        if field == "fit_seconds":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks(range(len(runs)), labels, rotation=45, ha="right", fontsize=8)
    fig.suptitle("merf-dask vs merf 1.0, GPBoost, MixedLM, random forest "
                 "(hatched: not finished within its time limit)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
