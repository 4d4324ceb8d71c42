"""The measured error of the iterative crossed solve against the dense one, at ML estimates.

Usage (from the repository root, on a snapshot of the committed code)::

    rm -rf /tmp/snap && mkdir /tmp/snap && git archive HEAD merf_dask | tar -x -C /tmp/snap \
        && git rev-parse --short HEAD > /tmp/snap/COMMIT
    PYTHONPATH=/tmp/snap .venv/bin/python bench/crossed_traces.py            # ~15 min here
    PYTHONPATH=/tmp/snap .venv/bin/python bench/crossed_traces.py --quick    # smoke run

Beyond :data:`merf_dask.core.crossed_solve.DENSE_CROSSED_UNKNOWNS` crossed unknowns the E-step
solves the crossed system by PCG and estimates the M-step's traces by Hutchinson probes and
log|S| by stochastic Lanczos quadrature (core/crossed_solve.py). Here a linear learner
(scikit-learn ``LinearRegression``, fitted in-sample, so EM reaches the ML estimates) fits
``y ~ x1 + x2 + x3 + (1 | user) + (1 | item)`` on :func:`merf_dask.simulate.simulate_crossed_frame`
designs small enough for the dense solve, to convergence (``tol=1e-10``), once densely
(``merf_dask.core.em.DENSE_CROSSED_UNKNOWNS`` patched high) and iteratively (patched to 0) with
8, 16 and 32 probes (``merf_dask.core.em.solve_iteratively`` wrapped to pass ``n_probes``: its
default is bound to ``TRACE_PROBES`` at import, so patching that constant would change nothing).
Compared with the dense fit: sigma2, Var(user), Var(item), the final log-likelihood, the random
effects and their reported per-level conditional variances (block-Jacobi on the iterative path).

Every fit runs in a fresh subprocess (``--one``) with single-threaded BLAS
(``run.CHILD_ENVIRONMENT``). Writes ``bench/results/crossed_traces.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from crossed import _existing_findings, _library_source
from run import CHILD_ENVIRONMENT
from run import _environment as run_environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FORMULA = "y ~ x1 + x2 + x3 + (1 | user) + (1 | item)"
SEED = 1
MAX_ITERATIONS = 300
TOL = 1e-10
PROBES = (8, 16, 32)
#: (rows, users, items asked for): Zipf items, so fewer are drawn (counted in the report)
DESIGNS = [(20_000, 2_000, 1_000), (60_000, 6_000, 3_100)]
QUICK_DESIGNS = [(5_000, 500, 300)]
PACKAGES = ("merf-dask", "scikit-learn", "numpy", "scipy", "pandas")


def fit_one(rows: int, users: int, items: int, mode: str, probes: int) -> dict:
    """One fit: ``mode`` "dense" or "iterative" (with ``probes`` Rademacher probes)."""
    from sklearn.linear_model import LinearRegression

    import merf_dask.core.em as em
    from merf_dask import MERF
    from merf_dask.simulate import simulate_crossed_frame

    frame = simulate_crossed_frame(n_rows=rows, n_users=users, n_items=items, seed=SEED)
    pcg = []
    if mode == "dense":
        em.DENSE_CROSSED_UNKNOWNS = 10**9
    else:
        em.DENSE_CROSSED_UNKNOWNS = 0
        original = em.solve_iteratively

        @functools.wraps(original)
        def counted(*args, **kwargs):
            solution = original(*args, **kwargs, n_probes=probes)
            pcg.append(solution.iterations)
            return solution
        em.solve_iteratively = counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        model = MERF(LinearRegression(), formula=FORMULA, max_iterations=MAX_ITERATIONS, tol=TOL,
                     random_state=0).fit(frame)
        seconds = time.perf_counter() - start
    components = model.variance_components_
    variances = components[components["var2"].isna()].set_index("grp")["vcov"]
    effects = {}
    for name in ("user", "item"):
        b = model.random_effects_[name]
        effects[name] = {"levels": [str(v) for v in b.index],
                         "b": b.iloc[:, 0].to_numpy().tolist(),
                         "cond_var": model.random_effects_cov_[name][:, 0, 0].tolist()}
    return {"rows": rows, "users": users, "items_asked": items,
            "distinct_users": int(frame["user"].nunique()),
            "distinct_items": int(frame["item"].nunique()), "mode": mode,
            "probes": probes if mode == "iterative" else None,
            "fit_seconds": seconds, "iterations": model.n_iter_,
            "converged": bool(model.converged_), "sigma2": float(model.sigma2_),
            "var_user": float(variances["user"]), "var_item": float(variances["item"]),
            "log_likelihood": float(model.history_[-1].log_likelihood),
            "e_step_seconds": float(sum(r.e_step_seconds for r in model.history_)),
            "m_step_seconds": float(sum(r.m_step_seconds for r in model.history_)),
            "pcg_solves": len(pcg), "pcg_iterations_mean": float(np.mean(pcg)) if pcg else None,
            "pcg_iterations_max": int(max(pcg)) if pcg else None,
            "warnings": sorted({f"{w.category.__name__}: {str(w.message)[:160]}"
                                for w in caught}),
            "effects": effects}


def _run_child(rows, users, items, mode, probes) -> dict:
    command = [sys.executable, __file__, "--one", mode, str(rows), str(users), str(items),
               str(probes)]
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, **CHILD_ENVIRONMENT})
    if done.returncode != 0:
        raise SystemExit(f"{command} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def compare(dense: dict, iterative: dict) -> dict:
    """The iterative fit's errors against the dense one."""
    out = {"probes": iterative["probes"],
           "sigma2_rel": _relative(iterative["sigma2"], dense["sigma2"]),
           "var_user_rel": _relative(iterative["var_user"], dense["var_user"]),
           "var_item_rel": _relative(iterative["var_item"], dense["var_item"]),
           "log_likelihood_rel": _relative(iterative["log_likelihood"],
                                           dense["log_likelihood"]),
           "log_likelihood_diff": iterative["log_likelihood"] - dense["log_likelihood"]}
    for name in ("user", "item"):
        d, i = dense["effects"][name], iterative["effects"][name]
        if d["levels"] != i["levels"]:
            raise AssertionError(f"{name}: the two fits list different levels")
        out[f"b_{name}_max_abs_diff"] = float(np.max(np.abs(np.subtract(i["b"], d["b"]))))
        out[f"b_{name}_sd"] = float(np.std(d["b"]))
        ratio = np.divide(i["cond_var"], d["cond_var"])
        out[f"cond_var_{name}_ratio"] = {"median": float(np.median(ratio)),
                                         "min": float(ratio.min()), "max": float(ratio.max())}
    return out


