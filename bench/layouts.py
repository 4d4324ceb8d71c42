"""Fitting a Parquet lake laid out by day (a foreign layout) against merf-dask's own bucketed lake.

For each size N (default 10M and 20M rows, N / 100 clusters of 100 rows):

1. ``merf-dask simulate`` writes the paper's data as a lake bucketed by cluster (merf-dask's own
   layout: ``bucket=K/part-0.parquet``, every cluster in one file);
2. :func:`write_by_day` writes the same rows as a hive dataset partitioned by an int column
   ``day`` (16 days, ``day=K/part-0.parquet``), streaming record batch by record batch through
   ``pyarrow.dataset.write_dataset``: the ``day`` of a row is its global row index modulo 16
   (the simulated rows come cluster by cluster, so every cluster of 100 rows lands on all 16
   days), and each batch's rows are permuted with a fixed seed before they are written, so a day
   file holds its clusters' rows interleaved rather than in cluster runs. The ``bucket`` column
   and merf-dask's schema metadata are dropped: nothing marks the copy as a lake;
3. three metered CLI fits, ``y ~ x1 + x2 + x3 + (1 | cluster)`` on an embedded LocalCluster of 2
   workers x 1 GiB (``--n-workers 2 --memory-limit 1GiB --max-iterations 3 --quiet``), each with
   ``--scratch`` pointing to a directory that starts empty for the size:

   a. ``bucketed``: the bucketed lake (read as it is; the scratch directory must stay empty);
   b. ``by_day_first``: the by-day lake; the CLI first writes its bucketed copy to the scratch
      directory (``bucketed_copy``, named by the source's fingerprint) and fits that;
   c. ``by_day_reused``: the by-day lake again, the copy of (b) found again and read.

   Every fit records its wall time, the peak RSS of every worker process and the number of worker
   pids (more pids than workers = a worker was restarted, :mod:`cli_meter`), its exit status,
   sigma2 and Var(b) of the last iteration (the model's manifest, :func:`scaling.fit_record`), and
   the CPU share the hypervisor stole meanwhile. The CLI logs nothing about the copy under
   ``--quiet``, so the copy is timed from outside: a thread polls the scratch directory and
   records when the copy's staging directory (``.bucketed-<key>.tmp-*``) first appears and when the
   published ``bucketed-<key>`` appears (the atomic rename at the end of the write). Ratios:
   wall (b) / (a) and (c) / (a); the issue's target is at most 1.2 x the bucketed lake's time.

4. the skew case (``--skew-rows``, default 5M): the simulated lake of that size, written by day
   as above, with 40 % of the rows (drawn at random with a fixed seed) relabelled to cluster
   ``c0`` (:func:`write_by_day` with ``skew_share``), so ``c0`` holds ~40 % of all rows. ``y`` is
   not simulated again (a relabelled row keeps its own cluster's random effect): it is a memory
   test of the bucketed copy and the fit, sigma2 and Var(b) mean nothing there. One fit by day
   (an empty scratch, so the copy is written), recording completion, restarts, worker peak RSS,
   wall and the rows of the largest bucket of the copy.

Every fit runs under ``--timeout`` (default 1800 s): a fit past it is killed (its workers too)
and recorded as such. Before each fit the benchmark waits (at most ``--wait-idle`` seconds,
default 120) for the CPU to be under 25 % busy, and it records the share of the CPU that other
processes used during the fit: on a 2-core machine shared with other work, that load slows a fit
and skews the ratios.

Usage::

    .venv/bin/python bench/layouts.py [--rows 10000000 20000000] [--skew-rows 5000000]
        [--skew-share 0.4] [--iterations 3] [--lake-dir /tmp] [--timeout 1800]
        [--wait-idle 120] [--tag TAG] [--reuse] [--report-only] [--keep-lakes]

Each size's record is written to ``bench/results/layouts_runs/<rows>.json`` (the skew case to
``skew-<rows>.json``; ``--tag T``, a repeated run, adds ``-T``), also after each fit
(``"complete": false`` until the size is done), and reused by later runs with ``--reuse``, which
also resumes a partial record after its last fit while its lakes are still there;
``--report-only`` rebuilds ``layouts.json`` and ``layouts.md`` from those records (and a table of
an earlier library's records kept in ``layouts_runs/p2p_shuffle/``). ``--skew-rows 0`` skips the
skew case.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cli_meter import run_metered  # noqa: E402
from measure import StolenCPU  # noqa: E402
from scaling import (CLI, FORMULA, MEMORY_LIMIT, N_WORKERS, ROOT, _fmt, fit_record,  # noqa: E402
                     simulate)

RESULTS = HERE / "results"
RUNS = RESULTS / "layouts_runs"
N_DAYS = 16
DATA_COLUMNS = ["cluster", "y", "x1", "x2", "x3"]
SKEW_CLUSTER = "c0"
TARGET_RATIO = 1.2
_LINE_CHARS = 400  # of a stderr line kept (the scheduler's lists of keys run to thousands)
_STDERR_WORDS = ("error", "killed", "restart", "memory", "warning", "lost", "fail")
CASES = ("bucketed", "by_day_first", "by_day_reused")
CASE_LABELS = {"bucketed": "(a) bucketed lake",
               "by_day_first": "(b) by day, empty scratch (copy written)",
               "by_day_reused": "(c) by day, copy reused",
               "skew_by_day": "by day, skewed, empty scratch (copy written)"}


# ------------------------------------------------------------------------------ data

def write_by_day(source: Path, output: Path, *, n_days: int = N_DAYS, seed: int = 0,
                 skew_share: float | None = None) -> dict:
    """Write the rows of the lake ``source`` to ``output`` partitioned by ``day`` (hive), one
    record batch at a time; with ``skew_share``, that share of the rows (drawn at random) is
    relabelled to cluster :data:`SKEW_CLUSTER`."""
    if output.exists():
        shutil.rmtree(output)
    dataset = ds.dataset(source, format="parquet", partitioning="hive")
    schema = pa.schema([dataset.schema.field(name) for name in DATA_COLUMNS]
                       + [pa.field("day", pa.int32())])  # no merf-dask metadata
    rng = np.random.default_rng(seed)
    counts = {"rows": 0, "batches": 0, "skew_rows": 0, "largest_batch": 0}

    def batches():
        for batch in dataset.to_batches(columns=DATA_COLUMNS, batch_size=1 << 18):
            n = batch.num_rows
            if n == 0:
                continue
            day = ((counts["rows"] + np.arange(n)) % n_days).astype(np.int32)
            columns = [batch.column(name) for name in DATA_COLUMNS]
            if skew_share:
                relabel = rng.random(n) < skew_share
                columns[0] = pc.if_else(pa.array(relabel),
                                        pa.scalar(SKEW_CLUSTER, columns[0].type), columns[0])
                counts["skew_rows"] += int(relabel.sum())
            table = pa.RecordBatch.from_arrays([*columns, pa.array(day)], schema=schema)
            counts["rows"] += n
            counts["batches"] += 1
            counts["largest_batch"] = max(counts["largest_batch"], n)
            yield table.take(pa.array(rng.permutation(n)))

    start = time.perf_counter()
    ds.write_dataset(batches(), output, schema=schema, format="parquet",
                     partitioning=ds.partitioning(pa.schema([schema.field("day")]),
                                                  flavor="hive"),
                     basename_template="part-{i}.parquet", existing_data_behavior="error",
                     min_rows_per_group=1 << 17, max_rows_per_group=1 << 20)
    seconds = time.perf_counter() - start
    files = sorted(output.rglob("*.parquet"))
    footers = [pq.ParquetFile(f).metadata for f in files]
    out = {"write_seconds": seconds, "rows": counts["rows"], "source_batches": counts["batches"],
           "largest_source_batch": counts["largest_batch"], "n_days": n_days,
           "n_files": len(files), "row_groups": sum(f.num_row_groups for f in footers),
           "bytes": sum(f.stat().st_size for f in files), "seed": seed}
    if skew_share:
        out.update(skew_share=skew_share, skew_cluster=SKEW_CLUSTER,
                   relabelled_rows=counts["skew_rows"])
    return out


def lake_bytes(lake: Path) -> int:
    return sum(f.stat().st_size for f in lake.rglob("*.parquet"))


def largest_cluster_rows(lake: Path) -> dict:
    """Rows of the largest cluster and of the largest file of a lake (reads the cluster column)."""
    counts = ds.dataset(lake, format="parquet", partitioning="hive").to_table(
        columns=["cluster"]).column("cluster").value_counts()
    values, sizes = counts.field("values"), counts.field("counts").to_numpy()
    top = int(np.argmax(sizes))
    files = sorted(lake.rglob("*.parquet"))
    file_rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    holding = sum(pc.any(pc.equal(pq.read_table(f, columns=["cluster"]).column("cluster"),
                                  values[top])).as_py() for f in files)
    return {"clusters": len(sizes), "largest_cluster": values[top].as_py(),
            "largest_cluster_rows": int(sizes[top]), "largest_cluster_files": int(holding),
            "files": len(file_rows), "largest_file_rows": max(file_rows),
            "smallest_file_rows": min(file_rows)}


# ------------------------------------------------------------------------------ fits

class _ScratchWatch:
    """Polls a scratch directory: when a bucketed copy's staging directory first appears and
    when a new published copy appears (seconds from :meth:`start`; a copy there before is
    ignored)."""

    def __init__(self, scratch: Path, interval: float = 0.2):
        self.scratch, self.interval = scratch, interval
        self.existing = set(os.listdir(scratch)) if scratch.exists() else set()
        self.staging_first_s = self.published_s = None
        self.copy = None
        self._stop = threading.Event()

    def start(self) -> _ScratchWatch:
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            now = time.perf_counter() - self._t0
            try:
                names = os.listdir(self.scratch)
            except FileNotFoundError:
                names = []
            if self.staging_first_s is None and any(
                    n.startswith(".bucketed-") and ".tmp-" in n for n in names):
                self.staging_first_s = now
            published = [n for n in names
                         if n.startswith("bucketed-") and n not in self.existing]
            if published and self.published_s is None:
                self.published_s, self.copy = now, published[0]
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        return {"copy_staging_first_s": self.staging_first_s, "copy_published_s": self.published_s,
                "copy_write_seconds": (self.published_s - self.staging_first_s
                                       if self.published_s is not None
                                       and self.staging_first_s is not None else None),
                "copy_directory": self.copy}


class _OtherCPU:
    """The share of the machine's CPU that processes other than the fit (and this one) used while
    a block runs: busy CPU time of the whole machine (psutil) less the CPU time of the children
    this process waited for meanwhile (the CLI and, through it, its workers: ``fit_cpu_seconds``,
    the fit's own CPU time, which other load hardly changes) and of this process. On this 2-core
    VM other work (a test suite run next to the benchmark) slows a fit down."""

    share = fit_cpu_seconds = float("nan")

    def __enter__(self) -> _OtherCPU:
        self._cpu, self._t = psutil.cpu_times(), time.perf_counter()
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._self = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def __exit__(self, *exc) -> None:
        cpu, wall = psutil.cpu_times(), time.perf_counter() - self._t

        def busy(t):
            return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)

        def used(before, after):
            return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

        self.fit_cpu_seconds = used(self._children, resource.getrusage(resource.RUSAGE_CHILDREN))
        own = self.fit_cpu_seconds + used(self._self, resource.getrusage(resource.RUSAGE_SELF))
        other = max(0.0, busy(cpu) - busy(self._cpu) - own)
        self.share = other / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0


def _end_leftover_workers(metered: dict) -> list[int]:
    """Kill the worker processes of a fit that ``run_metered`` killed at its timeout (it kills
    the CLI process only); returns their pids."""
    ended = []
    for entry in metered["processes"]:
        if entry["kind"] != "worker":
            continue
        try:
            process = psutil.Process(entry["pid"])
            cmdline = " ".join(process.cmdline())
            if "multiprocessing" in cmdline and "spawn_main" in cmdline:
                process.kill()
                ended.append(entry["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ended


def wait_for_idle(max_wait: float, *, threshold: float = 25.0, sample: float = 5.0) -> dict:
    """Wait (at most ``max_wait`` seconds) until the machine's CPU is less than ``threshold``
    percent busy over ``sample`` seconds: other work on these 2 cores would slow the next fit."""
    start = time.perf_counter()
    while True:
        busy = psutil.cpu_percent(interval=sample)
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait:
            return {"idle_wait_seconds": waited, "cpu_busy_percent_before_fit": busy,
                    "idle_before_fit": busy < threshold}


def metered_fit(lake: Path, model: Path, scratch: Path, *, rows: int, iterations: int,
                timeout: float | None, max_idle_wait: float = 0.0) -> dict:
    """One metered CLI fit of ``lake`` with ``--scratch scratch``: :func:`scaling.fit_record`
    plus the scratch directory's copy times, the CPU steal and the leftovers of a timeout."""
    for path in (model, Path(f"{model}.checkpoint.parquet")):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    scratch.mkdir(parents=True, exist_ok=True)
    before = sorted(os.listdir(scratch))
    command = [CLI, "fit", str(lake), "--formula", FORMULA, "--output", str(model),
               "--n-workers", str(N_WORKERS), "--memory-limit", MEMORY_LIMIT,
               "--max-iterations", str(iterations), "--quiet", "--scratch", str(scratch)]
    idle = wait_for_idle(max_idle_wait) if max_idle_wait > 0 else {}
    watch = _ScratchWatch(scratch).start()
    load_before = os.getloadavg()
    with _OtherCPU() as other, StolenCPU() as steal:
        metered = run_metered(command, interval=0.2, timeout=timeout)
    copy = watch.stop()
    record = fit_record(rows, metered, model)
    record.update(copy, **idle, scratch_before=before, scratch_after=sorted(os.listdir(scratch)),
                  cpu_stolen_share=steal.share, other_cpu_share=other.share,
                  fit_cpu_seconds=other.fit_cpu_seconds,
                  load_average_before_fit=load_before, timeout_seconds=timeout,
                  timed_out=bool(timeout and metered["wall_seconds"] >= timeout
                                 and metered["returncode"] != 0),
                  stderr_tail=[line[:_LINE_CHARS] for line in record["stderr_tail"]],
                  stderr_errors=[f"{e['t']:.0f} s: {e['line'][:_LINE_CHARS]}"
                                 for e in metered["stderr"]
                                 if any(w in e["line"].lower() for w in _STDERR_WORDS)][-40:],
                  load_average_after_fit=os.getloadavg())
    if metered["returncode"] != 0:
        record["leftover_workers_killed"] = _end_leftover_workers(metered)
    shutil.rmtree(model, ignore_errors=True)
    return record


def _print(record: dict) -> None:
    print(json.dumps({k: v for k, v in record.items()
                      if k not in ("stderr_tail", "stderr_errors")}, default=float), flush=True)


def _save(path: Path, record: dict) -> None:
    """Write ``record`` now (also a size's partial record after each fit: a benchmark killed
    from outside keeps what it measured, and ``--reuse`` resumes after it)."""
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")


def _partial(path: Path, args, *lakes: Path) -> dict | None:
    """The partial record at ``path`` to resume (``--reuse``, its lakes still there), else None."""
    if not (args.reuse and path.exists()):
        return None
    record = json.loads(path.read_text())
    if record.get("complete", True) or not all(p.exists() for p in lakes):
        return None
    print(f"resuming {path.name} after {', '.join(record.get('fits', {})) or 'its lakes'}",
          flush=True)
    return record


def _fit_cases(record: dict, path: Path, cases, *, model: Path, scratch: Path, args,
               label: str) -> None:
    fits = record.setdefault("fits", {})
    for case, source in cases:
        if case in fits:
            continue
        print(f"{label}: fitting {case}", flush=True)
        fits[case] = metered_fit(source, model, scratch, rows=record["rows"],
                                 iterations=args.iterations, timeout=args.timeout,
                                 max_idle_wait=args.wait_idle)
        _print(fits[case])
        _save(path, record)


def _finish(record: dict, path: Path, args, *lakes: Path) -> dict:
    record.update(complete=True, finished_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    _save(path, record)
    if not args.keep_lakes:
        for lake in lakes:
            shutil.rmtree(lake, ignore_errors=True)
    return record


def run_size(rows: int, args, path: Path) -> dict:
    lake = args.lake_dir / f"layouts_bucketed_{rows}"
    by_day = args.lake_dir / f"layouts_by_day_{rows}"
    scratch = args.lake_dir / f"layouts_scratch_{rows}"
    model = args.lake_dir / f"layouts_model_{rows}"
    record = _partial(path, args, lake, by_day, scratch)
    if record is None:
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"{rows:,} rows: simulating", flush=True)
        record = {"rows": rows, "clusters": rows // 100, "tag": args.tag, "complete": False,
                  "git": _git(), "simulate_seconds": simulate(rows, lake),
                  "bucketed_lake_bytes": lake_bytes(lake)}
        print(f"{rows:,} rows: writing by day", flush=True)
        record["by_day"] = write_by_day(lake, by_day)
        scratch.mkdir(parents=True)
        _save(path, record)
    _fit_cases(record, path, (("bucketed", lake), ("by_day_first", by_day),
                              ("by_day_reused", by_day)),
               model=model, scratch=scratch, args=args, label=f"{rows:,} rows")
    copies = [scratch / n for n in os.listdir(scratch) if n.startswith("bucketed-")]
    if copies:
        record["copy"] = {"bytes": lake_bytes(copies[0]),
                          "files": len(list(copies[0].rglob("*.parquet")))}
    return _finish(record, path, args, lake, by_day, scratch)


def run_skew(rows: int, args, path: Path) -> dict:
    lake = args.lake_dir / f"layouts_bucketed_{rows}"
    skewed = args.lake_dir / f"layouts_skew_by_day_{rows}"
    scratch = args.lake_dir / f"layouts_skew_scratch_{rows}"
    model = args.lake_dir / f"layouts_skew_model_{rows}"
    record = _partial(path, args, skewed, scratch)
    if record is None:
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"skew {rows:,} rows: simulating", flush=True)
        record = {"rows": rows, "clusters": rows // 100, "tag": args.tag, "complete": False,
                  "git": _git(), "simulate_seconds": simulate(rows, lake)}
        print(f"skew {rows:,} rows: writing by day, {args.skew_share:.0%} of rows to "
              f"{SKEW_CLUSTER}", flush=True)
        record["by_day"] = write_by_day(lake, skewed, skew_share=args.skew_share)
        shutil.rmtree(lake, ignore_errors=True)
        record["by_day"]["layout"] = largest_cluster_rows(skewed)
        scratch.mkdir(parents=True)
        _save(path, record)
    _fit_cases(record, path, (("skew_by_day", skewed),), model=model, scratch=scratch,
               args=args, label=f"skew {rows:,} rows")
    copies = [scratch / n for n in os.listdir(scratch) if n.startswith("bucketed-")]
    if copies:
        record["copy"] = largest_cluster_rows(copies[0])
    return _finish(record, path, args, skewed, scratch)


