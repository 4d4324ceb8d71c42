"""The ``merf-dask`` command line, also ``dask merf`` (the ``dask_cli`` entry point ``merf``).

Commands
--------
simulate   write the paper's data-generating process as a lake bucketed by cluster
bucket     write a copy of any Parquet dataset bucketed by a column
fit        fit a formula on a lake, on a Dask cluster, and write a model directory (a lake
           not bucketed by the first grouping factor through its bucketed copy in a scratch
           location, written once)
predict    add ``prediction`` (and ``prediction_std``) to every row of a lake
evaluate   scores on a labelled lake (MSE and R^2; log loss, AUC, Brier; deviance), for rows of
           known and of new clusters
show       the summary of a model directory
demo       simulate, fit on an embedded LocalCluster, predict, evaluate and show

The click group is named ``merf``, the name ``dask`` gives the subcommand; the console script
still calls itself ``merf-dask``. Both print warnings and errors the same way.

Every expected failure (bad formula, unknown column, missing or corrupt lake, existing output,
...) ends with one line ``merf-dask: error: ...`` on stderr and exit status 1, never a traceback.
A bad job spec (``fit --job``) is a usage error: one such line naming the file, the key and the
value, and exit status 2, before anything is written or any cluster is started. Its values go
through the click types of the flags they stand for (booleans only as YAML booleans), so a value
the flag would refuse is refused.

``predict``, ``evaluate`` and ``show`` refuse a model directory whose learner could run code when
it is loaded (a pickle, or types merf-dask does not trust) unless given ``--trust-model``, and,
while a signing key is set (:mod:`merf_dask.io.signing`), one that is unsigned or mis-signed.

A fit shows its EM iterations on stderr: a tqdm bar when stderr is a terminal and tqdm (the
optional extra ``progress``) is installed, one line per iteration otherwise, nothing with
``--quiet``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

import click
import numpy as np
import pandas as pd
import yaml

from .core.em import MAX_CLUSTER_ROWS, IterationRecord
from .learners import LEARNERS, make_learner

__all__ = ["cli", "main"]

logger = logging.getLogger("merf_dask")

_EXPECTED_ERRORS = (ValueError, TypeError, OSError, KeyError, ImportError)


_trust_model = click.option(
    "--trust-model", is_flag=True,
    help="Also load a learner stored as a pickle or with types merf-dask does not trust. Such a "
         "file can run arbitrary code when it is loaded: only for model directories you or your "
         "pipeline wrote.")


def _echo_error(message: str) -> None:
    """``merf-dask: error: MESSAGE`` on stderr, the one line every failure ends with."""
    click.echo(f"merf-dask: error: {message}", err=True)


class _CleanErrors(click.Group):
    """A click group that turns expected exceptions, and bad flags of its commands, into one
    line on stderr."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _EXPECTED_ERRORS as error:
            _echo_error(str(error).strip().splitlines()[0] if str(error).strip() else repr(error))
            ctx.exit(1)
        except click.UsageError as error:  # a bad flag of a command: one line too, exit 2
            _echo_error(error.format_message())
            ctx.exit(2)


@click.group(name="merf", cls=_CleanErrors)
@click.version_option(package_name="merf-dask", prog_name="merf-dask")
def cli():
    """Mixed Effects Random Forests on Parquet lakes and Dask clusters."""
    # here rather than in main(), which ``dask merf`` does not run
    warnings.showwarning = _show_warning
    # Workers of an embedded cluster inherit this process's stderr; their log of a failed task
    # (with its traceback) would bury the one-line error. Set the variable to see it again.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "critical")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


