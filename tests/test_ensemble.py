"""The M-step's ensemble: Poisson bootstrap, row keys, member plans and honest predictions.

Pure numpy / scikit-learn: every expectation is computed here from the definitions (Poisson(1)
probabilities, per-row loops over members, a constant learner per fold), not copied from a run.
"""

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.dummy import DummyRegressor
from sklearn.ensemble import (ExtraTreesRegressor, HistGradientBoostingRegressor,
                              RandomForestRegressor)
from sklearn.tree import DecisionTreeRegressor

from merf_dask.core.ensemble import (FOLD_MEMBER_ROWS, TREE_MEMBER_ROWS, BoostingStages,
                                FoldEnsemble, _bootstrap_counts, advance_stages,
                                assemble_model, fit_members,
                                honest_predictions, plan_members, predict_fixed_effects, row_keys,
                                training_pieces)
from merf_dask.core.binning import MAX_BINS, FeatureBins
from merf_dask.core.hashing import cluster_hashes


# ------------------------------------------------------------------ helpers


def clustered_rows(*, n_clusters=40, rows_per_cluster=10, n_features=3, seed=0):
    """Cluster ids, cluster hashes, codes, X and y of a small clustered data set."""
    rng = np.random.default_rng(seed)
    ids = pd.Index([f"k{i}" for i in range(n_clusters)])
    codes = np.repeat(np.arange(n_clusters), rows_per_cluster)
    X = rng.standard_normal((len(codes), n_features))
    y = X[:, 0] - 2 * X[:, 1] ** 2 + rng.standard_normal(n_clusters)[codes] \
        + 0.3 * rng.standard_normal(len(codes))
    hashes = cluster_hashes(ids)
    keys = row_keys(hashes, codes, np.column_stack([X, y]))
    return ids, hashes, codes, X, y, keys


def fit_plan(plan, *, X, y, keys, residue_of_row, previous=()):
    """Fit every member of ``plan`` the way the in-memory EM does (one block of rows)."""
    pieces = training_pieces(plan, X=X, y=y, keys=keys, residue_of_row=residue_of_row)
    fitted = []
    for residue, members in plan.chunks(1):
        if residue in pieces:
            fitted += fit_members(plan, members, pieces[residue], previous=previous)
    return fitted


def poisson_pmf(k):
    return math.exp(-1) / math.factorial(k)


# ------------------------------------------------------- Poisson bootstrap


@pytest.fixture(scope="module")
def many_keys():
    return np.random.default_rng(1).integers(0, np.iinfo(np.uint64).max, 200_000,
                                             dtype=np.uint64, endpoint=True)


def test_bootstrap_counts_are_poisson_one(many_keys):
    counts = _bootstrap_counts(many_keys, seed=12345)
    n = len(counts)
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    # standard errors at n = 200k: mean 0.0022, variance 0.0045, P(k) <= 0.0011
    assert abs(counts.mean() - 1.0) < 0.01
    assert abs(counts.var() - 1.0) < 0.02
    for k in range(5):
        assert abs(np.mean(counts == k) - poisson_pmf(k)) < 0.005, k
    assert abs(np.mean(counts == 0) - math.exp(-1)) < 0.005
    # a Poisson(1) count above 8 has probability ~1e-6 per row
    assert counts.max() <= 10
    assert n == len(many_keys)


def test_bootstrap_counts_are_reproducible_and_differ_between_seeds(many_keys):
    first = _bootstrap_counts(many_keys, seed=7)
    again = _bootstrap_counts(many_keys.copy(), seed=7)
    other = _bootstrap_counts(many_keys, seed=8)
    np.testing.assert_array_equal(first, again)
    # two independent Poisson(1) draws agree with probability sum_k P(k)^2 ~ 0.31
    agreement = np.mean(first == other)
    same_probability = sum(poisson_pmf(k) ** 2 for k in range(20))
    assert abs(agreement - same_probability) < 0.01, agreement
    assert abs(np.corrcoef(first, other)[0, 1]) < 0.01
    # each row's count depends only on its own key: a subset gets the same counts
    subset = np.arange(0, len(many_keys), 7)
    np.testing.assert_array_equal(_bootstrap_counts(many_keys[subset], seed=7), first[subset])


