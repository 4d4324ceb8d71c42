"""MERF's EM over partitions on Dask workers, never all held at once.

The partitions hold whole levels of the first grouping factor (the partition factor). Each
becomes a :class:`merf_dask.core.em.PartitionArrays` (numpy arrays in key order) on a worker.
When those arrays take at most ``CACHE_SHARE`` of the workers' memory limits together, they are
made once and kept in worker memory; otherwise every pass makes them again from the partition's
source (a lake's Parquet file, or a scattered pandas frame) inside the task that uses them, so a
fit needs worker memory for a few partitions and the model, not for the data: a lake larger than
the cluster's memory fits. Both give the same model. What stays between passes on the driver is
small: the b of every partition's local levels, the crossed factors' b tables and the plan of
the M-step. Every task is a pure function of its inputs, so a lost worker's tasks (and kept
arrays) are recomputed elsewhere with the same result, and the driver can checkpoint the loop
after any iteration.

One EM iteration is two or three passes over the partitions:

1. M-step -- each partition cuts out the rows of each member's residue class with the working
   response y - sum_k Z_k b_k (:func:`merf_dask.core.em.m_step_pieces`); the members of a class
   are fitted in a task that gathers that class's pieces (from one partition when the bucket
   count divides the plan's stride, see :mod:`merf_dask.core.ensemble`); the fits go before the
   cutting of more partitions, and a partition's pieces are let go once its classes are cut
   out, so the workers hold a few partitions' pieces at a time, not the data;
2. E-step -- each partition predicts its rows with the members that did not train on them and
   eliminates its local random effects (:func:`merf_dask.core.em.e_step_local`); a partition's
   task is sent only the members that serve its residue classes
   (:meth:`merf_dask.core.ensemble.MemberPlan.members_serving`), so worker memory holds a few
   dozen members, not the model. With crossed factors, their shares are tree-reduced and solved
   on the driver, and a second pass finishes every partition
   (:func:`merf_dask.core.em.e_step_finish`); without, both run in one task. b comes back to
   the driver, the partial sums are tree-reduced on the workers. An accelerated iteration
   evaluates two or three more E-steps from the residuals kept on the workers.

A binary or count fit's E-step is one task per partition with local factors
(:func:`merf_dask.core.em.laplace_e_step`); with crossed factors, every Newton step is a few
passes whose states stay on the workers (:meth:`DaskEMData.laplace_pass`) while the driver solves
the crossed effects (:mod:`merf_dask.core.laplace_crossed`).

Classes and functions
---------------------
DaskEMData
    The :class:`merf_dask.core.em.EMData` implementation over a list of partition sources.
fits_in_memory
    Whether arrays of a given size are kept in worker memory.
The rest are the small functions that run on the workers.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import typing

import dask
import distributed
import numpy as np
import pandas as pd
from sklearn.base import clone

from ..core.em import (MAX_CLUSTER_ROWS, EffectsLayout, PartitionArrays, add_limbs, canonical,
                       align_random_effects, begin_crossed_laplace, crossed_products,
                       crossed_schur, e_step_again, e_step_finish, e_step_local,
                       laplace_e_step, laplace_pieces, layout_of,
                       m_step_pieces, nested_in_partition_factor, refuse_crossed_family,
                       spread_clusters, spread_factor_levels, spread_part)
from ..core.random_effects import CrossedShare, combine_sums
from ..core.ensemble import MemberPlan, StagePredictions, advance_stages, assemble_model, \
    fit_members, restaged

__all__ = ["DaskEMData", "fits_in_memory", "CACHE_SHARE"]

#: Partial sums are added in groups of this many futures per task (the tree reduction's fan-in).
_REDUCE_FAN_IN = 8
#: Priority of the M-step's fits over the cutting of further pieces (Dask's default is 0).
_FIT_PRIORITY = 1
#: Member chunks gathered to the driver per round trip when the model is assembled.
_GATHER_CHUNKS = 8
#: The partitions' arrays are kept in worker memory when they take at most this share of the
#: workers' memory limits together (see :func:`fits_in_memory`).
CACHE_SHARE = 0.1

logger = logging.getLogger("merf_dask")


def _partition_arrays(frame: pd.DataFrame, *, columns: dict) -> PartitionArrays:
    return PartitionArrays.from_frame(frame, **columns)


class _PartitionLayout(typing.NamedTuple):
    """What the driver learns of a partition before the fit (:func:`_layout`)."""

    levels: list  # of every factor, in the order of ``part.codes``
    nested: list  # per factor, whether its levels lie inside levels of the partition factor
    hashes: np.ndarray  # of its clusters
    cluster_rows: np.ndarray  # rows of each cluster
    n_bytes: int  # of its arrays
    y_sum: float
    y_summary: np.ndarray | None  # what the family checks (binary and count fits)


def _layout(part: PartitionArrays, family) -> _PartitionLayout:
    return _PartitionLayout(
        levels=list(part.levels), nested=nested_in_partition_factor(part), hashes=part.hashes,
        cluster_rows=np.bincount(part.codes[0], minlength=len(part.levels[0])),
        n_bytes=part.nbytes, y_sum=float(part.y.sum()),
        y_summary=None if family is None else family.response_summary(part.y))


def _cluster_rows(levels: list, rows: list) -> tuple[pd.Series, pd.Index]:
    """Rows of every cluster over all partitions, and the clusters found in more than one."""
    ids = levels[0].append(levels[1:])
    per_partition = pd.Series(np.concatenate(rows), index=ids)
    total = per_partition.groupby(level=0, sort=False).sum()
    return total, ids[ids.duplicated()].unique()


def _class_piece(pieces: dict, residue: int):
    """A partition's piece of one residue class; None when it has no row there (a partition
    holding rows of spread clusters is asked for every class)."""
    return pieces.get(residue)


def _one_thread_per_member(plan: MemberPlan) -> MemberPlan:
    """The plan with a learner that uses one thread, like every task on a Dask worker.

    A worker runs one task per thread, and its nanny sets OMP_NUM_THREADS=1 for the same reason;
    LightGBM's ``n_jobs=None`` means every physical core, which oversubscribed a 2-core machine
    three times over (two workers, three busy threads each).
    """
    if plan.learner.get_params(deep=False).get("n_jobs", 1) == 1:
        return plan
    return dataclasses.replace(plan, learner=clone(plan.learner).set_params(n_jobs=1))


def _m_step_pieces(part: PartitionArrays, local_b: list, crossed_b: dict, layout: EffectsLayout,
                   plan: MemberPlan, staged: StagePredictions | None):
    return m_step_pieces(part, layout.effects_at(part, local_b, crossed_b), plan, staged=staged)


def _honest_source(chunks):
    """The members in ``chunks`` (lists of (member index, fitted member)), or the partition's
    StagePredictions passed instead for warm-started members; None stays None."""
    if chunks is None or isinstance(chunks, StagePredictions):
        return chunks
    return [member for chunk in chunks for member in chunk]


def _advance_stages(part: PartitionArrays, chunks, previous, *, plan):
    return advance_stages(plan, _honest_source(chunks), X=part.X, keys=part.keys,
                          residue_of_row=part.residues(plan), previous=previous)


def _restaged(part: PartitionArrays, chunks, *, plan):
    return restaged(plan, _honest_source(chunks), X=part.X, keys=part.keys,
                    residue_of_row=part.residues(plan))


def _e_step_local(part: PartitionArrays, chunks, *, plan, layout, relative):
    return e_step_local(part, plan, _honest_source(chunks), layout=layout, relative=relative)


def _e_step_again(part: PartitionArrays, step_and_share, *, layout, relative):
    return e_step_again(step_and_share[0], part, layout=layout, relative=relative)


def _e_step_finish(part: PartitionArrays, step_and_share, *, layout, relative, sigma2, solution):
    return e_step_finish(step_and_share[0], part, layout=layout, relative=relative,
                         sigma2=sigma2, solution=solution)


def _crossed_products(step_and_share, X, *, term_bound):
    return crossed_products(step_and_share[0], X, term_bound=term_bound)


def _crossed_schur(step_and_share, P, *, term_bound):
    return crossed_schur(step_and_share[0], P, term_bound=term_bound)


def _laplace_pieces(part: PartitionArrays, previous, staged, *, plan, family, mean):
    return laplace_pieces(part, plan, None if previous is None else previous[3], family=family,
                          mean=mean, staged=staged)


def _laplace_e_step(part: PartitionArrays, chunks, previous, *, plan, relative, family):
    """(b, b_cov, sums, step): the order of :func:`_e_step_finish`'s results, then the step."""
    step, b, b_cov, sums = laplace_e_step(part, plan, _honest_source(chunks), relative=relative,
                                          family=family,
                                          previous=None if previous is None else previous[3])
    return b, b_cov, sums, step


