"""MERF's EM over cluster-whole partitions held by Dask workers.

Each partition is loaded once into a :class:`PartitionState` (numpy arrays for its rows plus the
b_i of its clusters) that stays on the worker holding it; every EM step maps a small module-level
function over the states with futures (the per-iteration round trip is tens of milliseconds, see
dask-notes 2.3). Only q x q and scalar partial sums travel to the driver, tree-reduced.

Two M-steps (``m_step``):

``"local"``
    Data-local forest. Each partition grows its share of the trees (in proportion to its rows) on
    its own rows with its own bootstrap; the trees are merged into one forest. The honest
    prediction of a row averages the trees that did not see it: every tree grown on another
    partition, and the partition's own trees whose bootstrap left the row out. That is exactly
    the merged forest's out-of-bag prediction, computed where the row lives. No rows move.
``"global"``
    One learner fitted in the driver process on all rows (X is gathered once and kept;
    the working response is gathered each iteration), with joblib's Dask backend so a forest's
    trees are built on the workers. Works for any learner; needs X in the driver's memory.

Classes and functions
---------------------
PartitionState
    One partition's rows and random effects.
DaskEMData
    The :class:`merf_dask.em.EMData` implementation over a list of state futures.
The rest are the small functions that run on the workers.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import joblib
import numpy as np
import pandas as pd
from sklearn.base import clone

from ._core import (EMSums, cluster_statistics, random_effects_offset, random_effects_step)
from .learners import fit_fixed_effects, forest_tree_params

__all__ = ["PartitionState", "DaskEMData", "M_STEPS"]

M_STEPS = ("local", "global")

#: Partial sums are added in groups of this many futures per task (the tree reduction's fan-in).
_REDUCE_FAN_IN = 8


@dataclass(frozen=True)
class PartitionState:
    """The rows of one cluster-whole partition and the random effects of its clusters.

    Attributes
    ----------
    X : ndarray of shape (n_rows, n_features)
    Z : ndarray of shape (n_rows, q)
    y : ndarray of shape (n_rows,)
    codes : ndarray of shape (n_rows,)
        Local cluster index of each row.
    cluster_ids : ndarray of shape (n_clusters,)
    b : ndarray of shape (n_clusters, q)
    b_cov : ndarray of shape (n_clusters, q, q)
    f_hat : ndarray of shape (n_rows,) or None
        Honest fixed-effects predictions of the current iteration.
    """

    X: np.ndarray
    Z: np.ndarray
    y: np.ndarray
    codes: np.ndarray
    cluster_ids: np.ndarray
    b: np.ndarray
    b_cov: np.ndarray
    f_hat: np.ndarray | None = None

    def working_response(self) -> np.ndarray:
        return self.y - random_effects_offset(self.Z, self.b, self.codes)


def _load_partition(frame: pd.DataFrame, *, x_columns: list[str], z_columns: list[str],
                    cluster_column: str, y_column: str) -> PartitionState:
    codes, cluster_ids = pd.factorize(frame[cluster_column], sort=False)
    q = len(z_columns)
    return PartitionState(
        X=frame[x_columns].to_numpy(dtype=float),
        Z=frame[z_columns].to_numpy(dtype=float).reshape(len(frame), q),
        y=frame[y_column].to_numpy(dtype=float),
        codes=codes.astype(np.int64),
        cluster_ids=np.asarray(cluster_ids, dtype=object),
        b=np.zeros((len(cluster_ids), q)),
        b_cov=np.zeros((len(cluster_ids), q, q)),
    )


def _n_rows(state: PartitionState) -> int:
    return len(state.y)


def _features(state: PartitionState) -> np.ndarray:
    return state.X


def _working_response(state: PartitionState) -> np.ndarray:
    return state.working_response()


def _with_fixed_effects(state: PartitionState, f_hat: np.ndarray) -> PartitionState:
    return replace(state, f_hat=f_hat)


def _grow_trees(state: PartitionState, n_trees: int, seed: int, *, tree_class, tree_params: dict
                ) -> tuple[list, np.ndarray]:
    """Grow ``n_trees`` bagged trees on this partition's rows (runs on the worker).

    A bootstrap is drawn as multinomial counts and passed as sample weights, which is how
    scikit-learn's forests bag; the in-bag mask of each tree stays on the worker for the
    out-of-bag predictions.
    """
    rng = np.random.default_rng(seed)
    n = len(state.y)
    response = state.working_response()
    trees, in_bag = [], np.zeros((n_trees, n), dtype=bool)
    for t in range(n_trees):
        counts = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        tree = tree_class(**tree_params, random_state=int(rng.integers(np.iinfo(np.int32).max)))
        trees.append(tree.fit(state.X, response, sample_weight=counts))
        in_bag[t] = counts > 0
    return trees, in_bag


def _forest_oob_predictions(state: PartitionState, in_bag: np.ndarray, first_own_tree: int,
                            *, forest) -> PartitionState:
    """The merged forest's out-of-bag predictions at this partition's rows (runs on the worker)."""
    X32 = state.X.astype(np.float32)  # trees split on float32, as the forest's predict does
    total = np.zeros(len(state.y))
    own_in_bag_total = np.zeros(len(state.y))
    for t, tree in enumerate(forest.estimators_):
        prediction = tree.predict(X32, check_input=False)
        total += prediction
        own = t - first_own_tree
        if 0 <= own < len(in_bag):
            own_in_bag_total += prediction * in_bag[own]
    n_out_of_bag = len(forest.estimators_) - in_bag.sum(axis=0)
    f_hat = np.where(n_out_of_bag > 0, (total - own_in_bag_total) / np.maximum(n_out_of_bag, 1),
                     total / len(forest.estimators_))
    return replace(state, f_hat=f_hat)


def _estep_partition(state: PartitionState, *, sigma2: float, D: np.ndarray
                     ) -> tuple[PartitionState, EMSums]:
    stats = cluster_statistics(state.codes, state.Z, state.y - state.f_hat,
                               n_clusters=len(state.cluster_ids))
    b, b_cov, sums = random_effects_step(stats, sigma2=sigma2, D=D)
    return replace(state, b=b, b_cov=b_cov), sums


def _add_sums(*sums: EMSums) -> EMSums:
    total = sums[0]
    for s in sums[1:]:
        total = total + s
    return total


def _random_effects(state: PartitionState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return state.cluster_ids, state.b, state.b_cov


def _tree_reduce(client, futures: list, combine):
    while len(futures) > 1:
        futures = [client.submit(combine, *futures[i:i + _REDUCE_FAN_IN], pure=False)
                   for i in range(0, len(futures), _REDUCE_FAN_IN)]
    return futures[0]


def _allocate_trees(n_rows: np.ndarray, n_trees: int) -> np.ndarray:
    """Trees per partition in proportion to its rows (largest remainders), at least one each."""
    share = n_rows / n_rows.sum() * n_trees
    allocated = np.floor(share).astype(int)
    allocated[np.argsort(allocated - share)[: n_trees - allocated.sum()]] += 1
    return np.maximum(allocated, 1)


def _merge_forest(template, trees: list, n_features: int):
    """A fitted scikit-learn forest made of ``trees`` grown elsewhere."""
    forest = clone(template).set_params(n_estimators=len(trees), oob_score=False)
    forest.estimators_ = trees
    forest.estimator_ = clone(template.estimator)
    forest.n_features_in_ = n_features
    forest.n_outputs_ = 1
    return forest


class DaskEMData:
    """Cluster-whole partitions loaded on the workers, driven with futures.

    Parameters
    ----------
    client : distributed.Client
    partitions : list of Future
        Futures of pandas DataFrames, each holding whole clusters.
    x_columns, z_columns : list of str
    cluster_column, y_column : str
    m_step : {"local", "global"}
    seed : int
        Seeds every partition's bootstrap in the data-local M-step.
    """

    def __init__(self, *, client, partitions, x_columns, z_columns, cluster_column, y_column,
                 m_step: str, seed: int):
        self.client = client
        self.m_step = m_step
        self.seed = seed
        self.states = client.map(_load_partition, partitions, x_columns=x_columns,
                                 z_columns=z_columns, cluster_column=cluster_column,
                                 y_column=y_column, pure=False)
        self.n_rows = np.asarray(client.gather(client.map(_n_rows, self.states)))
        self.n_features = len(x_columns)
        self._X = None

    def _gather_X(self) -> np.ndarray:
        if self._X is None:
            self._X = np.concatenate(self.client.gather(self.client.map(_features, self.states)))
        return self._X

    def fit_fixed_effects(self, learner, *, use_oob, iteration):
        if self.m_step == "local":
            return self._fit_local_forest(learner, iteration=iteration)
        X = self._gather_X()
        response = np.concatenate(self.client.gather(
            self.client.map(_working_response, self.states, pure=False)))
        with joblib.parallel_config(backend="dask"):
            fitted, f_hat = fit_fixed_effects(learner, X, response, use_oob=use_oob)
        chunks = self.client.scatter(np.split(f_hat, np.cumsum(self.n_rows)[:-1]))
        self.states = self.client.map(_with_fixed_effects, self.states, chunks, pure=False)
        return fitted

    def _fit_local_forest(self, learner, *, iteration):
        n_trees = _allocate_trees(self.n_rows, learner.n_estimators)
        seeds = np.random.SeedSequence([self.seed, iteration]).generate_state(len(n_trees))
        grown = self.client.map(_grow_trees, self.states, n_trees.tolist(), seeds.tolist(),
                                tree_class=type(learner.estimator),
                                tree_params=forest_tree_params(learner), pure=False)
        trees = self.client.gather(self.client.map(operator.itemgetter(0), grown))
        in_bag = self.client.map(operator.itemgetter(1), grown)
        forest = _merge_forest(learner, [t for part in trees for t in part], self.n_features)
        forest_future = self.client.scatter(forest, broadcast=True, hash=False)
        first_own_tree = np.concatenate([[0], np.cumsum(n_trees)[:-1]]).tolist()
        self.states = self.client.map(_forest_oob_predictions, self.states, in_bag,
                                      first_own_tree, forest=forest_future, pure=False)
        return forest

    def random_effects_step(self, *, sigma2, D):
        results = self.client.map(_estep_partition, self.states, sigma2=sigma2, D=D, pure=False)
        self.states = self.client.map(operator.itemgetter(0), results)
        sums = self.client.map(operator.itemgetter(1), results)
        return _tree_reduce(self.client, sums, _add_sums).result()

    def random_effects(self):
        parts = self.client.gather(self.client.map(_random_effects, self.states, pure=False))
        ids = pd.Index(np.concatenate([p[0] for p in parts]))
        return ids, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