def test_bootstrap_counts_of_consecutive_keys_are_independent():
    # keys that differ in one low bit must not get correlated counts
    keys = np.arange(100_000, dtype=np.uint64)
    counts = _bootstrap_counts(keys, seed=0)
    assert abs(counts.mean() - 1.0) < 0.02
    assert abs(np.corrcoef(counts[:-1], counts[1:])[0, 1]) < 0.02


# ---------------------------------------------------------------- row keys


def test_row_keys_follow_the_rows_under_permutation():
    ids, hashes, codes, X, y, keys = clustered_rows()
    values = np.column_stack([X, y])
    order = np.random.default_rng(3).permutation(len(codes))
    np.testing.assert_array_equal(row_keys(hashes, codes[order], values[order]), keys[order])
    # renumbering the clusters (another order of first appearance) changes nothing
    new_codes, new_ids = pd.factorize(np.asarray(ids)[codes][order], sort=False)
    np.testing.assert_array_equal(
        row_keys(cluster_hashes(new_ids), new_codes, values[order]), keys[order])
    assert keys.dtype == np.uint64
    assert len(np.unique(keys)) == len(keys)


def test_row_keys_differ_between_clusters_and_values():
    ids, hashes, codes, X, y, keys = clustered_rows()
    values = np.column_stack([X, y])
    moved = (codes + 1) % len(ids)  # the same values in another cluster
    assert not np.any(row_keys(hashes, moved, values) == keys)
    nudged = values.copy()
    nudged[:, 1] = np.nextafter(nudged[:, 1], np.inf)  # one ulp of one column
    assert not np.any(row_keys(hashes, codes, nudged) == keys)
    # the key knows which column holds which value
    swapped = values[:, [1, 0, 2, 3]]
    assert not np.any(row_keys(hashes, codes, swapped) == keys)
    # equal rows of one cluster share a key
    doubled = row_keys(hashes, np.r_[codes, codes], np.vstack([values, values]))
    np.testing.assert_array_equal(doubled[:len(codes)], doubled[len(codes):])


# ------------------------------------------------------------ plan_members


def forest(n_estimators=16, **params):
    return RandomForestRegressor(n_estimators=n_estimators, random_state=0, n_jobs=1, **params)


@pytest.mark.parametrize("n_rows, member_rows, stride", [
    (1_000, 100_000, 1),
    (100_000, 100_000, 1),
    (100_001, 100_000, 2),
    (800_000, 100_000, 8),
    (800_001, 100_000, 16),
])
def test_forest_plan_stride(n_rows, member_rows, stride):
    plan = plan_members(forest(16), honest=True, n_rows=n_rows, n_folds=2,
                        member_rows=member_rows, seed=0)
    assert plan.trees
    assert plan.stride == stride
    assert plan.n_members == 16
    assert plan.feature_dtype == np.float32
    # the trees are spread evenly over the residue classes, each class used
    residues, counts = np.unique(plan.residues, return_counts=True)
    np.testing.assert_array_equal(residues, np.arange(stride))
    assert counts.max() - counts.min() <= 1
    assert len(np.unique(plan.seeds)) == 16


def test_extra_trees_with_bootstrap_are_tree_members():
    plan = plan_members(ExtraTreesRegressor(n_estimators=5), honest=True, n_rows=10,
                        n_folds=2, member_rows=100, seed=0)
    assert plan.trees and plan.n_members == 5


@pytest.mark.parametrize("n_rows, n_folds, stride", [
    (1_000, 2, 2),
    (1_000, 5, 5),
    (800_000, 2, 8),
    (800_000, 4, 8),
])
def test_cross_fit_plan(n_rows, n_folds, stride):
    plan = plan_members(HistGradientBoostingRegressor(), honest=True, n_rows=n_rows,
                        n_folds=n_folds, member_rows=100_000, seed=0)
    assert not plan.trees
    assert plan.feature_dtype == np.float64
    assert plan.stride == stride and plan.n_members == stride >= n_folds
    np.testing.assert_array_equal(np.sort(plan.residues), np.arange(stride))  # one per fold


@pytest.mark.parametrize("learner, n_rows, stride", [
    (forest(16), 1_000_000, 16),  # 100,000 rows per tree
    (forest(16), 100_000, 1),
    (HistGradientBoostingRegressor(), 1_000_000, 2),  # 1,000,000 rows per member, 2 folds
    (HistGradientBoostingRegressor(), 4_000_001, 8),
])
def test_auto_member_rows_bound_trees_and_cross_fit_members_apart(learner, n_rows, stride):
    plan = plan_members(learner, honest=True, n_rows=n_rows, n_folds=2, member_rows="auto",
                        seed=0)
    assert plan.stride == stride
    assert n_rows / plan.stride <= (TREE_MEMBER_ROWS if plan.trees else FOLD_MEMBER_ROWS)


