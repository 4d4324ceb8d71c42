"""MERF's EM over cluster-whole partitions streamed by Dask workers, never all held at once.

Every pass reads each partition from its source (a lake's Parquet file, or a scattered pandas
frame) inside the task that uses it, so a fit needs worker memory for a few partitions and the
model, not for the data: a lake larger than the cluster's memory fits. What stays between
passes is small and lives on the driver: the b_i of every partition's clusters (q floats per
cluster) and the plan of the M-step. That also makes every task a pure function of its inputs,
so a lost worker's tasks are recomputed elsewhere with the same result, and the driver can
checkpoint the loop after any iteration.

One EM iteration is two passes over the partitions:

1. M-step -- each partition cuts out the rows of each member's residue class with the working
   response y - Z b (:func:`merf_dask.em.m_step_pieces`); the members of a class are fitted in a
   task that gathers that class's pieces (from one partition when the bucket count divides the
   plan's stride, see :mod:`merf_dask.ensemble`);
2. E-step -- each partition predicts its rows with the members that did not train on them and
   runs the E-step (:func:`merf_dask.em.e_step`); a partition's task is sent only the members
   that serve its residue classes (:meth:`merf_dask.ensemble.MemberPlan.members_serving`), so
   worker memory holds a few dozen members, not the model. b comes back to the driver, the
   partial sums are tree-reduced on the workers.

Classes and functions
---------------------
DaskEMData
    The :class:`merf_dask.em.EMData` implementation over a list of partition sources.
The rest are the small functions that run on the workers.
"""

from __future__ import annotations

import dataclasses
import operator

import dask
import distributed
import numpy as np
import pandas as pd
from sklearn.base import clone

from ._core import EMSums
from .em import PartitionArrays, align_random_effects, e_step, m_step_pieces
from .ensemble import MemberPlan, assemble_model, fit_members
from .partitioning import cluster_hashes

__all__ = ["DaskEMData"]

#: Partial sums are added in groups of this many futures per task (the tree reduction's fan-in).
_REDUCE_FAN_IN = 8


def _layout(frame: pd.DataFrame, *, cluster_column: str) -> tuple[pd.Index, np.ndarray, int]:
    """A partition's clusters (in the order :class:`PartitionArrays` numbers them), their
    hashes and its row count."""
    _, cluster_ids = pd.factorize(frame[cluster_column], sort=False)
    return pd.Index(cluster_ids), cluster_hashes(cluster_ids), len(frame)


def _pieces(frame: pd.DataFrame, b: np.ndarray, plan, *, columns: dict) -> dict:
    return m_step_pieces(PartitionArrays.from_frame(frame, **columns), b, plan)


def _one_thread_per_member(plan: MemberPlan) -> MemberPlan:
    """The plan with a learner that uses one thread, like every task on a Dask worker.

    A worker runs one task per thread, and its nanny sets OMP_NUM_THREADS=1 for the same reason;
    LightGBM's ``n_jobs=None`` means every physical core, which oversubscribed a 2-core machine
    three times over (two workers, three busy threads each).
    """
    if plan.learner.get_params(deep=False).get("n_jobs", 1) == 1:
        return plan
    return dataclasses.replace(plan, learner=clone(plan.learner).set_params(n_jobs=1))


def _e_step(frame: pd.DataFrame, plan, sigma2: float, D: np.ndarray, *chunks, columns: dict
            ) -> tuple[np.ndarray, np.ndarray, EMSums]:
    fitted = [member for chunk in chunks for member in chunk]
    return e_step(PartitionArrays.from_frame(frame, **columns), plan, fitted, sigma2=sigma2, D=D)


def _add_sums(*sums: EMSums) -> EMSums:
    total = sums[0]
    for s in sums[1:]:
        total = total + s
    return total


def _tree_reduce(client, futures: list, combine):
    while len(futures) > 1:
        futures = [client.submit(combine, *futures[i:i + _REDUCE_FAN_IN], pure=False)
                   for i in range(0, len(futures), _REDUCE_FAN_IN)]
    return futures[0]