# ------------------------------------------------------------------------------ report

def ratios(record: dict, key: str = "fit_wall_seconds") -> dict:
    """(b) / (a) and (c) / (a) of ``key`` (wall seconds, or the fit's own CPU seconds)."""
    fits = record.get("fits", {})
    base = fits.get("bucketed")
    out = {}
    for case in ("by_day_first", "by_day_reused"):
        ok = (base and case in fits and base["returncode"] == 0 and fits[case]["returncode"] == 0
              and base.get(key) and fits[case].get(key))
        out[case] = fits[case][key] / base[key] if ok else None
    return out


def _latest(records: list[dict]) -> list[dict]:
    """The last finished record of each size: the checks judge the library as it is now, the
    tables keep every run."""
    latest = {}
    for record in sorted(records, key=lambda r: r.get("finished_at") or ""):
        latest[record["rows"]] = record
    return list(latest.values())


def checks(sizes: list[dict], skews: list[dict]) -> dict:
    out = {}
    sizes, skews = _latest(sizes), _latest(skews)
    for case in ("by_day_first", "by_day_reused"):
        values = {_label(r): ratios(r)[case] for r in sizes}
        out[f"{case}_within_target"] = {
            "values": values, "target": f"<= {TARGET_RATIO} x the bucketed lake's wall time",
            "holds": all(v is not None and v <= TARGET_RATIO for v in values.values())
            if values else None}
        out[f"{case}_cpu_ratio"] = {_label(r): ratios(r, "fit_cpu_seconds")[case] for r in sizes}
    all_fits = [f for r in sizes + skews for f in r.get("fits", {}).values()]
    out["no_worker_restarts"] = all(not f["workers_restarted"] for f in all_fits)
    out["all_completed"] = all(f["returncode"] == 0 for f in all_fits)
    out["skew_completed"] = {_label(r): r["fits"]["skew_by_day"]["returncode"] == 0
                             for r in skews if "skew_by_day" in r.get("fits", {})}
    out["partial_records"] = [_label(r) for r in sizes + skews if not r.get("complete", True)]
    return out


