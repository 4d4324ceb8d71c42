"""Crossed random effects side by side: users x items, merf-dask next to GPBoost and MixedLM.

Usage (from the repository root)::

    .venv/bin/python bench/crossed.py --quick          # 20,000 rows, 180 s limits (a few minutes)
    .venv/bin/python bench/crossed.py --rows 200000    # 20,000 users x 1,000 items
    .venv/bin/python bench/crossed.py --rows 1000000 --models merf_crossed merf_crossed_cluster \
        merf_users merf_users_cluster gpboost         # 100,000 users x 50,000 items (iterative)
    .venv/bin/python bench/crossed.py --rows 2000000   # 100,000 users x 2,000 items (~40 min)
    .venv/bin/python bench/crossed.py --rows 200000 --models merf_crossed gpboost
    .venv/bin/python bench/crossed.py --rows 2000000 --timing-repeat --models merf_crossed \
        merf_crossed_cluster merf_users merf_users_cluster     # the per-iteration ratio again

To measure committed code while the working tree changes, run it on a snapshot::

    git archive HEAD merf_dask | tar -x -C /tmp/snap && git rev-parse HEAD > /tmp/snap/COMMIT
    PYTHONPATH=/tmp/snap .venv/bin/python bench/crossed.py --rows 200000

The data are :func:`merf_dask.simulate.simulate_crossed_frame`: users drawn uniformly, items from
a Zipf law, crossed random intercepts with sigma_user2 = 1, sigma_item2 = 0.5, sigma_e2 = 1 and
the paper's f (m = 0.6). One frame of ``users + new_users`` users is simulated (so the items'
effects are shared); all rows of the last ``new_users`` users are the *new-user* test set and 10 %
of the other rows, drawn at random, the *known-cell* test set (a row is kept there only when its
user and its item are both in training). ``--rows`` is the expected number of training rows.

Every model is fitted in a fresh subprocess (``crossed.py --one KEY ...`` prints one JSON record)
with single-threaded BLAS/OpenMP (``run.CHILD_ENVIRONMENT``) and killed at its time limit, as in
``run.py``. Results of every size run so far are kept in ``bench/results/crossed.json`` and
``crossed.md`` (a run replaces the sizes it ran, or with ``--models`` those models' records;
``--timing-repeat`` adds the merf-dask fits' timings as a repeat); ``--quick`` writes ``crossed_quick.json`` and
``crossed_quick.md`` instead (not committed). Every record carries SHA-256 digests of its
predictions (a merf-dask forest predicts on one thread for them: scikit-learn's threaded predict
adds the trees in the order its threads finish), so that the report can say whether the
in-process and LocalCluster fits agree bit for bit; ``--save-predictions DIR`` also compares
their predictions and random effects element by element.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from measure import FitMeter
from models import GPBOOST_PARAMS, GPBOOST_ROUNDS, GPBOOST_THREADS, SEED, _warning_names
from report import _DASH, _number
from run import CHILD_ENVIRONMENT
from run import _environment as run_environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATA_SEED = 1
FEATURES = ["x1", "x2", "x3"]
M, SIGMA_USER2, SIGMA_ITEM2, SIGMA_E2 = 0.6, 1.0, 0.5, 1.0
KNOWN_TEST_SHARE = 0.10
WORKERS = 2
#: statsmodels builds the dense rows x levels design of C(user) (also with use_sparse=True, which
#: converts it afterwards); the address space of its subprocess is capped so that a design too big
#: for this shared machine fails with a MemoryError instead of taking its memory
MIXEDLM_ADDRESS_SPACE_GIB = 8
CROSSED = "y ~ x1 + x2 + x3 + (1 | user) + (1 | item)"
USERS_ONLY = "y ~ x1 + x2 + x3 + (1 | user)"
PACKAGES = ("merf-dask", "gpboost", "statsmodels", "scikit-learn", "numpy", "pandas", "dask",
            "distributed")


# -------------------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class Size:
    """One design: expected training rows, training users, items, new users; the time limit."""

    rows: int
    users: int
    items: int
    new_users: int
    time_limit_s: int


SIZES = {200_000: Size(200_000, 20_000, 1_000, 1_000, 600),
         # 50,000 Zipf items: many more distinct items in training than DENSE_CROSSED_UNKNOWNS
         # (3,000), so the crossed E-step is the iterative one (PCG, stochastic traces)
         1_000_000: Size(1_000_000, 100_000, 50_000, 1_000, 1500),
         2_000_000: Size(2_000_000, 100_000, 2_000, 1_000, 900)}
QUICK = Size(20_000, 2_000, 200, 200, 180)


def size_for(rows: int) -> Size:
    """The table's design for ``rows``, else 10 rows per user and 200 per item (<= 2,000)."""
    if rows in SIZES:
        return SIZES[rows]
    if rows == QUICK.rows:
        return QUICK
    return Size(rows, rows // 10, min(2_000, max(20, rows // 200)), min(1_000, rows // 100), 900)


# --------------------------------------------------------------------------------------- data

@dataclass
class CrossedDesign:
    """Training rows, held-out known cells, rows of new users; frames carry the truth
    (``f_true``, ``b_user_true``, ``b_item_true``), models see only the simulated columns."""

    train: pd.DataFrame
    test_known: pd.DataFrame
    test_new: pd.DataFrame
    b_user: np.ndarray
    b_item: np.ndarray
    dropped_known: int


def _simulated_rows(size: Size) -> int:
    """Rows to simulate so that ``size.rows`` are expected in training."""
    total_users = size.users + size.new_users
    return round(size.rows / (1 - KNOWN_TEST_SHARE) * total_users / size.users)


def _truth(n_rows: int, n_users: int, n_items: int, seed: int):
    """simulate_crossed_frame's draws, replayed in its order (it returns only y)."""
    from merf_dask.simulate import fixed_effect_function
    rng = np.random.default_rng(seed)
    user = rng.integers(0, n_users, n_rows)
    weights = (np.arange(n_items) + 1.0) ** -1.0
    item = rng.choice(n_items, size=n_rows, p=weights / weights.sum())
    x = rng.standard_normal((n_rows, 3))
    b_user = rng.normal(0, np.sqrt(SIGMA_USER2), n_users)
    b_item = rng.normal(0, np.sqrt(SIGMA_ITEM2), n_items)
    noise = rng.normal(0, np.sqrt(SIGMA_E2), n_rows)
    return user, item, M * fixed_effect_function(x), b_user, b_item, noise


def crossed_design(size: Size, seed: int = DATA_SEED) -> CrossedDesign:
    """Simulate one frame of ``users + new_users`` users and split it (see the module doc)."""
    from merf_dask.simulate import simulate_crossed_frame
    n_rows, total_users = _simulated_rows(size), size.users + size.new_users
    frame = simulate_crossed_frame(n_rows=n_rows, n_users=total_users, n_items=size.items, m=M,
                                   sigma_user2=SIGMA_USER2, sigma_item2=SIGMA_ITEM2,
                                   sigma_e2=SIGMA_E2, seed=seed)
    user, item, f_true, b_user, b_item, noise = _truth(n_rows, total_users, size.items, seed)
    if not np.allclose(frame["y"].to_numpy(), f_true + b_user[user] + b_item[item] + noise,
                       rtol=0, atol=1e-9):
        raise AssertionError("the replayed draws do not give simulate_crossed_frame's y")
    frame = frame.assign(f_true=f_true, b_user_true=b_user[user], b_item_true=b_item[item])
    is_new = user >= size.users
    known = frame[~is_new]
    test_rows = np.random.default_rng(seed + 1).random(len(known)) < KNOWN_TEST_SHARE
    train, test_known = known[~test_rows], known[test_rows]
    cell_known = (test_known["user"].isin(set(train["user"]))
                  & test_known["item"].isin(set(train["item"])))
    return CrossedDesign(train=train.reset_index(drop=True),
                         test_known=test_known[cell_known].reset_index(drop=True),
                         test_new=frame[is_new].reset_index(drop=True),
                         b_user=b_user[:size.users], b_item=b_item,
                         dropped_known=int((~cell_known).sum()))


def _model_columns(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[["user", "item", "y", *FEATURES]]


def _mse(frame: pd.DataFrame, prediction) -> float:
    return float(np.mean((frame["y"].to_numpy() - np.asarray(prediction, dtype=float)) ** 2))


def _digest(prediction) -> str:
    """The first 16 hex digits of the SHA-256 of the predictions' float64 bytes."""
    values = np.ascontiguousarray(np.asarray(prediction, dtype=np.float64))
    return hashlib.sha256(values.tobytes()).hexdigest()[:16]


#: with ``--save-predictions DIR`` (passed to the children in this variable), each child writes
#: its predictions (and a merf-dask fit its random effects) to DIR/KEY.npz, and the parent
#: compares the in-process and LocalCluster fits' arrays
PREDICTIONS_ENV = "CROSSED_BENCH_PREDICTIONS"
_ARRAYS: dict = {}


def _scored(meter: FitMeter, design: CrossedDesign, predict: Callable, **fields) -> dict:
    known, new = predict(design.test_known), predict(design.test_new)
    _ARRAYS.update(known=np.asarray(known, dtype=float), new=np.asarray(new, dtype=float))
    return {**meter.as_dict(), "train_rows": len(design.train),
            "mse_known": _mse(design.test_known, known), "mse_new": _mse(design.test_new, new),
            "prediction_digest_known": _digest(known), "prediction_digest_new": _digest(new),
            **fields}


# ------------------------------------------------------------------------------------- models

def _merf_record(model, meter: FitMeter, design: CrossedDesign, caught) -> dict:
    components = model.variance_components_
    variances = components[components["var2"].isna()].set_index("grp")["vcov"]
    m_step = [r.m_step_seconds for r in model.history_]
    e_step = [r.e_step_seconds for r in model.history_]
    # scikit-learn's threaded forest predict adds the trees' predictions in the order its threads
    # finish, so two predict calls of one model can differ in the last bits; one thread makes the
    # predictions (and their digests) a function of the fitted model only
    if "n_jobs" in model.fe_model_.get_params():
        model.fe_model_.set_params(n_jobs=1)
    for name, b in model.random_effects_.items():
        b = b.sort_index()
        _ARRAYS[f"b_{name}"] = b.to_numpy(dtype=float)
        _ARRAYS[f"levels_{name}"] = np.asarray(b.index.astype(str), dtype=str)
    crossed_solve = None
    if "item" in variances:
        from merf_dask.core.crossed_solve import DENSE_CROSSED_UNKNOWNS
        n_items = len(model.random_effects_["item"])
        crossed_solve = ("dense" if n_items <= DENSE_CROSSED_UNKNOWNS else "iterative")
    return _scored(
        meter, design, lambda frame: model.predict(_model_columns(frame)),
        sigma2=float(model.sigma2_), var_user=float(variances["user"]),
        var_item=float(variances["item"]) if "item" in variances else None,
        crossed_solve=crossed_solve, iterations=model.n_iter_, converged=bool(model.converged_),
        m_step_seconds=float(sum(m_step)), e_step_seconds=float(sum(e_step)),
        seconds_per_iteration=float(sum(m_step) + sum(e_step)) / model.n_iter_,
        history=[{"iteration": r.iteration, "m_step_seconds": r.m_step_seconds,
                  "e_step_seconds": r.e_step_seconds, "sigma2": r.sigma2,
                  "D": [np.asarray(d).tolist() for d in r.D],
                  "log_likelihood": r.log_likelihood} for r in model.history_],
        warnings=_warning_names(caught))


def _merf_in_process(design: CrossedDesign, formula: str) -> dict:
    from merf_dask import MERF
    train = _model_columns(design.train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            model = MERF(formula=formula, random_state=SEED).fit(train)
    return _merf_record(model, meter, design, caught)


def _merf_cluster(design: CrossedDesign, formula: str) -> dict:
    """The default forest on a 2-worker LocalCluster, reading a lake bucketed by user."""
    from distributed import Client, LocalCluster

    from merf_dask import MERF
    from merf_dask.io.lake import read_lake, write_lake

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crossed-bench-") as scratch, \
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                         dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        cluster_start_seconds = time.perf_counter() - start
        start = time.perf_counter()
        lake = Path(scratch) / "lake"
        write_lake(_model_columns(design.train), lake, cluster_column="user")
        train = read_lake(lake, cluster_column="user")
        lake_write_seconds = time.perf_counter() - start
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with FitMeter() as meter:
                model = MERF(formula=formula, random_state=SEED, client=client).fit(train)
        record = _merf_record(model, meter, design, caught)
        record.update(cluster_start_seconds=cluster_start_seconds,
                      lake_write_seconds=lake_write_seconds,
                      partitions=int(train.npartitions))
    return record


def run_merf_crossed(design):
    return _merf_in_process(design, CROSSED)


def run_merf_crossed_cluster(design):
    return _merf_cluster(design, CROSSED)


def run_merf_users(design):
    return _merf_in_process(design, USERS_ONLY)


def run_merf_users_cluster(design):
    return _merf_cluster(design, USERS_ONLY)


def _level_codes(design: CrossedDesign):
    """Integer codes of user and item, shared by every frame (a new user's code is never in
    training, so GPBoost predicts 0 for its effect)."""
    levels = {column: pd.Index(pd.unique(pd.concat(
        [design.train[column], design.test_known[column], design.test_new[column]])))
        for column in ("user", "item")}

    def codes(frame):
        return np.column_stack([levels[c].get_indexer(frame[c]) for c in ("user", "item")])
    return codes


def run_gpboost(design: CrossedDesign) -> dict:
    """GPBoost: boosted trees (models.GPBOOST_PARAMS, 250 rounds, 1 thread) plus crossed grouped
    random intercepts of user and item."""
    import gpboost as gpb

    codes = _level_codes(design)
    X, y = design.train[FEATURES].to_numpy(), design.train["y"].to_numpy()
    group_data = codes(design.train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            gp_model = gpb.GPModel(group_data=group_data, likelihood="gaussian",
                                   num_parallel_threads=GPBOOST_THREADS)
            booster = gpb.train(params=GPBOOST_PARAMS, train_set=gpb.Dataset(X, y),
                                gp_model=gp_model, num_boost_round=GPBOOST_ROUNDS)

    def predict(frame):
        return booster.predict(data=frame[FEATURES].to_numpy(), group_data_pred=codes(frame),
                               predict_var=False, pred_latent=False,
                               ignore_gp_model=False)["response_mean"]

    cov = gp_model.get_cov_pars()
    return _scored(meter, design, predict, sigma2=float(cov["Error_var"].iloc[0]),
                   var_user=float(cov["Group_1"].iloc[0]), var_item=float(cov["Group_2"].iloc[0]),
                   iterations=GPBOOST_ROUNDS,
                   matrix_inversion_method=getattr(gp_model, "matrix_inversion_method", None),
                   warnings=_warning_names(caught))


def run_mixedlm(design: CrossedDesign) -> dict:
    """statsmodels MixedLM, linear fixed part, crossed intercepts as variance components of one
    group, ML; prediction = fixed part + the BLUPs of the known user and item."""
    import statsmodels.formula.api as smf

    train = _model_columns(design.train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with FitMeter() as meter:
            result = smf.mixedlm("y ~ x1 + x2 + x3", train, groups=np.ones(len(train)),
                                 vc_formula={"user": "0 + C(user)", "item": "0 + C(item)"}
                                 ).fit(reml=False)
    blups = next(iter(result.random_effects.values()))
    # names are like 'user[C(user)[u17]]'
    level = blups.index.str.extract(r"^(\w+)\[C\(\w+\)\[(.*)\]\]$")
    effect = {factor: pd.Series(blups.to_numpy()[(level[0] == factor).to_numpy()],
                                index=level[1][level[0] == factor].to_numpy())
              for factor in ("user", "item")}

    def predict(frame):
        return (np.asarray(result.predict(frame))
                + frame["user"].map(effect["user"]).fillna(0.0).to_numpy()
                + frame["item"].map(effect["item"]).fillna(0.0).to_numpy())

    vcomp = dict(zip(result.model.exog_vc.names, result.vcomp))
    return _scored(meter, design, predict, sigma2=float(result.scale),
                   var_user=float(vcomp["user"]), var_item=float(vcomp["item"]),
                   iterations=None, converged=bool(result.converged),
                   warnings=_warning_names(caught))


@dataclass(frozen=True)
class Model:
    label: str
    run: Callable[[CrossedDesign], dict]
    #: above this many rows the model is not run, with ``skip_reason``
    max_rows: int | None = None
    skip_reason: str = ""
    address_space_gib: float | None = None


MODELS = {
    "merf_crossed": Model("merf-dask, in-process, (1 | user) + (1 | item)", run_merf_crossed),
    "merf_crossed_cluster": Model("merf-dask, LocalCluster 2x1 thread, lake by user, "
                                  "(1 | user) + (1 | item)", run_merf_crossed_cluster),
    "merf_users": Model("merf-dask, in-process, (1 | user) only", run_merf_users),
    "merf_users_cluster": Model("merf-dask, LocalCluster 2x1 thread, lake by user, "
                                "(1 | user) only", run_merf_users_cluster),
    "gpboost": Model(f"GPBoost ({GPBOOST_ROUNDS} rounds, {GPBOOST_THREADS} thread), "
                     "grouped user + item", run_gpboost),
    "mixedlm": Model("statsmodels MixedLM, linear, ML, user + item variance components",
                     run_mixedlm, max_rows=200_000,
                     skip_reason="not run: statsmodels builds the dense rows x levels design of "
                                 "C(user) (2.0M x 100k, 1.6 TB as float64; its use_sparse "
                                 "option converts that dense frame afterwards); at 200k rows "
                                 "it already failed to allocate the 29.8 GiB of its 199,989 x "
                                 "19,998 design",
                     address_space_gib=MIXEDLM_ADDRESS_SPACE_GIB),
}


# -------------------------------------------------------------------------------- orchestration

def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _address_space_limit(gib: float):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (int(gib * 1024**3), int(gib * 1024**3)))
    return limit


def _run_in_subprocess(key: str, size: Size, seed: int, time_limit_s: int) -> dict:
    command = [sys.executable, __file__, "--one", key, "--rows", str(size.rows),
               "--users", str(size.users), "--items", str(size.items),
               "--new-users", str(size.new_users), "--seed", str(seed)]
    gib = MODELS[key].address_space_gib
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **CHILD_ENVIRONMENT}, start_new_session=True,
                               preexec_fn=_address_space_limit(gib) if gib else None)
    try:
        stdout, stderr = process.communicate(timeout=time_limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the model and its workers
        process.communicate()
        return {"status": "not finished", "note": f"not finished in {time_limit_s} s"}
    if process.returncode != 0:
        lines = stderr.strip().splitlines() or ["(no stderr)"]
        return {"status": "failed", "note": f"exit {process.returncode}: {lines[-1][:300]}",
                "stderr_tail": lines[-30:]}
    return {"status": "ok", **json.loads(stdout.strip().splitlines()[-1])}


def _run_model(key: str, size: Size, seed: int) -> dict:
    spec = MODELS[key]
    base = {"key": key, "label": spec.label, "rows": size.rows,
            "time_limit_s": size.time_limit_s}
    if spec.address_space_gib:
        base["address_space_limit_gib"] = spec.address_space_gib
    if spec.max_rows is not None and size.rows > spec.max_rows:
        return {**base, "status": "skipped", "note": spec.skip_reason}
    start = time.perf_counter()
    outcome = _run_in_subprocess(key, size, seed, size.time_limit_s)
    return {**base, **outcome, "subprocess_seconds": time.perf_counter() - start}


def _oracle(design: CrossedDesign) -> dict:
    """True f + b_user + b_item (the noise floor), and for new users what can be known:
    true f + b_item (their own effect is unknowable from training)."""
    known, new = design.test_known, design.test_new
    full = lambda frame: frame["f_true"] + frame["b_user_true"] + frame["b_item_true"]  # noqa
    train_users = design.train["user"].str.slice(1).astype(int).unique()
    train_items = design.train["item"].str.slice(1).astype(int).unique()
    return {"mse_known": _mse(known, full(known)), "mse_new": _mse(new, full(new)),
            "mse_new_without_user_effect": _mse(new, new["f_true"] + new["b_item_true"]),
            "var_user_realised": float(np.var(design.b_user[train_users])),
            "var_item_realised": float(np.var(design.b_item[train_items])),
            "var_user_true": SIGMA_USER2, "var_item_true": SIGMA_ITEM2, "sigma2_true": SIGMA_E2}


def _environment() -> dict:
    return {**run_environment(PACKAGES), "merf_dask": _library_source()}


def _library_source() -> dict:
    """Where merf_dask was imported from and at which commit. A snapshot made with
    ``git archive HEAD merf_dask | tar -x -C DIR`` (run with ``PYTHONPATH=DIR``, so that edits in
    the working tree during a long run do not change the code measured) has its commit in
    ``DIR/COMMIT``; a working tree records HEAD and whether merf_dask/ had uncommitted changes."""
    import merf_dask
    package = Path(merf_dask.__file__).resolve().parent
    source = {"path": str(package)}
    commit_file = package.parent / "COMMIT"
    if commit_file.exists():
        return {**source, "commit": commit_file.read_text().strip(), "snapshot": True}
    try:
        git = ["git", "-C", str(package.parent)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "merf_dask"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return {**source, "commit": commit, "snapshot": False,
                "uncommitted_changes": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return source


def _ratios(runs: list[dict]) -> list[dict]:
    """Seconds per iteration of each crossed fit over its single-factor fit."""
    by_key = {run["key"]: run for run in runs if run["status"] == "ok"}
    ratios = []
    for crossed, single, where in (("merf_crossed", "merf_users", "in-process"),
                                   ("merf_crossed_cluster", "merf_users_cluster",
                                    "LocalCluster 2x1")):
        if crossed in by_key and single in by_key:
            c, s = by_key[crossed], by_key[single]
            ratios.append({
                "where": where,
                "crossed_seconds_per_iteration": c["seconds_per_iteration"],
                "single_seconds_per_iteration": s["seconds_per_iteration"],
                "ratio": c["seconds_per_iteration"] / s["seconds_per_iteration"],
                "crossed_m_step_per_iteration": c["m_step_seconds"] / c["iterations"],
                "single_m_step_per_iteration": s["m_step_seconds"] / s["iterations"],
                "crossed_e_step_per_iteration": c["e_step_seconds"] / c["iterations"],
                "single_e_step_per_iteration": s["e_step_seconds"] / s["iterations"],
                "crossed_iterations": c["iterations"], "single_iterations": s["iterations"],
                "crossed_fit_seconds": c["fit_seconds"], "single_fit_seconds": s["fit_seconds"],
                "fit_ratio": c["fit_seconds"] / s["fit_seconds"]})
    return ratios


def _array_agreement(directory: Path, runs: list[dict]) -> list[dict]:
    """Largest differences between the in-process and LocalCluster fits' saved arrays."""
    ok = {run["key"] for run in runs if run["status"] == "ok"}
    out = []
    for local, cluster in (("merf_crossed", "merf_crossed_cluster"),
                           ("merf_users", "merf_users_cluster")):
        paths = [directory / f"{key}.npz" for key in (local, cluster)]
        if not ({local, cluster} <= ok and all(p.exists() for p in paths)):
            continue
        a, b = (np.load(p, allow_pickle=False) for p in paths)
        record = {"local": local, "cluster": cluster}
        for name in a.files:
            if name.startswith("levels_"):
                record[f"same_{name}"] = bool(np.array_equal(a[name], b[name]))
                continue
            record[f"max_abs_diff_{name}"] = float(np.max(np.abs(a[name] - b[name])))
            record[f"differing_{name}"] = int(np.sum(a[name] != b[name]))
            record[f"count_{name}"] = int(a[name].size)
        out.append(record)
    return out


def run_size(size: Size, seed: int, models: list[str]) -> dict:
    """Every model (or ``models``) at one size, one after the other, and the oracle."""
    start = time.perf_counter()
    load_start = os.getloadavg()
    design = crossed_design(size, seed)
    data = {"simulated_rows": _simulated_rows(size), "train_rows": len(design.train),
            "train_users": int(design.train["user"].nunique()),
            "train_items": int(design.train["item"].nunique()),
            "test_known_rows": len(design.test_known),
            "test_known_dropped_unseen_level": design.dropped_known,
            "test_new_rows": len(design.test_new),
            "test_new_users": int(design.test_new["user"].nunique()),
            "test_new_rows_unseen_item": int((~design.test_new["item"].isin(
                set(design.train["item"]))).sum())}
    oracle = _oracle(design)
    del design
    runs = []
    for key in models:
        run = _run_model(key, size, seed)
        _log(f"[{size.rows:,} rows] {key}: {run['status']}"
             + (f", fit {run['fit_seconds']:.1f} s" if run["status"] == "ok" else
                f" ({run.get('note', '')})"))
        runs.append(run)
    arrays = []
    if os.environ.get(PREDICTIONS_ENV):
        arrays = _array_agreement(Path(os.environ[PREDICTIONS_ENV]), runs)
    return {"size": asdict(size), "seed": seed, "data": data, "oracle": oracle, "runs": runs,
            "ratios": _ratios(runs), "array_agreement": arrays, "not_run": [{"what": MODELS[k].label,
                                                  "reason": "left out of this run (--models)"}
                                                 for k in MODELS if k not in models],
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "wall_seconds": time.perf_counter() - start, "merf_dask": _library_source(),
            "date": time.strftime("%Y-%m-%d %H:%M")}


# ------------------------------------------------------------------------------------- report

def _notes(run: dict) -> str:
    notes = []
    if run.get("cluster_start_seconds") is not None:
        notes.append(f"cluster start {run['cluster_start_seconds']:.1f} s and lake write "
                     f"{run['lake_write_seconds']:.1f} s ({run['partitions']} partitions) "
                     "not in fit time")
    if run.get("matrix_inversion_method"):
        notes.append(f"matrix_inversion_method={run['matrix_inversion_method']} (GPBoost: "
                     "iterative methods where possible, as for several grouped effects)")
    if run.get("crossed_solve"):
        notes.append(f"{run['crossed_solve']} crossed solve")
    if run.get("converged") is False:
        notes.append("not converged")
    notes += [f"warned {name}" for name in run.get("warnings", [])]
    if run["status"] != "ok":
        notes.append(run["note"])
    return "; ".join(notes)


def _commit_text(source: dict) -> str:
    if "commit" not in source:
        return "of unknown commit"
    text = f"at commit {source['commit'][:7]}"
    if source.get("uncommitted_changes"):
        text += " with uncommitted changes to merf_dask/"
    return text


def _model_row(run: dict, size_limit_s: int | None = None) -> str:
    fit_time = {"ok": _number(run.get("fit_seconds"), 1),
                "not finished": f"> {run.get('time_limit_s')}"}.get(run["status"], _DASH)
    cells = [run["label"].replace("|", "\\|"), fit_time, _number(run.get("peak_rss_mb"), 0),
             _number(run.get("mse_known"), 3), _number(run.get("mse_new"), 3),
             _number(run.get("sigma2"), 3), _number(run.get("var_user"), 3),
             _number(run.get("var_item"), 3),
             _DASH if run.get("iterations") is None else str(run["iterations"]),
             _number(run.get("seconds_per_iteration"), 1),
             "; ".join(filter(None, [f"time limit {run['time_limit_s']} s (rerun)"
                                     if size_limit_s and run["time_limit_s"] != size_limit_s
                                     else "", _notes(run)]))]
    return "| " + " | ".join(cells) + " |"


def _agreement(runs: list[dict], arrays: list[dict] = (), prefix: str = "") -> list[str]:
    """Whether each in-process fit and its LocalCluster twin agree bit for bit."""
    arrays = {a["local"]: a for a in arrays}
    by_key = {run["key"]: run for run in runs if run["status"] == "ok"}
    lines = []
    for local, cluster, what in (("merf_crossed", "merf_crossed_cluster", "(1 | user) + (1 | item)"),
                                 ("merf_users", "merf_users_cluster", "(1 | user) only")):
        if local not in by_key or cluster not in by_key:
            continue
        a, b = by_key[local], by_key[cluster]
        same, differ = [], []
        for field, name in (("sigma2", "sigma2"), ("var_user", "Var(user)"),
                            ("var_item", "Var(item)"), ("mse_known", "MSE known"),
                            ("mse_new", "MSE new")):
            if a.get(field) is None and b.get(field) is None:
                continue
            (same if a[field] == b[field] else differ).append(
                name if a[field] == b[field] else f"{name} by {abs(a[field] - b[field]):.1e}")
        lik_a = [h["log_likelihood"] for h in a.get("history", [])]
        lik_b = [h["log_likelihood"] for h in b.get("history", [])]
        if lik_a and lik_b:
            if lik_a == lik_b:
                same.append(f"all {len(lik_a)} iterations' log-likelihoods")
            else:
                first = next((k for k, (x, y) in enumerate(zip(lik_a, lik_b)) if x != y),
                             min(len(lik_a), len(lik_b)))
                gap = max(abs(x - y) for x, y in zip(lik_a, lik_b))
                differ.append(f"log-likelihoods by up to {gap:.1e} (from iteration {first + 1}"
                              f" of {len(lik_a)} / {len(lik_b)})")
        if "prediction_digest_known" in a and "prediction_digest_known" in b:
            digests = all(a[f"prediction_digest_{s}"] == b[f"prediction_digest_{s}"]
                          for s in ("known", "new"))
            (same if digests else differ).append(
                "predictions (SHA-256 of the known-cell and new-user predictions)")
        else:
            differ.append("predictions not compared (records without digests)")
        saved = arrays.get(local)
        if saved:
            for field, name in (("known", "known-cell predictions"),
                                ("new", "new-user predictions"),
                                ("b_user", "user effects"), ("b_item", "item effects")):
                if f"count_{field}" not in saved:
                    continue
                if saved[f"differing_{field}"] == 0:
                    same.append(f"all {saved[f'count_{field}']:,} {name}")
                else:
                    differ.append(f"{saved[f'differing_{field}']:,} of "
                                  f"{saved[f'count_{field}']:,} {name} by up to "
                                  f"{saved[f'max_abs_diff_{field}']:.1e}")
        text = (f"* {prefix}In-process against LocalCluster ({b.get('partitions', '?')} "
                f"partitions), {what}: ")
        if not differ:
            text += "**bit-identical**: " + ", ".join(same) + " equal to every bit."
        else:
            text += ("equal to every bit: " + (", ".join(same) or "nothing") + "; differ: "
                     + ", ".join(differ) + ".")
        lines.append(text.replace("|", "\\|"))
    return lines


def _size_markdown(result: dict) -> list[str]:
    size, data, oracle = result["size"], result["data"], result["oracle"]
    lines = [f"### {data['train_rows']:,} training rows: {data['train_users']:,} users x "
             f"{data['train_items']:,} items", "",
             f"Known cells: {data['test_known_rows']:,} held-out rows (10 % of the training "
             f"users' rows; {data['test_known_dropped_unseen_level']} drawn rows whose user or "
             f"item had no training row left out). New users: {data['test_new_rows']:,} rows of "
             f"{data['test_new_users']:,} users never seen ({data['test_new_rows_unseen_item']} "
             f"of them with an item never seen). Time limit {size['time_limit_s']} s per model; "
             f"run finished {result['date']}, {result['wall_seconds'] / 60:.1f} min, load average "
             f"{result['load_average_start'][0]:.1f} at the start and "
             f"{result['load_average_end'][0]:.1f} at the end; merf-dask "
             f"{_commit_text(result.get('merf_dask', {}))}.", "",
             "| Model | Fit time (s) | Peak RSS (MB) | MSE known cells | MSE new users "
             "| sigma2 | Var(user) | Var(item) | Iterations | s / iteration | Notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_model_row(run, size["time_limit_s"]) for run in result["runs"]]
    lines.append(f"| Oracle: true f + b_user + b_item | {_DASH} | {_DASH} | "
                 f"{oracle['mse_known']:.3f} | {oracle['mse_new']:.3f} | 1 (true) | "
                 f"1 (true; realised {oracle['var_user_realised']:.3f}) | 0.5 (true; realised "
                 f"{oracle['var_item_realised']:.3f}) | {_DASH} | {_DASH} | the noise floor |")
    lines.append(f"| Oracle for new users: true f + b_item (b_user unknowable) | {_DASH} | "
                 f"{_DASH} | {_DASH} | {oracle['mse_new_without_user_effect']:.3f} | {_DASH} | "
                 f"{_DASH} | {_DASH} | {_DASH} | {_DASH} | the floor for new users |")
    agreement = _agreement(result["runs"], result.get("array_agreement", []))
    for k, repeat in enumerate(result.get("timing_repeats", [])):
        agreement += _agreement(repeat["runs"], repeat.get("array_agreement", []),
                                prefix=f"Timing repeat {k + 1}: ")
    if agreement:
        lines += ["", *agreement]
    repeats = result.get("timing_repeats", [])
    if _ratios(result["runs"]):
        lines += ["", "Per-iteration cost of the crossed fit against the users-only fit "
                  "(`history_`: M-step + E-step seconds per iteration; issue 14 asks for < 2)"
                  + (", in this run and in its timing repeats (`--timing-repeat`: the "
                     "merf-dask fits again, same data and seeds):" if repeats else ":"), "",
                  "| Run | Where | Crossed s / it. (M + E) | Users only s / it. (M + E) | Ratio "
                  "| Iterations crossed / users only | Fit (s) crossed / users only "
                  "| Whole fit ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for run_name, ratios in [("main", _ratios(result["runs"])),
                                 *[(f"repeat {k + 1} ({rep['date']}, load "
                                    f"{rep['load_average_start'][0]:.1f}-"
                                    f"{rep['load_average_end'][0]:.1f})", _ratios(rep["runs"]))
                                   for k, rep in enumerate(repeats)]]:
            for r in ratios:
                lines.append(
                    f"| {run_name} | {r['where']} | {r['crossed_seconds_per_iteration']:.2f} "
                    f"({r['crossed_m_step_per_iteration']:.2f} + "
                    f"{r['crossed_e_step_per_iteration']:.2f}) | "
                    f"{r['single_seconds_per_iteration']:.2f} "
                    f"({r['single_m_step_per_iteration']:.2f} + "
                    f"{r['single_e_step_per_iteration']:.2f}) | **{r['ratio']:.2f}** | "
                    f"{r['crossed_iterations']} / {r['single_iterations']} | "
                    f"{r['crossed_fit_seconds']:.1f} / {r['single_fit_seconds']:.1f} | "
                    f"{r['fit_ratio']:.2f} |")
    for later in result.get("later_runs", []):
        lines += ["", f"* Rerun, finished {later['date']} (load average {later['load_average_start'][0]:.1f}"
                  f"-{later['load_average_end'][0]:.1f}, merf-dask "
                  f"{_commit_text(later.get('merf_dask', {}))}), time limit "
                  f"{later['time_limit_s']} s: {', '.join(later['models'])}"]
    if result["not_run"]:
        lines += ["", *[f"* Not run: {item['what']}: {item['reason']}"
                        for item in result["not_run"]]]
    return lines


HEADER = """# Crossed random effects: users x items

`bench/crossed.py`: `merf_dask.simulate.simulate_crossed_frame` (users uniform, items Zipf,
`y = 0.6 g(x) + b_user + b_item + e`, **sigma_user2 = 1.0, sigma_item2 = 0.5, sigma_e2 = 1.0**,
g the paper's f), one simulated frame split into training rows, 10 % held-out rows of the
training users ("known cells": user and item both seen) and all rows of extra users never seen
("new users": 1,000 at every size, same item effects). Every model runs in its own subprocess with
`OPENBLAS/MKL/OMP_NUM_THREADS=1`, killed at its time limit. merf-dask: the default forest (100
trees, min_samples_leaf 5, OOB, `n_jobs=-1`, i.e. 2 threads in-process; 1 thread per worker on
the LocalCluster), `random_state=0`, default `max_iterations=20`, `tol=1e-3`; the LocalCluster fits
read a lake written by `write_lake(..., cluster_column="user")`. The item factor is the crossed
one (the data are partitioned by user): up to 3,000 items (`DENSE_CROSSED_UNKNOWNS`) its system
is solved densely on the driver, beyond (the 1M-row design's 50,000 Zipf items) iteratively:
PCG whose products are passes over the partitions, the M-step's traces by 16 Hutchinson probes,
log|S| by stochastic Lanczos quadrature (measured against the dense solve in
`crossed_traces.md`); the notes say which. GPBoost: `bench/models.py`'s
parameters (learning rate 0.05, max depth 6, 64 leaves, min_data_in_leaf 20, **250 rounds
fixed, 1 thread**: 2 OpenMP threads were ~10 x slower on this VM) with `group_data` = integer
codes of user and item; new users get 0 for their effect in every model. MixedLM: statsmodels,
fixed part linear in x1..x3, ML (`reml=False`), crossed intercepts as variance components of
one group, its subprocess capped at {gib} GiB of address space. Fit time is the fit only (data
in memory; for the LocalCluster, not the cluster start nor the lake write); peak RSS is the
process tree's (driver + workers), sampled every 20 ms. merf-dask was imported from a
`git archive` snapshot of the commit named under each size (`PYTHONPATH`), so that edits in the
working tree during a run do not change the code measured. Machine: a 2-vCPU VM with 23 GB,
**2 shared cores** (another engineer was working on it meanwhile), so times are noisy by
1.5-2 x; MSEs and estimates are deterministic given the seeds.
"""


def results_markdown(results: dict, findings: str = "") -> str:
    lines = [HEADER.format(gib=MIXEDLM_ADDRESS_SPACE_GIB)]
    for rows in sorted(results["sizes"], key=int):
        lines += [*_size_markdown(results["sizes"][rows]), ""]
    text = "\n".join(lines)
    return text + ("\n" + findings.strip() + "\n" if findings.strip() else "")


def _existing_findings(path: Path) -> str:
    """The hand-written "## Findings" section of an earlier report, kept across reruns."""
    if not path.exists():
        return ""
    text = path.read_text()
    return text[text.index("## Findings"):] if "## Findings" in text else ""


def write_results(new: dict, quick: bool, timing_repeat: bool = False) -> Path:
    """Write crossed.json / .md: ``new`` replaces its sizes, or with ``timing_repeat`` is added
    to their ``timing_repeats`` (the merf-dask fits timed again; the main table is kept)."""
    stem = "crossed_quick" if quick else "crossed"
    json_path, md_path = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md"
    results = {"sizes": {}}
    if json_path.exists() and not quick:
        results = json.loads(json_path.read_text())
    results["environment"] = _environment()
    for rows, result in new.items():
        if timing_repeat:
            if rows not in results["sizes"]:
                raise SystemExit(f"--timing-repeat: no main run at {rows} rows to add it to")
            results["sizes"][rows].setdefault("timing_repeats", []).append(result)
        elif rows in results["sizes"] and result["not_run"]:
            # a run of some models (--models) replaces those models' records only
            old = results["sizes"][rows]
            runs = {run["key"]: run for run in old["runs"]}
            runs.update({run["key"]: run for run in result["runs"]})
            old["runs"] = [runs[key] for key in MODELS if key in runs]
            rerun = {agreement["local"] for agreement in result["array_agreement"]}
            old["array_agreement"] = [agreement for agreement in old.get("array_agreement", [])
                                      if agreement["local"] not in rerun
                                      ] + result["array_agreement"]
            old["not_run"] = [item for item in old["not_run"]
                              if item["what"] not in {MODELS[run["key"]].label
                                                      for run in result["runs"]}]
            old.setdefault("later_runs", []).append(
                {key: result[key] for key in ("date", "load_average_start", "load_average_end",
                                              "wall_seconds", "merf_dask")}
                | {"models": [run["key"] for run in result["runs"]],
                   "time_limit_s": result["size"]["time_limit_s"]})
        else:
            results["sizes"][rows] = result
    for result in results["sizes"].values():  # the ratios' fields as this code writes them
        result["ratios"] = _ratios(result["runs"])
        for repeat in result.get("timing_repeats", []):
            repeat["ratios"] = _ratios(repeat["runs"])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=_jsonable))
    md_path.write_text(results_markdown(results, _existing_findings(md_path)))
    return md_path


# ---------------------------------------------------------------------------------------- main

def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.rows:,} rows ({QUICK.users:,} users, {QUICK.items} items), "
                             f"{QUICK.time_limit_s} s limits; writes crossed_quick.*")
    parser.add_argument("--rows", type=int, nargs="+",
                        help="expected training rows (200000: 20k users x 1k items; 1000000: "
                             "100k users x 50k items; 2000000: 100k users x 2k items; others: "
                             "rows/10 users, rows/200 items)")
    parser.add_argument("--seed", type=int, default=DATA_SEED, help="data seed")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), metavar="KEY",
                        help=f"run only these models (default: all of {', '.join(MODELS)})")
    parser.add_argument("--time-limit", type=int, help="seconds per model (default: per size)")
    parser.add_argument("--timing-repeat", action="store_true",
                        help="add this run to the sizes' timing repeats instead of replacing "
                             "them (e.g. with --models merf_crossed merf_users ...)")
    parser.add_argument("--save-predictions", metavar="DIR",
                        help="keep every fit's predictions and random effects in DIR/KEY.npz "
                             "and compare the in-process and LocalCluster fits' arrays")
    parser.add_argument("--one", choices=sorted(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--users", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--new-users", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    if args.one:
        size = Size(args.rows[0], args.users, args.items, args.new_users, 0)
        record = MODELS[args.one].run(crossed_design(size, args.seed))
        if os.environ.get(PREDICTIONS_ENV):
            np.savez(Path(os.environ[PREDICTIONS_ENV]) / f"{args.one}.npz", **_ARRAYS)
        print(json.dumps(record, default=_jsonable))
        return
    sizes = [QUICK] if args.quick else [size_for(rows) for rows in (args.rows or sorted(SIZES))]
    if args.time_limit:
        sizes = [Size(s.rows, s.users, s.items, s.new_users, args.time_limit) for s in sizes]
    models = args.models or list(MODELS)
    if args.save_predictions:
        Path(args.save_predictions).mkdir(parents=True, exist_ok=True)
        os.environ[PREDICTIONS_ENV] = str(Path(args.save_predictions).resolve())
    new = {}
    for size in sizes:
        new[str(size.rows)] = run_size(size, args.seed, models)
        if not args.timing_repeat:  # after every size, so a long run keeps what it has
            md_path = write_results(new, args.quick)
    if args.timing_repeat:
        md_path = write_results(new, args.quick, timing_repeat=True)
    print(md_path.read_text())


if __name__ == "__main__":
    main()