class DaskEMData:
    """Cluster-whole partitions read by the workers on every pass.

    Parameters
    ----------
    client : distributed.Client
    partitions : list of Delayed or Future
        Sources of pandas DataFrames, each holding whole clusters. Delayed sources (a lake's
        ``to_delayed()``) are recomputed on every pass; futures stay in worker memory.
    x_columns, z_columns : list of str
    cluster_column, y_column : str
    """

    def __init__(self, *, client, partitions, x_columns, z_columns, cluster_column, y_column):
        self.client = client
        self.sources = list(partitions)
        self.columns = dict(x_columns=list(x_columns), z_columns=list(z_columns),
                            cluster_column=cluster_column, y_column=y_column)
        layouts = client.gather(client.compute(
            [dask.delayed(_layout)(source, cluster_column=cluster_column)
             for source in self.sources]))
        self.cluster_ids = [ids for ids, _, _ in layouts]
        self.hashes = [hashes for _, hashes, _ in layouts]
        self.n_rows = int(sum(n for _, _, n in layouts))
        self.n_clusters = sum(len(ids) for ids in self.cluster_ids)
        self.n_features = len(x_columns)
        q = len(z_columns)
        self.b = [np.zeros((len(ids), q)) for ids in self.cluster_ids]
        self.b_cov = [np.zeros((len(ids), q, q)) for ids in self.cluster_ids]  # futures later
        self.plan = self.chunks = self.chunk_members = None

    def _n_threads(self) -> int:
        return sum(self.client.nthreads().values())

    def fit_fixed_effects(self, plan):
        client = self.client
        pieces = client.compute([
            dask.delayed(_pieces, pure=False)(source, b, plan, columns=self.columns)
            for source, b in zip(self.sources, self.b)])
        worker_plan = _one_thread_per_member(plan)  # once here, not in every fit task
        holders: dict[int, list[int]] = {}
        for p, residues in enumerate(self._residues(plan)):
            for residue in residues:
                holders.setdefault(int(residue), []).append(p)
        chunks, chunk_members = [], []
        for residue, members in plan.chunks(self._n_threads()):
            if residue not in holders:
                continue  # no cluster falls in this class: its members are not grown
            class_pieces = [client.submit(operator.getitem, pieces[p], residue, pure=False)
                            for p in holders[residue]]
            chunks.append(client.submit(fit_members, worker_plan, members, *class_pieces,
                                        pure=False))
            chunk_members.append(members)
        # the E-step tasks need most members, so waiting here costs little and makes the
        # logged M-step and E-step times mean what they say
        distributed.wait(chunks)
        self.plan, self.chunks, self.chunk_members = plan, chunks, chunk_members

    def _residues(self, plan) -> list[np.ndarray]:
        """The residue classes of each partition's clusters."""
        return [np.unique(hashes % np.uint64(plan.stride)) for hashes in self.hashes]

    def _serving_chunks(self, residues: np.ndarray) -> list:
        """The member chunks that a partition holding ``residues`` classes predicts with."""
        serving = self.plan.members_serving(residues)
        return [chunk for chunk, members in zip(self.chunks, self.chunk_members)
                if np.isin(members, serving).any()]

    def random_effects_step(self, *, sigma2, D):
        client = self.client
        results = client.compute([
            dask.delayed(_e_step, pure=False)(source, self.plan, sigma2, D,
                                              *self._serving_chunks(residues),
                                              columns=self.columns)
            for source, residues in zip(self.sources, self._residues(self.plan))])
        sums = _tree_reduce(client, [client.submit(operator.itemgetter(2), r) for r in results],
                            _add_sums)
        self.b = client.gather([client.submit(operator.itemgetter(0), r) for r in results])
        self.b_cov = [client.submit(operator.itemgetter(1), r) for r in results]
        return sums.result()

    def fixed_effects_model(self):
        fitted = [member for chunk in self.client.gather(self.chunks) for member in chunk]
        n_jobs = self.plan.learner.get_params(deep=False).get("n_jobs")
        for _, estimator in fitted:  # the fitted model predicts with the threads asked for
            if "n_jobs" in estimator.get_params(deep=False):
                estimator.set_params(n_jobs=n_jobs)
        return assemble_model(self.plan, fitted, self.n_features)

    def random_effects(self):
        ids = self.cluster_ids[0].append(self.cluster_ids[1:])
        return ids, np.concatenate(self.b), np.concatenate(self.client.gather(self.b_cov))

    def set_random_effects(self, cluster_ids, b):
        self.b = [align_random_effects(ids, cluster_ids, b) for ids in self.cluster_ids]