def _outcome(fit: dict) -> str:
    if fit["returncode"] == 0:
        return "done"
    if fit.get("timed_out"):
        return f"timed out ({fit['timeout_seconds']:.0f} s)"
    return f"failed (exit {fit['returncode']})"


def _ratio(case: str, ratio: float | None) -> str:
    return _fmt(ratio, 2) if ratio is not None else ("1.00" if case == "bucketed" else "–")


def _label(record: dict) -> str:
    """A record's rows, and its ``--tag`` (a repeated run) when it has one."""
    return f"{record['rows']:,}" + (f" ({record['tag']})" if record.get("tag") else "")


def _fit_row(rows: str, case: str, fit: dict, ratio: float | None,
             cpu_ratio: float | None) -> str:
    peaks = " / ".join(_fmt(v, 0) for v in fit["worker_peak_rss_mb"][:N_WORKERS]) or "–"
    restarts = max(0, fit["n_worker_pids"] - N_WORKERS)
    stolen, other = fit.get("cpu_stolen_share"), fit.get("other_cpu_share")
    return "| " + " | ".join([
        rows, CASE_LABELS[case], _outcome(fit), _fmt(fit["fit_wall_seconds"]),
        _ratio(case, ratio), _fmt(fit.get("fit_cpu_seconds"), 0), _ratio(case, cpu_ratio)
        if fit.get("fit_cpu_seconds") else "–",
        _fmt(fit.get("copy_write_seconds")), _fmt(fit.get("copy_published_s")),
        _fmt(fit.get("em_seconds")), _fmt(fit.get("outside_em_seconds")),
        peaks, str(restarts) if restarts else "none",
        f"{_fmt(100 * stolen, 0) if stolen is not None else '–'} / "
        f"{_fmt(100 * other, 0) if other is not None else '–'}",
        _fmt(fit.get("sigma2"), 3), _fmt(fit.get("var_b"), 2)]) + " |"