class _ProgressBar(logging.Handler):
    """A logging handler that draws the EM iterations logged on ``merf_dask`` as a tqdm bar.

    The EM loop logs every iteration as ``logger.info("%s", record)`` with an
    :class:`~merf_dask.core.em.IterationRecord`; the bar advances to its iteration and shows its
    GLL and sigma2. Any other record (a resumed checkpoint, ...) is written above the bar.

    Parameters
    ----------
    total : int
        The fit's ``max_iterations`` (a fit that converges leaves the bar short of it).

    Raises
    ------
    ImportError
        When tqdm, the optional extra ``progress``, is not installed.
    """

    def __init__(self, total: int):
        from tqdm import tqdm
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.bar = tqdm(total=total, desc="EM", file=sys.stderr, dynamic_ncols=True)

    def emit(self, record: logging.LogRecord) -> None:
        iteration = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if not isinstance(iteration, IterationRecord):
            self.bar.write(self.format(record), file=sys.stderr)
            return
        shown = {"GLL": f"{iteration.gll:.6g}"}
        if iteration.sigma2 is not None:  # binary and count fits have no residual variance
            shown["sigma2"] = f"{iteration.sigma2:.4g}"
        self.bar.set_postfix(shown, refresh=False)
        # to the iteration rather than by one: a resumed fit starts after its checkpoint
        self.bar.update(iteration.iteration - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        super().close()


def _above_progress_bar():
    """A context in which writing to stderr does not break a progress bar drawn there."""
    tqdm = sys.modules.get("tqdm")  # no bar can be drawn before tqdm is imported
    return tqdm.tqdm.external_write_mode(file=sys.stderr) if tqdm else contextlib.nullcontext()


def _iteration_handler(total: int) -> logging.Handler:
    """A progress bar of ``total`` iterations on a terminal, else one line per EM iteration."""
    if sys.stderr.isatty():
        with contextlib.suppress(ImportError):  # without tqdm, the lines
            return _ProgressBar(total)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


@contextlib.contextmanager
def _iteration_log(*, quiet: bool, max_iterations: int):
    """Show on stderr the EM iterations of the fit run in this context, unless ``quiet``."""
    # the cluster's own INFO/WARNING chatter would drown the iterations
    logging.getLogger("distributed").setLevel(logging.ERROR)
    logger = logging.getLogger("merf_dask")
    logger.handlers.clear()
    if quiet:
        yield
        return
    handler = _iteration_handler(max_iterations)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:  # closes the bar before an error or the summary is printed below it
        logger.removeHandler(handler)
        handler.close()


def _refuse_existing(path: str, overwrite: bool) -> None:
    """Fail before any work when the output exists (the write itself checks again, atomically)."""
    from .io.filesystem import open_filesystem
    filesystem, root = open_filesystem(path)
    if not overwrite and filesystem.exists(root):
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")


def checkpoint_path(output: str) -> str:
    """Where a fit writing ``output`` keeps its checkpoint: next to the model directory."""
    return f"{str(output).rstrip('/')}.checkpoint.parquet"


def _scheduler_lost(client, error: BaseException | None = None) -> bool:
    """Whether ``client`` has lost its scheduler (``error`` raised by a fit on it, if any)."""
    # the futures the client cancelled when the connection dropped, also once it reconnected
    if getattr(error, "reason", None) == "scheduler-connection-lost":
        return True
    # a reset connection to the scheduler can reach the fit before the client notices it
    if isinstance(error, OSError) and str(client.scheduler.address) in str(error):
        return True
    return client.status != "running" or client.scheduler_comm is None or \
        client.scheduler_comm.comm is None or client.scheduler_comm.comm.closed()


def _default_scratch(lake: str) -> str | None:
    """Where bucketed copies of ``lake`` go without ``--scratch``: $MERF_DASK_SCRATCH, else the
    user's cache directory for a lake on the local disk (workers elsewhere could not read a
    copy there: a lake behind a URL needs --scratch)."""
    if os.environ.get("MERF_DASK_SCRATCH"):
        return os.environ["MERF_DASK_SCRATCH"]
    if "://" in str(lake):
        return None
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "merf-dask", "lakes")


def _training_source(lake: str, column: str, scratch: str | None, max_cluster_rows: int) -> str:
    """``lake`` when it is bucketed by ``column``, else its bucketed copy under the scratch
    location, written once (``lake`` itself, shuffled into worker memory, when there is none)."""
    from .io.lake import bucketed_by, bucketed_copy
    if bucketed_by(lake) == column:
        return lake
    scratch = scratch or _default_scratch(lake)
    if scratch is None:
        logger.warning("%s is not bucketed by %r and no --scratch (or MERF_DASK_SCRATCH) is set "
                       "for a bucketed copy: it is shuffled into worker memory", lake, column)
        return lake
    return bucketed_copy(lake, cluster_column=column, scratch=scratch,
                         max_cluster_rows=max_cluster_rows)