def _format_ratio(r: dict) -> str:
    return f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f})"


def markdown(result: dict, findings: str) -> str:
    source = result["merf_dask"]
    lines = ["# The iterative crossed solve against the dense one", "",
             "`bench/crossed_traces.py`: `merf_dask.simulate.simulate_crossed_frame` (users "
             "uniform, items Zipf, sigma_user2 = 1.0, sigma_item2 = 0.5, sigma_e2 = 1.0, m = 0.6, "
             f"seed {SEED}), `{FORMULA}` fitted in-process with scikit-learn `LinearRegression` "
             "(in-sample, so EM reaches the ML estimates), "
             f"`tol={TOL:g}`, `max_iterations={MAX_ITERATIONS}`, default `accelerate`, "
             "`random_state=0`: once with the dense crossed solve "
             "(`merf_dask.core.em.DENSE_CROSSED_UNKNOWNS` patched to 10^9) and with the "
             "iterative one (patched to 0: PCG, Hutchinson traces with a block-Jacobi control "
             "variate, log|S| by stochastic Lanczos quadrature) with 8, 16 (the default "
             "`TRACE_PROBES`) and 32 probes, passed by wrapping `merf_dask.core.em."
             "solve_iteratively` (its `n_probes` default is bound at import). Only `item` is "
             "crossed (the data are partitioned by user), so the crossed unknowns are the "
             "distinct items. Errors are relative to the dense fit's; b differences are the "
             "largest over the factor's levels (next to the dense b's standard deviation); the "
             "conditional variances are `random_effects_cov_` per level, iterative / dense "
             "(median, min-max over levels). Each fit ran in its own subprocess with "
             "single-threaded BLAS on a 2-vCPU shared VM (times noisy by 1.5-2 x); merf-dask "
             f"from a `git archive` snapshot at commit {source.get('commit', '?')[:7]}; run "
             f"finished {result['date']}, {result['wall_seconds'] / 60:.1f} min, load average "
             f"{result['load_average_start'][0]:.1f} at the start, "
             f"{result['load_average_end'][0]:.1f} at the end.", ""]
    lines += ["| Design | Solve | Probes | sigma2 | Var(user) | Var(item) | log-lik. "
              "| Iterations | Fit (s) | PCG it. per solve (mean / max) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for design in result["designs"]:
        label = (f"{design['train_rows']:,} rows, {design['distinct_users']:,} users x "
                 f"{design['distinct_items']:,} items")
        for fit in design["fits"]:
            pcg = (f"{fit['pcg_iterations_mean']:.1f} / {fit['pcg_iterations_max']}"
                   if fit["pcg_iterations_mean"] is not None else "–")
            lines.append(f"| {label} | {fit['mode']} | {fit['probes'] or '–'} | "
                         f"{fit['sigma2']:.6f} | {fit['var_user']:.6f} | {fit['var_item']:.6f} "
                         f"| {fit['log_likelihood']:.3f} | {fit['iterations']}"
                         f"{'' if fit['converged'] else ' (not converged)'} | "
                         f"{fit['fit_seconds']:.1f} | {pcg} |")
    lines += ["", "Errors of the iterative fit against the dense one:", "",
              "| Design | Probes | sigma2 rel. | Var(user) rel. | Var(item) rel. | log-lik. rel. "
              "(diff) | max \\|Δb\\| user (sd b) | max \\|Δb\\| item (sd b) "
              "| cond. var. ratio user | cond. var. ratio item |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for design in result["designs"]:
        label = f"{design['train_rows']:,} x {design['distinct_items']:,}"
        for c in design["comparisons"]:
            lines.append(
                f"| {label} | {c['probes']} | {c['sigma2_rel']:.1e} | {c['var_user_rel']:.1e} | "
                f"{c['var_item_rel']:.1e} | {c['log_likelihood_rel']:.1e} "
                f"({c['log_likelihood_diff']:+.3f}) | {c['b_user_max_abs_diff']:.1e} "
                f"({c['b_user_sd']:.2f}) | {c['b_item_max_abs_diff']:.1e} ({c['b_item_sd']:.2f}) "
                f"| {_format_ratio(c['cond_var_user_ratio'])} "
                f"| {_format_ratio(c['cond_var_item_ratio'])} |")
    text = "\n".join(lines) + "\n"
    return text + ("\n" + findings.strip() + "\n" if findings.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small design, 16 probes")
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        mode, rows, users, items, probes = args.one
        record = fit_one(int(rows), int(users), int(items), mode, int(probes))
        print(json.dumps(record))
        return
    designs, probes = (QUICK_DESIGNS, (16,)) if args.quick else (DESIGNS, PROBES)
    start, load_start = time.perf_counter(), os.getloadavg()
    result = {"designs": [], "date": None, "merf_dask": _library_source(),
              "environment": run_environment(PACKAGES), "formula": FORMULA, "tol": TOL,
              "max_iterations": MAX_ITERATIONS, "seed": SEED}
    for rows, users, items in designs:
        fits = []
        for mode, k in [("dense", 0), *[("iterative", k) for k in probes]]:
            fit = _run_child(rows, users, items, mode, k)
            print(f"[{rows:,} x {fit['distinct_items']:,} items] {mode} {k or ''}: "
                  f"{fit['iterations']} iterations, {fit['fit_seconds']:.1f} s, "
                  f"sigma2 {fit['sigma2']:.8f}, items {fit['var_item']:.8f}", file=sys.stderr,
                  flush=True)
            fits.append(fit)
        dense = fits[0]
        result["designs"].append({
            "train_rows": rows, "users_asked": users, "items_asked": items,
            "distinct_users": dense["distinct_users"], "distinct_items": dense["distinct_items"],
            "fits": [{k: v for k, v in fit.items() if k != "effects"} for fit in fits],
            "comparisons": [compare(dense, fit) for fit in fits[1:]]})
    result.update(date=time.strftime("%Y-%m-%d %H:%M"), load_average_start=load_start,
                  load_average_end=os.getloadavg(), wall_seconds=time.perf_counter() - start)
    stem = "crossed_traces_quick" if args.quick else "crossed_traces"
    json_path, md_path = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2))
    md_path.write_text(markdown(result, _existing_findings(md_path)))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