def _begin_crossed_laplace(part: PartitionArrays, chunks, previous, *, plan, layout):
    return begin_crossed_laplace(part, plan, _honest_source(chunks), layout=layout,
                                 previous=None if previous is None else previous[3])


def _laplace_pass(part: PartitionArrays, state, *, block_pass, **shared):
    """A crossed Laplace E-step's pass over a partition (:mod:`merf_dask.core.laplace_crossed`):
    (state, partial), or the last pass's (b, b_cov, sums, step) in the order of
    :func:`_laplace_e_step`'s results."""
    return block_pass(part, state, **shared)


def _e_step_whole(part: PartitionArrays, chunks, *, plan, layout, relative, sigma2):
    """Both passes in one task when nothing waits between them (no crossed factor, no
    acceleration)."""
    step, _ = _e_step_local(part, chunks, plan=plan, layout=layout, relative=relative)
    return e_step_finish(step, part, layout=layout, relative=relative, sigma2=sigma2)


def _add_shares(*shares: CrossedShare) -> CrossedShare:
    total = shares[0]
    for share in shares[1:]:
        total = total + share
    return total


def _tree_reduce(client, futures: list, combine):
    while len(futures) > 1:
        futures = [client.submit(combine, *futures[i:i + _REDUCE_FAN_IN], pure=False)
                   for i in range(0, len(futures), _REDUCE_FAN_IN)]
    return futures[0]