HEADER = ["| Rows | Lake | Outcome | Fit wall (s) | / bucketed | Fit CPU (s) | / bucketed "
          "| Copy write (s) "
          "| Copy published at (s) | EM (s) | Outside EM (s) | Peak RSS worker 1 / 2 (MB) "
          "| Worker restarts | CPU stolen / other load (%) | sigma2 | Var(b) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]


def _commits(records: list[dict]) -> str:
    """The library commits the records were measured at ('+ changes': uncommitted edits)."""
    heads = []
    for r in records:
        git = r.get("git") or {}
        head = f"{git.get('head', '?')[:7]}{' + uncommitted changes' if git.get('dirty') else ''}"
        label = f"{head} ({'skew ' if 'skew_by_day' in r.get('fits', {}) else ''}{_label(r)})"
        heads.append(label)
    return ", ".join(heads) or "?"


def _earlier_section(directory: Path) -> list[str]:
    """The table of an earlier library's records kept in ``directory``: size records
    (``<rows>.json``), single fits (``*.jsonl``, one record with its ``case`` a line) and
    ``note.txt``, what differed."""
    records: dict[int, dict] = {}
    for path in sorted(directory.glob("[0-9]*.json")):
        record = json.loads(path.read_text())
        records[record["rows"]] = record
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            fit = json.loads(line)
            records.setdefault(fit["rows"], {"rows": fit["rows"], "fits": {}})["fits"][
                fit["case"]] = fit
    note = directory / "note.txt"
    title = f"## Earlier: {directory.name.replace('_', ' ')} (not counted in the checks above)"
    lines = ["", title, "", note.read_text().strip() if note.exists() else "", "", *HEADER]
    for rows in sorted(records):
        r = records[rows]
        rs, cpu = ratios(r), ratios(r, "fit_cpu_seconds")
        for case in CASES:
            if case in r["fits"]:
                lines.append(_fit_row(f"{rows:,}", case, r["fits"][case], rs.get(case),
                                      cpu.get(case)))
    return lines


def write_report(sizes: list[dict], skews: list[dict], extra: dict) -> None:
    sizes = sorted(sizes, key=lambda r: (r["rows"], r.get("tag") or ""))
    skews = sorted(skews, key=lambda r: (r["rows"], r.get("tag") or ""))
    result = {"sizes": sizes, "skew": skews, **extra, "checks": checks(sizes, skews)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layouts.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    env = extra.get("environment", {})
    md = ["# Foreign layout: a lake partitioned by day against merf-dask's bucketed lake", "",
          f"Machine: {env.get('cpu_count', '?')} cores ({env.get('platform', '?')}), a shared "
          f"VM (CPU stolen by the hypervisor per fit below). `merf-dask fit` through the CLI, "
          f"embedded LocalCluster of {N_WORKERS} workers x 1 thread, memory limit {MEMORY_LIMIT} "
          f"each, `{FORMULA}`, default random forest, `--max-iterations "
          f"{extra.get('iterations', 3)} --quiet --scratch DIR` (DIR empty at the start of each "
          f"size); library at {_commits(sizes + skews)}.", "",
          "*CPU stolen / other load*: the share of the machine's CPU the hypervisor took, and "
          "the share used by processes other than the fit and the benchmark (another "
          "engineer's work on the same 2 cores) during the fit: a fit under other load is "
          "slower for it, which skews the wall-time ratios. *Fit CPU*: the CPU seconds of the "
          "CLI process and its workers (their rusage once reaped), which other load changes "
          "far less than the wall time.", "",
          "* (a) the lake `merf-dask simulate` writes (bucketed by cluster, rows / 100 clusters of "
          "100 rows);",
          f"* (b) the same rows written with pyarrow as a hive dataset partitioned by an int "
          f"column `day` ({N_DAYS} days; day = global row index mod {N_DAYS}, so every cluster "
          f"lies on all {N_DAYS} days; rows permuted within each record batch, fixed seed; no "
          "`bucket` column, no merf-dask metadata), fitted with an empty scratch directory: the "
          "CLI writes the bucketed copy there (`bucketed_copy`) and fits it;",
          "* (c) the by-day lake again with the same scratch: the copy is found again by the "
          "source's fingerprint.",
          "",
          "Fit wall = the whole CLI process (cluster start, footers, copy, EM, save). The CLI "
          "logs nothing about the copy under `--quiet`: *copy write* is the time from the copy's "
          "staging directory appearing in the scratch directory to the published copy appearing "
          "(polled every 0.2 s), *copy published at* the seconds from the fit's start to the "
          "latter. A worker restart = more worker pids than workers (killed for memory).", "",
          *HEADER]
    for r in sizes:
        rs, cpu = ratios(r), ratios(r, "fit_cpu_seconds")
        for case in CASES:
            if case in r.get("fits", {}):
                md.append(_fit_row(_label(r), case, r["fits"][case], rs.get(case),
                                   cpu.get(case)))
    c = result["checks"]
    md.append("")
    for case in ("by_day_first", "by_day_reused"):
        chk = c[f"{case}_within_target"]
        values = ", ".join(f"{k}: {_fmt(v, 2)}" for k, v in chk["values"].items())
        md.append(f"* {CASE_LABELS[case]} / (a) <= {TARGET_RATIO}: "
                  f"{'holds' if chk['holds'] else 'does NOT hold'} ({values}).")
    for r in sizes:
        b = r["by_day"]
        md.append(f"* {_label(r)} rows: simulate {r['simulate_seconds']:.0f} s "
                  f"({r['bucketed_lake_bytes'] / 1e6:,.0f} MB); by-day write "
                  f"{b['write_seconds']:.0f} s ({b['n_files']} files, {b['row_groups']} row "
                  f"groups, {b['bytes'] / 1e6:,.0f} MB)"
                  + (f"; bucketed copy {r['copy']['bytes'] / 1e6:,.0f} MB in "
                     f"{r['copy']['files']} files" if r.get("copy") else "") + ".")
    if skews:
        md += ["", "## Skew: one cluster holds a large share of the rows", "",
               "The simulated lake of that size written by day as above, with a share of the "
               f"rows (drawn at random, fixed seed) relabelled to cluster `{SKEW_CLUSTER}`. `y` "
               "is not simulated again (a relabelled row keeps its own cluster's random "
               "effect): this is a memory test, sigma2 and Var(b) mean nothing here. One fit "
               "by day, empty scratch (the copy is written).", "", *HEADER]
        skews = [r for r in skews if "skew_by_day" in r.get("fits", {})]
        for r in skews:
            md.append(_fit_row(_label(r), "skew_by_day", r["fits"]["skew_by_day"], None, None))
        md.append("")
        for r in skews:
            b, layout = r["by_day"], r["by_day"]["layout"]
            fit = r["fits"]["skew_by_day"]
            line = (f"* {_label(r)} rows: {b['relabelled_rows']:,} rows relabelled "
                    f"({b['skew_share']:.0%}); `{layout['largest_cluster']}` holds "
                    f"{layout['largest_cluster_rows']:,} rows "
                    f"({layout['largest_cluster_rows'] / r['rows']:.1%}) of {layout['clusters']:,} "
                    f"clusters; by-day write {b['write_seconds']:.0f} s")
            if r.get("copy"):
                line += (f"; in the bucketed copy `{r['copy']['largest_cluster']}` "
                         f"({r['copy']['largest_cluster_rows']:,} rows) lies in "
                         f"{r['copy']['largest_cluster_files']} of its {r['copy']['files']} "
                         f"files, its largest file holds "
                         f"{r['copy']['largest_file_rows']:,} rows (smallest "
                         f"{r['copy']['smallest_file_rows']:,})")
            else:
                line += "; no bucketed copy was published"
            md.append(line + f"; outcome: {_outcome(fit)}.")
            if fit["returncode"] != 0:
                tail = [x for x in fit["stderr_tail"] if x.strip()][-3:]
                md.append("  Last stderr lines: " + " / ".join(f"`{x.strip()[:200]}`"
                                                               for x in tail))
    earlier = RUNS / "p2p_shuffle"
    if earlier.is_dir():
        md += _earlier_section(earlier)
    md += ["", f"No worker restarted: {c['no_worker_restarts']}; all fits completed: "
           f"{c['all_completed']}."]
    if c["partial_records"]:
        md.append(f"Partial records (not every fit run yet): {c['partial_records']}.")
    (RESULTS / "layouts.md").write_text("\n".join(md) + "\n")


# ------------------------------------------------------------------------------ main

def _git() -> dict:
    def out(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout
    status = out("status", "--short", "--", "merf_dask").splitlines()
    return {"head": out("rev-parse", "HEAD").strip(), "dirty": bool(status),
            "library_changes": status}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000_000, 20_000_000])
    parser.add_argument("--skew-rows", type=int, default=5_000_000,
                        help="rows of the skew case (0: none)")
    parser.add_argument("--skew-share", type=float, default=0.4)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--lake-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="per fit, seconds")
    parser.add_argument("--wait-idle", type=float, default=120.0,
                        help="before each fit, wait at most this many seconds for the CPU to be "
                             "less than 25%% busy (0: do not wait)")
    parser.add_argument("--tag", help="a repeated run: its records are <rows>-TAG.json and the "
                        "report shows them next to the others")
    parser.add_argument("--reuse", action="store_true",
                        help="skip sizes whose layouts_runs/ record exists")
    parser.add_argument("--keep-lakes", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    extra_path = RUNS / "extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    if not args.report_only:
        extra.update(iterations=args.iterations, timeout_seconds=args.timeout, git=_git(),
                     environment={"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                  "memory_gb": psutil.virtual_memory().total / 1e9,
                                  "load_average_start": os.getloadavg()})
        extra_path.write_text(json.dumps(extra, indent=1, default=float) + "\n")
        suffix = f"-{args.tag}" if args.tag else ""
        jobs = [(RUNS / f"{rows}{suffix}.json", run_size, rows) for rows in args.rows]
        if args.skew_rows:
            jobs.append((RUNS / f"skew-{args.skew_rows}{suffix}.json", run_skew, args.skew_rows))
        for path, job, rows in jobs:
            if args.reuse and path.exists() and json.loads(path.read_text()).get("complete",
                                                                                  True):
                continue
            job(rows, args, path)
        extra["environment"]["load_average_end"] = os.getloadavg()
        extra_path.write_text(json.dumps(extra, indent=1, default=float) + "\n")
    sizes = [json.loads(p.read_text()) for p in RUNS.glob("[0-9]*.json")]
    skews = [json.loads(p.read_text()) for p in RUNS.glob("skew-*.json")]
    write_report(sizes, skews, extra)


if __name__ == "__main__":
    main()