@pytest.mark.parametrize("learner", [forest(16), HistGradientBoostingRegressor()])
def test_in_sample_plan_has_one_member(learner):
    plan = plan_members(learner, honest=False, n_rows=800_000, n_folds=3, member_rows=100_000,
                        seed=0)
    assert not plan.trees
    assert plan.stride == 1 and plan.n_members == 1
    np.testing.assert_array_equal(plan.residues, [0])


def test_plans_are_reproducible_and_change_with_seed():
    def plan(seed, n_rows=800_000):
        return plan_members(forest(32), honest=True, n_rows=n_rows, n_folds=2,
                            member_rows=100_000, seed=seed)
    a, b = plan(0), plan(0)
    np.testing.assert_array_equal(a.residues, b.residues)
    np.testing.assert_array_equal(a.seeds, b.seeds)
    assert not np.array_equal(a.seeds, plan(1).seeds)


def test_a_forest_has_a_tree_in_every_residue_class():
    """Stride 64 > 32 trees: 64 trees, one per class, so every cluster trains the forest; the
    honest predictions still average the classic ceil(32 / e) = 12 trees."""
    plan = plan_members(forest(32), honest=True, n_rows=6_400_000, n_folds=2,
                        member_rows=100_000, seed=0)
    assert plan.stride == 64 and plan.n_members == 64 and plan.n_honest == 12
    np.testing.assert_array_equal(np.sort(plan.residues), np.arange(64))
    assert len(set(plan.seeds)) == 64


def test_chunks_cover_every_member_once_within_its_residue_class():
    plan = plan_members(forest(37), honest=True, n_rows=400_000, n_folds=2,
                        member_rows=100_000, seed=4)
    for n_chunks in (1, 3, 8, 50):
        chunks = plan.chunks(n_chunks)
        members = np.concatenate([m for _, m in chunks])
        np.testing.assert_array_equal(np.sort(members), np.arange(37))
        for residue, chunk in chunks:
            assert np.all(plan.residues[chunk] == residue)
        assert len(chunks) >= min(n_chunks, 37)


# ------------------------------------------------ fitting and honest predictions