def fits_in_memory(n_bytes: int, memory_limits: list[int]) -> bool:
    """Whether partition arrays of ``n_bytes`` in all are kept in the memory of workers with
    these memory limits (0 is no limit, which tells nothing about the memory there is).

    The fit needs the rest: a worker holds pieces of the M-step (about half the arrays' size in
    flight), a few dozen members, and its own baseline of a few hundred MB.
    """
    return bool(memory_limits) and all(memory_limits) and n_bytes <= CACHE_SHARE * sum(
        memory_limits)


class DaskEMData:
    """Partitions holding whole levels of the partition factor on Dask workers: kept in worker
    memory when they fit, read again on every pass otherwise.

    Parameters
    ----------
    client : distributed.Client
    partitions : list of Delayed or Future
        Sources of pandas DataFrames, each holding whole levels of the first factor (a lake's
        ``to_delayed()``, or scattered frames).
    x_columns : list of str
    z_columns : list of list of str
        Every factor's Z columns.
    factors : list of RandomFactor
    factor_columns : list of str
        Every factor's column of level labels.
    y_column : str
    max_cluster_rows : int
        Clusters with more rows, and clusters found in more than one partition, are spread
        (:func:`merf_dask.core.em.spread_part`).
    family : Family or None
        A binary or count fit's family (crossed factors solved densely only); None is
        Gaussian.
    cache : bool or None, default=None
        Keep every partition's arrays in worker memory between passes; None decides with
        :func:`fits_in_memory`.

    Attributes
    ----------
    cached : bool
        Whether the partitions' arrays are kept in worker memory.
    layout : EffectsLayout
    """

    def __init__(self, *, client, partitions, x_columns, z_columns, factors, factor_columns,
                 y_column, max_cluster_rows=MAX_CLUSTER_ROWS, family=None, cache=None):
        self.client = client
        self.partitions = list(partitions)  # scattered or persisted sources stay alive
        columns = dict(x_columns=list(x_columns), z_columns=[list(c) for c in z_columns],
                       factor_columns=list(factor_columns), y_column=y_column)
        self.sources = [dask.delayed(_partition_arrays)(source, columns=columns)
                        for source in self.partitions]
        layouts = client.gather(client.compute(
            [dask.delayed(_layout)(source, family) for source in self.sources]))
        levels = [p.levels for p in layouts]
        layout = layout_of(factors, levels, [p.nested for p in layouts])
        cluster_rows, spanning = _cluster_rows([ids[0] for ids in levels],
                                               [p.cluster_rows for p in layouts])
        # a cluster in several partitions is spread whatever its size (a lake written with a
        # lower max_cluster_rows): exact all the same, never two clusters of one name
        self.layout = layout.with_spread(spread_clusters(
            cluster_rows, max_cluster_rows=max_cluster_rows).union(spanning))
        self.spread = [None] * len(levels)
        if self.layout is not layout:
            spread_levels = self.layout.spread_levels
            self.sources = [dask.delayed(spread_part)(source, spread_levels)
                            for source in self.sources]
            spread = [spread_factor_levels(ids[0], spread_levels) for ids in levels]
            self.spread = [rows for rows, _ in spread]
            levels = [[*ids, spread_ids] for ids, (_, spread_ids) in zip(levels, spread)]
        self.levels = levels
        self.hashes = [p.hashes for p in layouts]
        self.n_rows = int(cluster_rows.sum())
        n_bytes = sum(p.n_bytes for p in layouts)
        # rounded like the variance components, so the first working response is the same on
        # any partitioning
        self.family = family
        self.mean = canonical(sum(p.y_sum for p in layouts) / self.n_rows)
        if family is not None:
            family.check_response(np.concatenate([p.y_summary for p in layouts]))
            refuse_crossed_family(family, self.layout)
        if cache is None:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            cache = fits_in_memory(n_bytes, [w.get("memory_limit") or 0 for w in workers])
        self.cached = cache
        if cache:
            logger.debug("keeping the partitions in worker memory (%.0f MB)", n_bytes / 1e6)
            self.sources = client.compute(self.sources)
        self.n_clusters = len(cluster_rows)
        self.cluster_hashes = np.unique(np.concatenate(self.hashes))
        self.n_features = len(x_columns)
        self.b = [[None if table is not None else np.zeros((len(ids), f.q))
                   for f, ids, table in zip(self.layout.factors, levels,
                                            self.layout.crossed_levels)]
                  for levels in self.levels]
        self.b_cov = []  # futures of every partition's Var(b | y) after an E-step
        self.plan = self.chunks = self.chunk_members = self.results = None
        self.staged = [None] * len(self.sources)  # warm-started members' stage sums
        self.laplace = None  # a binary or count fit's last E-step, per partition
        self.newton = self.crossed_mode = None  # its Newton states with crossed factors
        self.finished = False

    def _n_threads(self) -> int:
        return sum(self.client.nthreads().values())

    def fit_fixed_effects(self, plan, crossed_b):
        self.results = None  # the last E-step's residuals are not needed any more: let them go
        chunks, chunk_members = self._submit_fits(plan, crossed_b)
        # the E-step tasks need most members, so waiting here costs little and makes the
        # logged M-step and E-step times mean what they say
        distributed.wait(chunks)
        self.plan, self.chunks, self.chunk_members = plan, chunks, chunk_members
        if plan.rounds_per_step:
            self.staged = self._each_partition(_advance_stages, self._stage_chunks(),
                                               self.staged, plan=plan)

    def _stage_chunks(self) -> list:
        """Every partition's chunks of the members its stage sums need: those serving its
        classes and its classes' own."""
        return [self._serving_chunks(residues, own=True) for residues in self._residues(self.plan)]

    def resume_members(self, plan, members):
        by_residue: dict[int, list] = {}
        for member, estimator in members:
            by_residue.setdefault(int(plan.residues[member]), []).append((member, estimator))
        groups = list(by_residue.values())
        self.plan = plan
        self.chunks = self.client.scatter(groups)
        self.chunk_members = [np.array([member for member, _ in group]) for group in groups]
        self.staged = self._each_partition(_restaged, self._stage_chunks(), plan=plan)

    def _submit_fits(self, plan, crossed_b) -> tuple[list, list]:
        """Futures of the member chunks of the M-step, and the members of each chunk.

        No future of a partition's pieces outlives this call, so the workers let them go as
        soon as their classes are cut out, and the cutting and the fits run before the next
        partition's pieces (a higher priority): the M-step holds a few partitions' pieces at a
        time, however many partitions there are.
        """
        client = self.client
        if self.family is not None:
            previous = self.laplace or [None] * len(self.sources)
            pieces = self._each_partition(_laplace_pieces, previous, self.staged, plan=plan,
                                          family=self.family, mean=self.mean)
        else:
            crossed_b = client.scatter(crossed_b, broadcast=True) if crossed_b else {}
            pieces = client.compute([
                dask.delayed(_m_step_pieces, pure=False)(source, b, crossed_b, self.layout, plan,
                                                         staged)
                for source, b, staged in zip(self.sources, self.b, self.staged)])
        worker_plan = _one_thread_per_member(plan)  # once here, not in every fit task
        holders: dict[int, list[int]] = {}
        for p, residues in enumerate(self._residues(plan)):
            for residue in residues:
                holders.setdefault(int(residue), []).append(p)
        chunks, chunk_members = [], []
        for residue, members in plan.chunks(self._n_threads()):
            if residue not in holders:
                continue  # no cluster falls in this class: its members are not grown
            class_pieces = [client.submit(_class_piece, pieces[p], residue, pure=False,
                                          priority=_FIT_PRIORITY)
                            for p in holders[residue]]
            chunks.append(client.submit(fit_members, worker_plan, members, *class_pieces,
                                        previous=self._previous_chunks(plan, members),
                                        pure=False, priority=_FIT_PRIORITY))
            chunk_members.append(members)
        return chunks, chunk_members

    def _previous_chunks(self, plan, members: np.ndarray) -> list:
        """The last M-step's chunks holding any of ``members``, which warm-started members go
        on boosting from (none for other learners)."""
        if not plan.rounds_per_step or self.chunks is None:
            return []
        return self._chunks_holding(members)

    def _chunks_holding(self, members: np.ndarray) -> list:
        """The member chunks that hold any of ``members``."""
        return [chunk for chunk, held in zip(self.chunks, self.chunk_members)
                if np.isin(held, members).any()]

    def _residues(self, plan) -> list[np.ndarray]:
        """The residue classes of each partition's rows: its clusters', and every class where
        it holds rows of spread clusters."""
        return [np.unique(plan.residues) if spread is not None and spread.any()
                else np.unique(plan.residue_of(hashes))
                for hashes, spread in zip(self.hashes, self.spread)]

    def _serving_chunks(self, residues: np.ndarray, *, own: bool = False) -> list:
        """The member chunks that a partition holding ``residues`` classes predicts with (and
        with ``own``, those of its classes' own members too)."""
        serving = self.plan.members_serving(residues)
        if own:
            serving = np.union1d(serving, np.flatnonzero(np.isin(self.plan.residues, residues)))
        return self._chunks_holding(serving)

    def _honest_inputs(self) -> list:
        """What every partition's E-step predicts f with: its serving chunks, or its stage
        sums when the members are warm-started."""
        if self.plan.rounds_per_step:
            return self.staged
        return [self._serving_chunks(residues) for residues in self._residues(self.plan)]

    def _each_partition(self, task, *per_partition, **shared) -> list:
        """Futures of ``task(source, *per_partition[i], **shared)`` for every partition, the
        sources kept in worker memory or streamed alike."""
        return self.client.compute([
            dask.delayed(task, pure=False)(source, *args, **shared)
            for source, *args in zip(self.sources, *per_partition)])

    def local_step(self, *, relative, sigma2, again=False, keep=False):
        client = self.client
        crossed = any(table is not None for table in self.layout.crossed_levels)
        chunks = self._honest_inputs()
        if again:  # the residuals stay on the workers, in the first pass's results
            self.results = self._each_partition(_e_step_again, self.results, layout=self.layout,
                                                relative=relative)
        elif crossed or keep:
            self.results = self._each_partition(_e_step_local, chunks, plan=self.plan,
                                                layout=self.layout, relative=relative)
        else:  # both passes in one task: nothing is kept between them
            self.results = self._each_partition(_e_step_whole, chunks, plan=self.plan,
                                                layout=self.layout, relative=relative,
                                                sigma2=sigma2)
            self.finished = True
            return None
        self.finished = False
        if not crossed:
            return None
        shares = [client.submit(operator.itemgetter(1), r) for r in self.results]
        return _tree_reduce(client, shares, _add_shares).result()

    def laplace_step(self, *, relative, again=False):
        previous = self.laplace or [None] * len(self.sources)
        chunks = [None] * len(self.sources) if again else self._honest_inputs()
        self.laplace = self._each_partition(_laplace_e_step, chunks, previous, plan=self.plan,
                                            relative=relative, family=self.family)
        return self._collect_effects(self.laplace)

    def laplace_begin(self, *, again=False):
        previous = self.laplace or [None] * len(self.sources)
        chunks = [None] * len(self.sources) if again else self._honest_inputs()
        self.newton = self._each_partition(_begin_crossed_laplace, chunks, previous,
                                           plan=self.plan, layout=self.layout)

    def _broadcast(self, shared: dict) -> dict:
        """``shared`` with its crossed solution (S^-1 is up to 72 MB) sent to every worker
        once rather than with every task."""
        if "solution" not in shared:
            return shared
        return {**shared, "solution": self.client.scatter(shared["solution"], broadcast=True)}

    def laplace_pass(self, task, combine, **shared):
        client = self.client
        results = self._each_partition(_laplace_pass, self.newton, block_pass=task,
                                       **self._broadcast(shared))
        self.newton = [client.submit(operator.itemgetter(0), r) for r in results]
        partials = [client.submit(operator.itemgetter(1), r) for r in results]
        return _tree_reduce(client, partials, combine).result()

    def laplace_finish(self, task, **shared):
        self.laplace = self._each_partition(_laplace_pass, self.newton, block_pass=task,
                                            **self._broadcast(shared))
        self.newton = None
        return self._collect_effects(self.laplace)

    def crossed_schur(self, *, term_bound):
        P = int(self.layout.offsets[-1])
        shares = [self.client.submit(_crossed_schur, result, P, term_bound=term_bound,
                                     pure=False) for result in self.results]
        return _tree_reduce(self.client, shares, add_limbs).result()

    def crossed_product(self, X, *, term_bound):
        client = self.client
        X = client.scatter(X, broadcast=True)
        products = [client.submit(_crossed_products, result, X, term_bound=term_bound,
                                  pure=False) for result in self.results]
        return _tree_reduce(client, products, add_limbs).result()

    def finish_step(self, *, relative, sigma2, solution):
        client = self.client
        results = self.results
        if not self.finished:
            if solution is not None:
                solution = client.scatter(solution, broadcast=True)
            results = self._each_partition(_e_step_finish, results, layout=self.layout,
                                           relative=relative, sigma2=sigma2, solution=solution)
        return self._collect_effects(results)

    def _collect_effects(self, results):
        """Keep the partitions' b (on the driver) and Var(b | y) (futures) of E-step results
        (b, b_cov, sums, ...), and return their sums, tree-reduced on the workers."""
        client = self.client
        sums = _tree_reduce(client, [client.submit(operator.itemgetter(2), r) for r in results],
                            combine_sums)
        self.b = client.gather([client.submit(operator.itemgetter(0), r) for r in results])
        self.b_cov = [client.submit(operator.itemgetter(1), r) for r in results]
        return sums.result()

    def fitted_members(self):
        # a few chunks at a time: a worker serialises what is asked of it at once, and all of
        # its members together could push it past its memory limit
        return [member for start in range(0, len(self.chunks), _GATHER_CHUNKS)
                for chunk in self.client.gather(self.chunks[start:start + _GATHER_CHUNKS])
                for member in chunk]

    def fixed_effects_model(self):
        fitted = self.fitted_members()
        n_jobs = self.plan.learner.get_params(deep=False).get("n_jobs")
        for _, estimator in fitted:  # the fitted model predicts with the threads asked for
            if "n_jobs" in estimator.get_params(deep=False):
                estimator.set_params(n_jobs=n_jobs)
        return assemble_model(self.plan, fitted, self.n_features)

    def local_effects(self):
        b_cov = self.client.gather(self.b_cov)
        effects = []
        for k, table in enumerate(self.layout.crossed_levels):
            if table is not None:
                effects.append(None)
                continue
            levels = [part_levels[k] for part_levels in self.levels]
            effects.append((levels[0].append(levels[1:]),
                            np.concatenate([b[k] for b in self.b]),
                            np.concatenate([cov[k] for cov in b_cov])))
        return effects

    def set_local_effects(self, effects):
        self.b = [[None if b is None else align_random_effects(ids, saved[0], saved[1])
                   for ids, b, saved in zip(levels, part_b, effects)]
                  for levels, part_b in zip(self.levels, self.b)]