def _fit(*, client, lake, formula, output, max_iterations=20, learner="random-forest",
         overwrite=False, quiet=False, seed=0, scratch=None, max_cluster_rows=MAX_CLUSTER_ROWS,
         family="gaussian"):
    """Fit ``formula`` on ``lake`` with ``client`` and write the model directory ``output``.

    A lake not bucketed by the first grouping factor is read from its bucketed copy under
    ``scratch`` (:func:`_training_source`). A Gaussian fit checkpoints after every EM iteration
    next to ``output`` and resumes from there when run again after being killed or losing its
    scheduler (binary and count fits do not checkpoint yet).
    """
    from .io.filesystem import data_fingerprint
    from .estimator import MERF
    from .formula import parse_formula
    from .io.lake import read_lake

    frame = read_lake(lake)
    spec = parse_formula(formula, columns=list(frame.columns))
    column = _partition_column(spec)
    frame = read_lake(_training_source(lake, column, scratch, max_cluster_rows),
                      columns=list(spec.columns), cluster_column=column)
    checkpoint = checkpoint_path(output) if family == "gaussian" else None
    model = MERF(make_learner(learner, random_state=seed, family=family), formula=formula,
                 family=family,
                 max_iterations=max_iterations, max_cluster_rows=max_cluster_rows,
                 random_state=seed, checkpoint=checkpoint, client=client)
    # Once the scheduler is lost, the client logs its failed reconnection (after the connect
    # timeout) and, when closed, its cancelled one with a traceback: the error below says it all.
    client_log = logging.getLogger("distributed.client")

    def quiet_once_lost(record):
        return not _scheduler_lost(client)

    client_log.addFilter(quiet_once_lost)
    lost = False
    try:
        with _iteration_log(quiet=quiet, max_iterations=max_iterations):
            model.fit(frame)
    except Exception as error:
        lost = _scheduler_lost(client, error)
        if not lost:
            raise
        # an OSError, so that _CleanErrors prints it as "merf-dask: error: ..." (exit status 1)
        raise ConnectionError(
            f"lost the Dask scheduler during the fit ({type(error).__name__}); " + (
                f"finished EM iterations are checkpointed in {checkpoint}: run the same "
                "command again to resume" if checkpoint else "run the same command again")
        ) from None
    finally:
        if not lost:  # when lost, the filter stays for the client's close
            client_log.removeFilter(quiet_once_lost)
    model.save(output, overwrite=overwrite, fingerprint=data_fingerprint(lake))
    if not quiet:
        click.echo(model.summary())
        click.echo(f"\nmodel written to {output} (report: {output}/report.html)")
    return model