@pytest.fixture(scope="module")
def forest_fit():
    """A forest of fully grown trees on 4 residue classes (stride 4)."""
    ids, hashes, codes, X, y, keys = clustered_rows(n_clusters=60, rows_per_cluster=8)
    learner = RandomForestRegressor(n_estimators=12, min_samples_leaf=1, max_features=1.0,
                                    n_jobs=1, random_state=0)
    plan = plan_members(learner, honest=True, n_rows=len(y), n_folds=2,
                        member_rows=len(y) // 4, seed=11)
    assert plan.trees and plan.stride == 4
    residue_of_row = (hashes % np.uint64(plan.stride))[codes]
    fitted = fit_plan(plan, X=X, y=y, keys=keys, residue_of_row=residue_of_row)
    return dict(plan=plan, fitted=fitted, X=X, y=y, keys=keys, codes=codes, hashes=hashes,
                residue_of_row=residue_of_row)


def naive_in_bag(plan, member, keys, residue_of_row):
    """The in-bag count of every row for one member, row by row, from the design: zero outside
    the member's residue class, the row's Poisson(1) draw for the member's seed inside it."""
    counts = np.zeros(len(keys))
    for i in range(len(keys)):
        if residue_of_row[i] == plan.residues[member]:
            counts[i] = _bootstrap_counts(keys[i:i + 1], int(plan.seeds[member]))[0]
    return counts


def test_tree_members_train_exactly_on_their_in_bag_rows(forest_fit):
    plan, X, y = forest_fit["plan"], forest_fit["X"], forest_fit["y"]
    assert sorted(m for m, _ in forest_fit["fitted"]) == list(range(plan.n_members))
    X32 = X.astype(np.float32)
    for member, tree in forest_fit["fitted"]:
        assert isinstance(tree, DecisionTreeRegressor)
        in_bag = naive_in_bag(plan, member, forest_fit["keys"], forest_fit["residue_of_row"])
        assert in_bag.sum() > 0
        # a fully grown tree reproduces exactly the rows it was grown on, and no others
        reproduced = np.isclose(tree.predict(X32), y, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(reproduced, in_bag > 0)
        # the sample weights are the counts: the root holds their sum
        assert tree.tree_.weighted_n_node_samples[0] == pytest.approx(in_bag.sum())


def test_honest_predictions_equal_a_naive_per_row_loop(forest_fit):
    plan, fitted, X = forest_fit["plan"], forest_fit["fitted"], forest_fit["X"]
    keys, residue_of_row = forest_fit["keys"], forest_fit["residue_of_row"]
    predictions = {m: tree.predict(X.astype(np.float32)) for m, tree in fitted}
    in_bag = {m: naive_in_bag(plan, m, keys, residue_of_row) for m in predictions}
    expected = np.empty(len(X))
    for i in range(len(X)):
        serving = plan.honest_members(int(residue_of_row[i]))
        honest = [predictions[m][i] for m in serving if in_bag[m][i] == 0]
        every = [predictions[m][i] for m in predictions]
        expected[i] = np.mean(honest) if honest else np.mean(every)
    got, _ = honest_predictions(plan, fitted, X=X, keys=keys, residue_of_row=residue_of_row)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # the exclusion matters: no row is predicted by the plain average of every tree
    every = np.mean(list(predictions.values()), axis=0)
    assert np.all(np.abs(got - every) > 1e-9)


def test_honest_predictions_do_not_depend_on_the_order_of_the_rows(forest_fit):
    """Trees predict a block's rows in the order of one tree's leaves (for the cache); the
    result comes back in the caller's order, bit for bit, whatever order the rows came in."""
    plan, fitted, X = forest_fit["plan"], forest_fit["fitted"], forest_fit["X"]
    keys, residue_of_row = forest_fit["keys"], forest_fit["residue_of_row"]
    got, _ = honest_predictions(plan, fitted, X=X, keys=keys, residue_of_row=residue_of_row)
    shuffle = np.random.default_rng(3).permutation(len(X))
    shuffled, _ = honest_predictions(plan, fitted, X=X[shuffle], keys=keys[shuffle],
                                  residue_of_row=residue_of_row[shuffle])
    assert not np.array_equal(got[shuffle], got)
    np.testing.assert_array_equal(shuffled, got[shuffle])


def test_honest_members_average_a_classic_out_of_bag_count(forest_fit):
    """ceil(12 / e) = 5 trees per row in expectation: the class's own trees (out of bag on about
    1/e of its rows) topped up with trees of other classes, which never saw the row."""
    plan, keys, residue_of_row = (forest_fit[k] for k in ("plan", "keys", "residue_of_row"))
    assert plan.n_honest == math.ceil(12 / math.e) == 5
    n_out_of_bag = np.zeros(len(keys))
    for residue in range(plan.stride):
        serving = plan.honest_members(residue)
        own = serving[plan.residues[serving] == residue]
        np.testing.assert_array_equal(own, np.flatnonzero(plan.residues == residue))
        n_other = len(serving) - len(own)
        assert n_other == plan.n_honest - round(len(own) / math.e)
        rows = residue_of_row == residue
        for member in serving:
            n_out_of_bag[rows] += naive_in_bag(plan, member, keys, residue_of_row)[rows] == 0
    assert n_out_of_bag.min() >= 1
    assert abs(n_out_of_bag.mean() - plan.n_honest) < 1.0


def test_honest_members_of_an_unstrided_forest_are_all_its_trees():
    plan = plan_members(RandomForestRegressor(n_estimators=50), honest=True, n_rows=1000,
                        n_folds=2, member_rows=10**6, seed=0)
    assert plan.stride == 1
    np.testing.assert_array_equal(plan.honest_members(0), np.arange(50))


@pytest.mark.parametrize("n_buckets", [8, 32, 256])
def test_a_lake_buckets_classes_share_few_serving_members(n_buckets):
    """20M rows: 256 trees, one per class. A bucket holds the classes of one residue modulo its
    (power-of-two) bucket count; they share a window of other classes' trees, so the bucket's
    E-step needs its own classes' trees and about ceil(100 / e) = 37 others, not all 256."""
    plan = plan_members(RandomForestRegressor(n_estimators=100), honest=True,
                        n_rows=20_000_000, n_folds=2, member_rows=100_000, seed=4)
    assert plan.stride == 256 and plan.n_members == 256 and plan.n_honest == 37
    assert plan.n_windows == 4
    for bucket in range(0, n_buckets, max(1, n_buckets // 5)):
        classes = np.arange(bucket, plan.stride, n_buckets)
        serving = plan.members_serving(classes)
        own = np.flatnonzero(np.isin(plan.residues, classes))
        assert set(own) <= set(serving)
        assert len(serving) <= len(own) + plan.n_honest + len(classes)
        for residue in classes:  # and every class still gets its full honest set
            assert len(plan.honest_members(residue)) == 1 + plan.n_honest - round(1 / math.e)


def test_an_in_sample_plan_is_served_by_all_its_members():
    plan = plan_members(RandomForestRegressor(n_estimators=5), honest=False, n_rows=10,
                        n_folds=2, member_rows=100, seed=0)
    np.testing.assert_array_equal(plan.members_serving([0]), [0])


# ------------------------------------------------------------------ cross-fit


def test_cross_fit_never_predicts_a_row_with_its_own_fold():
    """Each member is a constant (the mean of its fold's response); folds have very different
    means, so a row's honest prediction is the average of the *other* folds' means."""
    ids, hashes, codes, X, _, keys = clustered_rows(n_clusters=80, rows_per_cluster=5, seed=6)
    n_folds = 4
    plan = plan_members(DummyRegressor(strategy="mean"), honest=True, n_rows=len(codes),
                        n_folds=n_folds, member_rows=10**6, seed=3)
    assert plan.stride == n_folds and plan.n_members == n_folds and not plan.trees
    fold = (hashes % np.uint64(n_folds)).astype(np.int64)[codes]
    y = 100.0 * fold + np.random.default_rng(0).standard_normal(len(codes))
    keys = row_keys(hashes, codes, np.column_stack([X, y]))
    fitted = fit_plan(plan, X=X, y=y, keys=keys, residue_of_row=fold)
    fold_mean = {r: y[fold == r].mean() for r in range(n_folds)}
    assert len(fold_mean) == n_folds and all(np.sum(fold == r) > 0 for r in range(n_folds))
    # each member predicts the mean of exactly its residue class
    for member, estimator in fitted:
        assert estimator.predict(X[:1])[0] == pytest.approx(fold_mean[plan.residues[member]])
    got, _ = honest_predictions(plan, fitted, X=X, keys=keys, residue_of_row=fold)
    expected = np.array([np.mean([fold_mean[r] for r in range(n_folds) if r != f])
                         for f in fold])
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # the model of the cross-fit averages all members
    model = assemble_model(plan, fitted, X.shape[1])
    assert isinstance(model, FoldEnsemble) and len(model.members) == n_folds
    np.testing.assert_allclose(model.predict(X[:5]), np.mean(list(fold_mean.values())),
                               rtol=1e-12)


def test_in_sample_member_predicts_in_sample():
    ids, hashes, codes, X, y, keys = clustered_rows(seed=8)
    learner = RandomForestRegressor(n_estimators=5, n_jobs=1, random_state=0)
    plan = plan_members(learner, honest=False, n_rows=len(y), n_folds=2, member_rows=10**6,
                        seed=0)
    residue_of_row = np.zeros(len(y), dtype=np.uint64)
    fitted = fit_plan(plan, X=X, y=y, keys=keys, residue_of_row=residue_of_row)
    assert len(fitted) == 1
    model = assemble_model(plan, fitted, X.shape[1])
    assert model is fitted[0][1] and isinstance(model, RandomForestRegressor)
    got, _ = honest_predictions(plan, fitted, X=X, keys=keys, residue_of_row=residue_of_row)
    np.testing.assert_allclose(got, model.predict(X), rtol=1e-12)


def test_a_strided_cross_fit_predicts_each_row_with_n_folds_minus_one_other_members():
    """With more folds than ``n_folds`` (big data), each row is predicted by ``n_folds - 1``
    members of other folds, never its own: the cost of a ``n_folds``-fold cross-fit."""
    ids, hashes, codes, X, _, keys = clustered_rows(n_clusters=160, rows_per_cluster=4, seed=7)
    n_folds = 3
    plan = plan_members(DummyRegressor(strategy="mean"), honest=True, n_rows=len(codes),
                        n_folds=n_folds, member_rows=len(codes) // 8, seed=2)
    assert plan.stride == 8 and plan.n_members == 8 and plan.n_honest == n_folds - 1
    fold = (hashes % np.uint64(plan.stride)).astype(np.int64)[codes]
    y = 100.0 * fold + np.random.default_rng(1).standard_normal(len(codes))
    keys = row_keys(hashes, codes, np.column_stack([X, y]))
    fitted = fit_plan(plan, X=X, y=y, keys=keys, residue_of_row=fold)
    member_mean = {m: est.predict(X[:1])[0] for m, est in fitted}
    got, _ = honest_predictions(plan, fitted, X=X, keys=keys, residue_of_row=fold)
    for residue in range(plan.stride):
        serving = plan.honest_members(residue)
        assert len(serving) == n_folds - 1
        assert not np.any(plan.residues[serving] == residue)
        np.testing.assert_allclose(got[fold == residue],
                                   np.mean([member_mean[m] for m in serving]), rtol=1e-12)


@pytest.mark.parametrize("n_jobs", [2, 3])
def test_honest_residuals_on_threads_equal_those_on_a_single_thread(forest_fit, n_jobs):
    from merf_dask.core.em import PartitionArrays, honest_residuals
    X, codes, y = forest_fit["X"], forest_fit["codes"], forest_fit["y"]
    part = PartitionArrays.from_arrays(X=X, Z=[np.ones((len(y), 1))], y=y, codes=[codes],
                                       levels=[np.arange(codes.max() + 1)])
    single = honest_residuals(part, forest_fit["plan"], forest_fit["fitted"])
    threads = honest_residuals(part, forest_fit["plan"], forest_fit["fitted"], n_jobs=n_jobs)
    np.testing.assert_array_equal(threads[0], single[0])
    assert threads[1] == single[1]


def test_predict_fixed_effects_of_a_forest_equals_its_predict(forest_fit):
    """The leaf-ordered prediction of new rows gives the forest's own prediction, in order."""
    plan, fitted, X = forest_fit["plan"], forest_fit["fitted"], forest_fit["X"]
    forest = assemble_model(plan, fitted, n_features=X.shape[1])
    forest.set_params(n_jobs=1)
    new_rows = np.random.default_rng(5).normal(size=(300, X.shape[1]))
    np.testing.assert_array_equal(predict_fixed_effects(forest, new_rows),
                                  forest.predict(new_rows))


def test_a_forest_predicts_the_same_bits_on_any_number_of_threads():
    """scikit-learn adds a forest's trees in the order its threads finish; merf-dask adds them
    in their order (threads split the rows), so predictions repeat bit for bit."""
    from sklearn.ensemble import RandomForestRegressor

    from merf_dask.core.ensemble import predict_fixed_effects
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60_000, 3))
    y = X[:, 0] + rng.standard_normal(len(X))
    forest = RandomForestRegressor(n_estimators=30, min_samples_leaf=5, random_state=0,
                                   n_jobs=2).fit(X[:5_000], y[:5_000])
    predictions = [predict_fixed_effects(forest.set_params(n_jobs=n_jobs), X)
                   for n_jobs in (2, 2, 1, 3)]
    for prediction in predictions[1:]:
        np.testing.assert_array_equal(prediction, predictions[0])
    # scikit-learn's own sum is order-dependent in the last bits, so near-zero predictions
    # differ from it relatively more than 1e-12: compare on the scale of the predictions.
    np.testing.assert_allclose(predictions[0], forest.predict(X), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ warm-started boosting


def warm_boosting(max_iter=30, **params):
    return HistGradientBoostingRegressor(max_iter=max_iter, warm_start=True,
                                         early_stopping=False, random_state=0, **params)


@pytest.mark.parametrize("max_iter, per_step, steps", [(30, 3, 10), (100, 10, 10), (5, 1, 5),
                                                       (101, 11, 10)])
def test_warm_started_plans_spread_the_rounds_over_m_steps(max_iter, per_step, steps):
    plan = plan_members(warm_boosting(max_iter), honest=True, n_rows=1000, n_folds=2,
                        member_rows="auto", seed=0)
    assert (plan.rounds_per_step, plan.growing_steps) == (per_step, steps)
    for learner in (HistGradientBoostingRegressor(), forest(4).set_params(warm_start=True)):
        plan = plan_members(learner, honest=True, n_rows=1000, n_folds=2, member_rows="auto",
                            seed=0)
        assert (plan.rounds_per_step, plan.growing_steps) == (0, 0)


@pytest.mark.parametrize("stopping", ["auto", True])
def test_a_warm_started_learner_that_stops_early_is_refused(stopping):
    learner = HistGradientBoostingRegressor(warm_start=True, early_stopping=stopping)
    with pytest.raises(ValueError, match=f"set early_stopping=False .it is {stopping!r}"):
        plan_members(learner, honest=True, n_rows=1000, n_folds=2, member_rows="auto", seed=0)


def test_warm_started_members_add_a_stage_in_every_m_step():
    """Each M-step adds a stage of ``rounds_per_step`` rounds, fitted to what the stages before
    left (the pieces' response less StagePredictions.own); once a member holds all its rounds
    it is kept as it is. The running sums equal the whole members' predictions, and a stage
    boosts on from where the one before stopped."""
    ids, hashes, codes, X, y, keys = clustered_rows(n_clusters=60, seed=4)
    plan = plan_members(warm_boosting(max_iter=5, max_features=0.5), honest=True,
                        n_rows=len(y), n_folds=2, member_rows="auto", seed=1)
    assert plan.rounds_per_step == 1 and plan.growing_steps == 5
    fold = plan.residue_of(hashes)[codes]
    targets = [y + shift for shift in np.linspace(0.0, 2.0, 7)]
    fitted, staged = [], None
    for step in range(7):
        residual = targets[step] - (0.0 if staged is None else staged.own)
        grown = fit_plan(plan, X=X, y=residual, keys=keys, residue_of_row=fold,
                         previous=[fitted])
        for (member, estimator), (_, earlier) in zip(grown, fitted):
            assert len(earlier.stages) == min(5, step)  # the earlier fit is not changed
            if step >= 5:
                assert estimator is earlier  # all rounds held: nothing more is fitted
        assert all(isinstance(e, BoostingStages) and len(e.stages) == min(5, step + 1)
                   and sum(stage.n_iter_ for stage in e.stages) == min(5, step + 1)
                   for _, e in grown)
        staged = advance_stages(plan, grown, X=X, keys=keys, residue_of_row=fold,
                                previous=staged)
        assert staged.n_stages == min(5, step + 1)
        honest, n_in_sample = honest_predictions(plan, grown, X=X, keys=keys,
                                                 residue_of_row=fold)
        np.testing.assert_allclose(staged.honest, honest, rtol=1e-12, atol=1e-12)
        own = np.array([dict(grown)[plan.residues.tolist().index(r)].predict(X[i:i + 1])[0]
                        for i, r in enumerate(fold)])
        np.testing.assert_allclose(staged.own, own, rtol=1e-12, atol=1e-12)
        fitted = grown
    # a stage starts from the sums of the stages before: its first tree fits their residual
    member, estimator = fitted[0]
    rows = fold == plan.residues[member]
    last = estimator.stages[-1]
    assert estimator.bins is None  # unweighted rows keep the booster's own binning
    binned = X
    np.testing.assert_allclose(last._baseline_prediction.ravel(),
                               np.mean((targets[4] - (staged.own - last.predict(binned)))[rows]),
                               rtol=1e-10)


def test_feature_bins_take_quantiles_once_and_keep_order_ties_and_missing_values():
    rng = np.random.default_rng(3)
    X = np.column_stack([rng.standard_normal(20_000), rng.integers(0, 7, 20_000),
                         rng.exponential(size=20_000)])
    X[rng.random(20_000) < 0.05, 2] = np.nan
    bins = FeatureBins().fit(X)
    binned = bins.transform(X)
    for j in range(3):
        present = ~np.isnan(X[:, j])
        np.testing.assert_array_equal(np.isnan(binned[:, j]), ~present)  # missing stays missing
        values, codes = X[present, j], binned[present, j]
        order = np.argsort(values, kind="stable")
        assert np.all(np.diff(codes[order]) >= 0)  # the bins keep the values' order
        assert len(np.unique(codes)) <= MAX_BINS  # a histogram booster takes them as they are
    assert len(np.unique(binned[:, 1])) == 7  # tied values share a bin: one per integer
    counts = np.bincount(binned[:, 0].astype(int))
    assert len(counts) == MAX_BINS and counts.min() > 0.8 * 20_000 / MAX_BINS  # quantiles
    # rows not seen in the fit fall into the same bins as seen rows of equal value
    np.testing.assert_array_equal(bins.transform(X[::-1]), binned[::-1])