@cli.command()
@click.option("--rows", type=click.IntRange(min=1), required=True, help="Number of rows.")
@click.option("--clusters", type=click.IntRange(min=1), required=True, help="Number of clusters.")
@click.option("--output", required=True, help="Lake to write (path or URL).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def simulate(rows, clusters, output, seed, overwrite):
    """Write the paper's data-generating process as a lake bucketed by cluster."""
    from .io.lake import write_simulated_lake
    write_simulated_lake(output, n_rows=rows, n_clusters=clusters, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {rows} rows in {clusters} clusters to {output}")


def _job_options(ctx: click.Context, job: str) -> dict:
    """The values of the job spec ``job``, each converted as its flag converts its value.

    The keys are the names of the command's parameters (``n_workers`` for ``--n-workers``),
    taken with their types from ``ctx.command.params``. A flag (``--overwrite``) takes a YAML
    boolean only (the string ``"false"`` would be true). Any other parameter takes a scalar,
    converted from its text as the command line's value is, so that ``2.5`` is no integer
    here either. The whole file is checked, also keys that flags override.

    Parameters
    ----------
    ctx : click.Context
        The context of the command the job spec stands for.
    job : str
        Path of the YAML file.

    Returns
    -------
    dict
        Parameter name -> converted value, for the keys the file has.

    Raises
    ------
    click.UsageError
        One line naming ``job`` and the problem: YAML that does not parse or is not a mapping,
        an unknown key, or a value its flag refuses (with the key and the value).
    """
    try:
        spec = yaml.safe_load(Path(job).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        raise click.UsageError(f"job spec {job}: invalid YAML: {problem}{where}") from None
    spec = {} if spec is None else spec  # an empty file
    if not isinstance(spec, dict):
        raise click.UsageError(f"job spec {job}: expected a mapping of keys to values, "
                               f"got {spec!r}")
    params = {param.name: param for param in ctx.command.params if param.name != "job"}
    unknown = sorted(map(str, set(spec) - set(params)))
    if unknown:
        raise click.UsageError(f"job spec {job}: unknown keys {', '.join(unknown)} "
                          f"(allowed: {', '.join(sorted(params))})")
    options = {}
    for name, value in spec.items():
        param = params[name]
        try:
            if isinstance(param.type, click.types.BoolParamType):
                if not isinstance(value, bool):
                    raise click.BadParameter(f"{value!r} is not a YAML boolean (true or false)")
            elif value is None or isinstance(value, (bool, list, dict)):
                raise click.BadParameter(f"{value!r} is not a valid {param.type.name}")
            else:
                value = str(value)
            options[name] = param.process_value(ctx, value)
        except click.BadParameter as error:
            raise click.UsageError(f"job spec {job}: {name}: {error.message.rstrip('.')}") from None
    return options


_max_cluster_rows = click.option(
    "--max-cluster-rows", type=click.IntRange(min=1), default=MAX_CLUSTER_ROWS,
    show_default=True, help="A cluster with more rows is spread over partitions (and buckets) "
    "by row rather than held by one task.")


@cli.command()
@click.argument("lake", required=False)
@click.option("--formula", help='lme4 formula, e.g. "y ~ x1 + x2 + (1 + t | g)".')
@click.option("--output", help="Model directory to write (path or URL).")
@click.option("--family", type=click.Choice(["gaussian", "binomial", "poisson"]),
              default="gaussian", show_default=True,
              help="The response: continuous, binary 0/1 (logit) or counts (log).")
@click.option("--scheduler", help="Address of a running scheduler (tcp://host:8786).")
@click.option("--cluster-config", type=click.Path(dir_okay=False),
              help="A file from cluster_configs/ naming the cluster.")
@click.option("--n-workers", type=click.IntRange(min=1), help="Workers of the embedded cluster.")
@click.option("--memory-limit", help="Memory per worker of the embedded cluster, e.g. 1GiB.")
@click.option("--max-iterations", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--learner", type=click.Choice(LEARNERS), default="random-forest",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing model directory.")
@click.option("--quiet", is_flag=True, help="No progress (bar or lines) and no summary.")
@click.option("--scratch", help="Where to write (once) and find again a copy of a LAKE not "
              "bucketed by the first grouping factor [default: $MERF_DASK_SCRATCH, else "
              "~/.cache/merf-dask/lakes for a local LAKE].")
@_max_cluster_rows
@click.option("--job", type=click.Path(exists=True, dir_okay=False),
              help="YAML job spec whose keys stand for the flags (flags win).")
@click.pass_context
def fit(ctx, job, **options):
    """Fit a MERF on LAKE and write a model directory.

    With no --scheduler or --cluster-config, DASK_SCHEDULER_ADDRESS is used when set (a Dask
    Kubernetes DaskJob sets it); otherwise an embedded LocalCluster sized to the machine runs.
    """
    if job:
        for name, value in _job_options(ctx, job).items():
            if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
                options[name] = value
    missing = [name for name in ("lake", "formula", "output") if not options.get(name)]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (give them as flags or in --job)")
    from .dask.cluster import connect
    from .io.signing import signing_key
    scheduler, cluster_config = options.pop("scheduler"), options.pop("cluster_config")
    n_workers, memory_limit = options.pop("n_workers"), options.pop("memory_limit")
    _refuse_existing(options["output"], options["overwrite"])  # before starting a cluster
    signing_key()  # an unusable signing key fails now, not when the fitted model is saved
    with connect({"address": scheduler} if scheduler else cluster_config, n_workers=n_workers,
                 memory_limit=memory_limit) as client:
        _fit(client=client, **options)


@cli.command()
@click.argument("lake")
@click.option("--cluster", "cluster_column", required=True,
              help="Column to bucket by (a formula's first grouping factor).")
@click.option("--output", required=True, help="Lake to write (path or URL).")
@click.option("--buckets", type=click.IntRange(min=1),
              help="Number of buckets [default: about one per million rows, a few per worker "
              "thread].")
@click.option("--scheduler", help="Address of a running scheduler.")
@click.option("--n-workers", type=click.IntRange(min=1), help="Workers of the embedded cluster.")
@click.option("--memory-limit", help="Memory per worker of the embedded cluster, e.g. 1GiB.")
@_max_cluster_rows
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def bucket(lake, cluster_column, output, buckets, scheduler, n_workers, memory_limit,
           max_cluster_rows, overwrite):
    """Write a copy of LAKE (any Parquet dataset) bucketed by a column: fits read it out of core.

    Each file's rows are written to the buckets they fall in where they were read (no
    shuffle); no process holds the data.
    """
    from .dask.cluster import connect
    from .io.lake import bucket_lake
    _refuse_existing(output, overwrite)
    with connect({"address": scheduler} if scheduler else None, n_workers=n_workers,
                 memory_limit=memory_limit):
        bucket_lake(lake, output, cluster_column=cluster_column, n_buckets=buckets,
                    max_cluster_rows=max_cluster_rows, overwrite=overwrite)
    click.echo(f"wrote {output}, bucketed by {cluster_column!r}")


def _with_predictions(part: pd.DataFrame, *, model, intervals: bool) -> pd.DataFrame:
    result = model.predict(part, return_std=intervals)
    part = part.copy()
    if intervals:
        part["prediction"], part["prediction_std"] = result
    else:
        part["prediction"] = result
    return part


@cli.command()
@click.argument("lake")
@click.option("--model", "model_dir", required=True, help="Model directory.")
@click.option("--output", required=True, help="Prediction lake to write.")
@click.option("--intervals", is_flag=True, help="Add prediction_std (for intervals).")
@click.option("--scheduler", help="Address of a running scheduler.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@_trust_model
def predict(lake, model_dir, output, intervals, scheduler, overwrite, trust_model):
    """Add a prediction column to every row of LAKE and write it to OUTPUT."""
    from .dask.cluster import connect
    from .estimator import MERF
    from .io.lake import read_lake, write_dataset
    _refuse_existing(output, overwrite)
    model = MERF.load(model_dir, trusted=trust_model)
    with connect({"address": scheduler} if scheduler else None) as client:
        model_future = client.scatter(model, broadcast=True, hash=False)
        frame = read_lake(lake)
        meta = frame._meta.assign(prediction=np.float64(0))
        if intervals:
            meta = meta.assign(prediction_std=np.float64(0))
        predicted = frame.map_partitions(_with_predictions, model=model_future, intervals=intervals,
                                         meta=meta)
        write_dataset(predicted, output, overwrite=overwrite)
    click.echo(f"predictions written to {output}")


def _partition_column(spec) -> str:
    """The column a lake is partitioned by: the first grouping factor's (its first column for
    an interaction such as a:b, whose levels lie inside that column's)."""
    return spec.terms[0].factor[0]


def _row_kinds(part: pd.DataFrame, model) -> list[tuple[str, np.ndarray]]:
    """The rows of ``part`` by how many of their levels the model knows: known / new clusters
    with one grouping factor; all, some or no levels known with several."""
    groups = model.design_.transform(part, require_response=False).groups
    known = np.column_stack([e.levels.get_indexer(g) >= 0
                             for e, g in zip(model.state_.effects, groups)])
    if known.shape[1] == 1:
        return [("known clusters", known[:, 0]), ("new clusters", ~known[:, 0])]
    every, some = known.all(axis=1), known.any(axis=1)
    return [("all levels known", every), ("some levels known", some & ~every),
            ("no level known", ~some)]


def _partition_scores(part: pd.DataFrame, model) -> dict:
    """One partition's score sums (:func:`merf_dask.core.scores.partial_scores`) per kind of
    row."""
    from .core.scores import partial_scores
    y = part[model.formula_spec_.response].to_numpy(dtype=float)
    prediction = model.predict(part)
    return {name: partial_scores(y[mask], prediction[mask], model.family)
            for name, mask in _row_kinds(part, model)}


def _add_scores(*parts: dict) -> dict:
    total = {}
    for part in parts:
        for name, sums in part.items():
            total[name] = sums if name not in total else {
                key: total[name][key] + value for key, value in sums.items()}
    return total


def evaluate_lake(lake: str, model, client) -> pd.DataFrame:
    """Scores of ``model`` on a labelled lake, by known / new cluster and overall: MSE and R^2
    (Gaussian), log loss, AUC and Brier score (binomial), mean deviance and MSE (poisson)."""
    from .core.scores import finish_scores, score_names
    from .io.lake import read_lake
    # every row's error stands alone: any layout is read as it is
    frame = read_lake(lake, columns=list(model.formula_spec_.columns))
    model_future = client.scatter(model, broadcast=True, hash=False)
    parts = [client.submit(_partition_scores, part, model_future, pure=False)
             for part in client.compute(frame.to_delayed())]
    while len(parts) > 1:  # tree-reduced: the AUC's histograms are 2 x 65,536 floats
        parts = [client.submit(_add_scores, *parts[i:i + 8], pure=False)
                 for i in range(0, len(parts), 8)]
    sums = parts[0].result()
    sums["all rows"] = _add_scores(*({"all rows": kind} for kind in sums.values()))["all rows"]
    rows = {name: {"rows": int(s["n"]), **finish_scores(s, model.family)}
            for name, s in sums.items() if s["n"] > 0}
    return pd.DataFrame.from_dict(rows, orient="index",
                                  columns=["rows", *score_names(model.family)]
                                  ).rename_axis("rows")


@cli.command()
@click.argument("lake")
@click.option("--model", "model_dir", required=True, help="Model directory.")
@click.option("--scheduler", help="Address of a running scheduler.")
@_trust_model
def evaluate(lake, model_dir, scheduler, trust_model):
    """Scores on a labelled LAKE, for rows of known and of new clusters: MSE and R^2 (log loss,
    AUC and Brier score for binomial models, mean deviance and MSE for poisson)."""
    from .dask.cluster import connect
    from .estimator import MERF
    model = MERF.load(model_dir, trusted=trust_model)
    with connect({"address": scheduler} if scheduler else None) as client:
        click.echo(evaluate_lake(lake, model, client).to_string(float_format=lambda v: f"{v:.4f}"))


@cli.command()
@click.argument("model_dir")
@_trust_model
def show(model_dir, trust_model):
    """Print the summary of a model directory."""
    from .estimator import MERF
    model = MERF.load(model_dir, trusted=trust_model)
    click.echo(model.summary())
    manifest = model.manifest_
    click.echo(f"\nmodel size: {manifest['model_size_bytes'] / 1e6:.1f} MB; "
               f"report: {model_dir}/report.html")


@cli.command()
@click.option("--output", default="demo-output", show_default=True,
              help="Directory for the demo's lake, model and predictions (replaced).")
@click.option("--rows", type=click.IntRange(min=100), default=50_000, show_default=True)
@click.option("--clusters", type=click.IntRange(min=2), default=1_000, show_default=True)
def demo(output, rows, clusters):
    """Simulate a lake, fit on an embedded LocalCluster, evaluate its predictions and show it."""
    from .dask.cluster import connect
    from .io.lake import write_lake
    from .simulate import simulate_frame
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    train, test, model_dir = root / "lake", root / "test-lake", root / "model"
    click.echo(f"1. simulating {rows} rows in {clusters} clusters -> {train}, {test}")
    # 10 % of the clusters are held out entirely (new clusters); of the rest, 20 % of the rows
    frame = simulate_frame(n_rows=rows, n_clusters=clusters, seed=0)
    cluster_number = frame["cluster"].str[1:].astype(int)
    rng = np.random.default_rng(1)
    is_test = (cluster_number % 10 == 9) | (rng.random(len(frame)) < 0.2)
    write_lake(frame[~is_test], train, cluster_column="cluster", overwrite=True)
    write_lake(frame[is_test], test, cluster_column="cluster", overwrite=True)
    with connect(None, n_workers=2) as client:  # one embedded cluster for fit and evaluation
        click.echo("2. fitting 'y ~ x1 + x2 + x3 + (1 | cluster)' on an embedded LocalCluster")
        model = _fit(client=client, lake=str(train), formula="y ~ x1 + x2 + x3 + (1 | cluster)",
                     output=str(model_dir), overwrite=True, quiet=True)
        for record in model.history_:
            click.echo(f"   iteration {record.iteration}: GLL {record.gll:.6g}, "
                       f"sigma2 {record.sigma2:.4g}")
        click.echo(f"3. evaluating on {test}")
        click.echo(evaluate_lake(str(test), model, client).to_string(
            float_format=lambda v: f"{v:.4f}"))
    click.echo("4. the model\n")
    click.echo(model.summary())
    click.echo(f"\nmodel directory: {model_dir}\nreport: {model_dir / 'report.html'}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like the errors: no source file and line for a user to decode."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    with _above_progress_bar():  # "did not converge" comes while the bar is still drawn
        click.echo(f"merf-dask: warning: {text}", err=True)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="merf-dask")
