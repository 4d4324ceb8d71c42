"""The fixed-effects ensemble of the M-step: which rows each member sees, and honest predictions.

MERF's EM needs f(X) at the training rows from a model that did not see those rows (the paper's
authors use a forest's out-of-bag predictions; in-sample predictions of a forest nearly
interpolate the working response and drive sigma2 towards zero). Here every learner is fitted
as an ensemble of *members*, and the honest prediction of a row averages the members that did
not train on it:

* a bagged scikit-learn forest (random forest, extra trees) -- every tree is a member, bagged
  with a Poisson(1) bootstrap; the prediction is the forest's out-of-bag prediction;
* any other learner (gradient boosting, a histogram forest, any scikit-learn regressor) --
  ``n_folds`` members (more when the data is large) fitted on disjoint folds of clusters, a
  cross-fit that costs about one fit of the learner in total; the model is the average of the
  members;
* in-sample (``honest=False``, and linear models by default, whose in-sample fit is the ML
  estimate) -- one member on every row.

A boosted learner with ``warm_start=True`` (scikit-learn's gradient boosting) is not refitted
from scratch in every M-step: each member goes on boosting from its fit of the M-step before. A
member is a :class:`BoostingStages`, and every M-step adds a stage of ``rounds_per_step`` rounds
fitted to what the stages before left of the new working response (for squared loss, boosting
on from where they stopped), until the member holds the learner's rounds (``max_iter`` or
``n_estimators``) after :data:`WARM_START_STEPS` M-steps; from then on the members stay as they
are and EM converges the variance components. As in GPBoost, the boosting and the random effects
are fitted together, at the price of one boosting of the learner's rounds in all, not one per
iteration. Every block keeps its rows' running sums of the stages (:class:`StagePredictions`:
the honest prediction, and the in-sample one of the row's own member, which the next stage
boosts from), so an M-step predicts only its new stage, never the whole ensemble again; and in
binary and count fits (weighted rows) a member bins its rows once, in its first M-step, for all
its stages (:class:`~merf_dask.core.binning.FeatureBins`).

Which rows a member sees is decided per row from a stable hash of its cluster id and its
values, never from the partition the row sits in or the process that runs the
member, so the same seed gives the same model whatever the number of workers and partitions.
A member trains on the clusters whose hash falls in one residue class modulo ``stride`` (a power
of two chosen so that no member sees more than ``member_rows`` rows, or ``n_folds`` if larger):
that bounds the memory of every task and the size of every tree (by default 100,000 rows per
tree, and 1,000,000 per member of a cross-fit, whose model does not grow with its rows and whose
fit pays a per-fit overhead better paid a few times than dozens), and when the lake's bucket count
(also a power of two) divides the stride, each member's rows come from a single bucket and
nothing moves.

Honest predictions cost what they cost without the strides. A classic forest's out-of-bag
prediction averages about ``n_estimators / e`` trees per row (the trees whose bootstrap missed
it); once trees see a fraction of the clusters, almost every tree misses a row, and averaging all
of them would cost ``stride``-fold more than the forest's fit. So each residue class is predicted
by its own trees (out of bag where the bootstrap missed the row) topped up with trees of other
classes to the classic count, ``ceil(n_estimators / e)``; a cross-fit predicts each row with
``n_folds - 1`` members of other folds, as a K-fold cross-fit does. The other classes' members
come from one of a few fixed windows of the ensemble, chosen by the class's residue modulo a
small power of two, so the classes of one lake bucket share a window and a bucket's E-step task
needs a few dozen members rather than all of them (at 20M rows, 256 trees of 1 MB each would not
fit a 1 GiB worker twice over). Trees predict a block's rows in the order of one tree's leaves,
which keeps the nodes they visit in the cache (:func:`_prediction_order`).

Classes and functions
---------------------
row_keys
    Stable 64-bit keys of rows (:func:`merf_dask.core.hashing.cluster_hashes` hashes clusters).
MemberPlan, plan_members
    The members of every M-step of a fit: learner, residue class, seed.
Piece, training_pieces
    The rows of one residue class found in one block of rows, ready to ship.
fit_members
    Fit some members of a plan on the pieces of their residue class.
honest_predictions
    Out-of-bag / cross-fitted predictions at one block's rows.
predict_fixed_effects
    The fitted learner's prediction of any rows (trees in a cache-friendly order).
assemble_model, FoldEnsemble
    The fitted learner that predicts new rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import joblib
import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.ensemble._forest import BaseForest
from sklearn.tree import DecisionTreeRegressor

from .binning import FeatureBins

__all__ = ["row_keys", "MemberPlan", "plan_members", "TREE_MEMBER_ROWS", "FOLD_MEMBER_ROWS",
           "DEALT_CLUSTERS_PER_CLASS",
           "Piece", "training_pieces", "fit_members", "honest_predictions", "assemble_model",
           "FoldEnsemble", "is_bagged_forest", "is_warm_started", "predict_fixed_effects",
           "WARM_START_STEPS", "BoostingStages", "StagePredictions", "advance_stages",
           "restaged"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
# Poisson(1) cumulative probabilities; a uniform above the last gives 21 (probability < 1e-19)
_POISSON_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(21)])
#: ``member_rows="auto"``: rows per tree of a bagged forest (bounds every tree's size) ...
TREE_MEMBER_ROWS = 100_000
#: ... and per member of a cross-fit (bounds the memory of its fit task: a few copies of its rows)
FOLD_MEMBER_ROWS = 1_000_000
#: Below this many clusters per residue class, classes are dealt rather than hashed
#: (:func:`plan_members`): with a handful of clusters, hash residues often leave a class empty.
DEALT_CLUSTERS_PER_CLASS = 64
#: A forest's prediction gives each thread at least this many rows (a tree's predict call has a
#: fixed cost).
_ROWS_PER_THREAD = 10_000
#: A warm-started learner's rounds are spread over this many M-steps (bench/results/table.md
#: measures the choice).
WARM_START_STEPS = 10
#: The parameter that counts a boosted learner's rounds
_ROUND_PARAMS = ("max_iter", "n_estimators")
_TREE_PARAMS = ("criterion", "max_depth", "min_samples_split", "min_samples_leaf",
                "min_weight_fraction_leaf", "max_features", "max_leaf_nodes",
                "min_impurity_decrease", "ccp_alpha", "monotonic_cst")


def _mix(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scatters every input bit."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64, copy=True)
        z ^= z >> np.uint64(30)
        z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27)
        z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return z


def row_keys(hashes: np.ndarray, codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Stable 64-bit key of each row, from its cluster's hash and its values.

    The key depends on nothing but the row itself, so it is the same whatever partition, order
    or process the row is in; equal rows of a cluster share a key, which is harmless (they are
    interchangeable).

    Parameters
    ----------
    hashes : ndarray of shape (n_clusters,), uint64
    codes : ndarray of shape (n_rows,)
        Cluster index of each row.
    values : ndarray of shape (n_rows, n_columns), float64
        The row's values (features, random-effects design, response).

    Returns
    -------
    ndarray of shape (n_rows,), dtype uint64
    """
    keys = hashes[codes]
    for column in np.asarray(values, dtype=np.float64).T:
        keys = _mix(keys ^ np.ascontiguousarray(column).view(np.uint64))
    return keys


def _bootstrap_counts(keys: np.ndarray, seed: int) -> np.ndarray:
    """Poisson(1) in-bag count of every row for the member with ``seed`` (the bootstrap of
    distributed bagging: each row's count is drawn on its own, so any process can recompute it)."""
    with np.errstate(over="ignore"):
        bits = _mix(keys ^ (np.uint64(seed) * _GOLDEN + np.uint64(1)))
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.searchsorted(_POISSON_CDF, uniform, side="right").astype(np.float64)


def is_bagged_forest(learner: BaseEstimator) -> bool:
    """True for a scikit-learn forest of decision trees (random forest or extra trees)."""
    return isinstance(learner, BaseForest) and isinstance(learner.estimator, DecisionTreeRegressor)


def _round_parameter(learner: BaseEstimator) -> str | None:
    params = learner.get_params(deep=False)
    return next((name for name in _ROUND_PARAMS if name in params), None)


def _total_rounds(learner: BaseEstimator) -> int:
    """A warm-started learner's rounds in all (its ``max_iter`` or ``n_estimators``)."""
    return learner.get_params()[_round_parameter(learner)]


def is_warm_started(learner: BaseEstimator) -> bool:
    """True for a boosted learner with ``warm_start=True`` (a parameter counting its rounds,
    ``max_iter`` or ``n_estimators``), which goes on boosting from one M-step to the next; a
    bagged forest's trees are members of their own and are never warm-started.

    Raises
    ------
    ValueError
        A warm-started learner that stops early: its rounds would depend on a validation split
        of a working response that changes in every M-step.
    """
    params = learner.get_params(deep=False)
    if is_bagged_forest(learner) or not params.get("warm_start") or \
            _round_parameter(learner) is None:
        return False
    stopping = params.get("early_stopping", params.get("n_iter_no_change"))
    if stopping not in (False, None):
        raise ValueError(
            f"{type(learner).__name__}(warm_start=True) goes on boosting in every EM iteration "
            f"and must not stop early: set early_stopping=False (it is {stopping!r})")
    return True


@dataclass(frozen=True)
class MemberPlan:
    """The members of one M-step.

    Attributes
    ----------
    learner : estimator
        The unfitted template (a forest for tree members).
    trees : bool
        Members are the trees of a bagged forest (Poisson bootstrap, float32 features).
    stride : int
        Member m trains on clusters whose hash modulo ``stride`` is ``residues[m]``.
    residues : ndarray of shape (n_members,)
    seeds : ndarray of shape (n_members,), uint32
    n_honest : int
        How many members an honest prediction averages per row (see :meth:`honest_members`).
    class_table : (ndarray of shape (n_clusters,), ndarray of shape (n_clusters,)) or None
        Sorted cluster hashes and the residue class dealt to each, when the fit has too few
        clusters for hash residues to fill every class (see :func:`plan_members`); None: the
        class of a cluster is its hash modulo ``stride``.
    rounds_per_step : int
        Boosting rounds a warm-started member adds in every M-step (:func:`is_warm_started`);
        0 refits every member from scratch.
    """

    learner: BaseEstimator
    trees: bool
    stride: int
    residues: np.ndarray
    seeds: np.ndarray
    n_honest: int
    class_table: tuple[np.ndarray, np.ndarray] | None = None
    rounds_per_step: int = 0

    @property
    def n_members(self) -> int:
        return len(self.seeds)

    @property
    def growing_steps(self) -> int:
        """The M-steps in which warm-started members grow (0 when members are refitted from
        scratch): EM must not stop before they hold all their rounds."""
        if not self.rounds_per_step:
            return 0
        return math.ceil(_total_rounds(self.learner) / self.rounds_per_step)

    def residue_of(self, hashes: np.ndarray) -> np.ndarray:
        """The residue class of clusters with these hashes: the hash modulo ``stride``, or the
        class dealt to the cluster in ``class_table`` when the fit has few clusters per class.

        Parameters
        ----------
        hashes : ndarray of shape (n_clusters,), uint64
            Hashes of training clusters (:func:`merf_dask.core.hashing.cluster_hashes`).

        Returns
        -------
        ndarray of shape (n_clusters,), int64
        """
        hashes = np.asarray(hashes, dtype=np.uint64)
        if self.class_table is None:
            return (hashes % np.uint64(self.stride)).astype(np.int64)
        table_hashes, table_classes = self.class_table
        return table_classes[np.searchsorted(table_hashes, hashes)]

    def row_residues(self, keys: np.ndarray) -> np.ndarray:
        """The residue class of rows of spread clusters (clusters too big for one member or
        partition, :func:`merf_dask.core.em.spread_part`): their row key modulo ``stride``, so
        such a cluster's rows train every class's members.

        Parameters
        ----------
        keys : ndarray of shape (n_rows,), uint64
            :func:`row_keys` of the rows.

        Returns
        -------
        ndarray of shape (n_rows,), int64
        """
        return (np.asarray(keys, dtype=np.uint64) % np.uint64(self.stride)).astype(np.int64)

    @property
    def feature_dtype(self):
        return np.float32 if self.trees else np.float64  # trees split on float32 anyway

    def chunks(self, n_chunks: int) -> list[tuple[int, np.ndarray]]:
        """Members grouped by residue class and split into at least ``n_chunks`` tasks.

        Returns
        -------
        list of (residue, member indices)
        """
        per_residue = {int(r): np.flatnonzero(self.residues == r) for r in np.unique(self.residues)}
        size = max(1, math.ceil(self.n_members / max(n_chunks, len(per_residue))))
        return [(residue, members[i:i + size]) for residue, members in per_residue.items()
                for i in range(0, len(members), size)]

    @property
    def n_windows(self) -> int:
        """How many distinct windows of other classes' members serve the residue classes.

        A power of two, at most ``n_members / n_honest``, so the windows barely overlap, and at
        most ``stride``. Class r uses window ``r % n_windows``: the classes of one lake bucket
        (clusters of equal hash modulo the power-of-two bucket count) share a window, so a
        bucket's E-step needs a few dozen members, not the whole ensemble.
        """
        per_window = max(1, self.n_members // max(self.n_honest, 1))
        return min(self.stride, 1 << (per_window.bit_length() - 1))

    def honest_members(self, residue: int) -> np.ndarray:
        """The members that may give an honest prediction to rows of residue class ``residue``.

        Tree members of the class itself (a row counts them where their bootstrap missed it),
        then members of other classes, which never saw the row, up to ``n_honest`` in
        expectation, taken in member order from the start of the class's window. A cross-fit's
        members of the class itself are never honest.

        Returns
        -------
        ndarray of shape (n_selected,), sorted member indices
        """
        own = np.flatnonzero(self.residues == residue) if self.trees else np.empty(0, int)
        out_of_bag_share = math.exp(-1)  # P(Poisson(1) = 0)
        n_other = max(0, self.n_honest - round(len(own) * out_of_bag_share))
        window = residue % self.n_windows
        start = window * self.n_members // self.n_windows
        order = (start + np.arange(self.n_members)) % self.n_members
        other = order[self.residues[order] != residue][:n_other]
        return np.sort(np.concatenate([own, other]))

    def members_serving(self, residues) -> np.ndarray:
        """Every member that :meth:`honest_members` names for any of ``residues``; all members
        when none is named (an in-sample plan, whose rows get the average of all members)."""
        named = [self.honest_members(int(r)) for r in np.unique(residues)]
        serving = np.unique(np.concatenate(named)) if named else np.empty(0, int)
        return serving if len(serving) else np.arange(self.n_members)

    def in_bag(self, member: int, keys: np.ndarray, residue_of_row: np.ndarray) -> np.ndarray:
        """In-bag count of every row for ``member``; 0 marks an honest (out-of-bag) row."""
        in_class = residue_of_row == self.residues[member]
        if not self.trees:
            return in_class.astype(np.float64)
        counts = np.zeros(len(keys))
        counts[in_class] = _bootstrap_counts(keys[in_class], int(self.seeds[member]))
        return counts


def _power_of_two_at_least(value: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(value, 1.0))))


def plan_members(learner: BaseEstimator, *, honest: bool, n_rows: int, n_folds: int,
                 member_rows: int | str, seed: int,
                 cluster_hashes: np.ndarray | None = None) -> MemberPlan:
    """Decide the members of every M-step of a fit.

    The same members (seeds, bootstraps, residue classes) serve every iteration, as a forest with
    a fixed random_state refits in merf: fresh draws each iteration add noise to the GLL that
    keeps the relative-change stop from firing for many iterations.

    Parameters
    ----------
    learner : estimator
        Unfitted fixed-effects learner.
    honest : bool
        Give honest (out-of-bag or cross-fitted) predictions; False fits one member on all rows.
    n_rows : int
        Training rows in all partitions.
    n_folds : int
        Members of a cross-fit (learners that are not bagged forests).
    member_rows : int or "auto"
        The most rows any member is fitted on (in expectation); sets the stride. "auto" is
        ``TREE_MEMBER_ROWS`` for the trees of a bagged forest and ``FOLD_MEMBER_ROWS`` for the
        members of a cross-fit.
    seed : int
        The fit's seed; it seeds every member.
    cluster_hashes : ndarray of shape (n_clusters,), uint64, optional
        Hashes of every training cluster. With them, the stride never exceeds the number of
        clusters, and when there are fewer than ``DEALT_CLUSTERS_PER_CLASS`` clusters per class
        the classes are dealt like cards (clusters in the order of their hash mixed with the
        seed, class = position modulo stride), so that every class holds clusters and a
        cross-fit stays honest; otherwise hash residues fill every class by the law of large
        numbers and keep each class within one lake bucket.

    Returns
    -------
    MemberPlan

    Raises
    ------
    ValueError
        A cross-fit with fewer clusters than ``n_folds``.
    """
    trees = honest and is_bagged_forest(learner)
    if member_rows == "auto":
        member_rows = TREE_MEMBER_ROWS if trees else FOLD_MEMBER_ROWS
    stride = _power_of_two_at_least(n_rows / member_rows)
    if honest and not trees:
        stride = max(stride, n_folds)
    if not honest:
        stride = 1
    hashes = None if cluster_hashes is None else np.unique(np.asarray(cluster_hashes,
                                                                      dtype=np.uint64))
    n_clusters = None if hashes is None else len(hashes)
    if n_clusters is not None:
        if honest and not trees and n_clusters < n_folds:
            raise ValueError(
                f"a cross-fit with n_folds={n_folds} needs at least {n_folds} clusters, got "
                f"{n_clusters}; lower n_folds, use a bagged forest (out-of-bag predictions), or "
                "set oob=False (in-sample predictions, which bias sigma2 low)")
        stride = min(stride, max(1, n_clusters))  # a class without clusters grows no member
    if trees:
        # at least one tree per residue class, so that every cluster trains the forest
        n_members = max(learner.n_estimators, stride)
        # as many trees as the classic out-of-bag prediction of n_estimators trees averages
        n_honest = math.ceil(learner.n_estimators * math.exp(-1))
    elif honest:
        n_members, n_honest = stride, n_folds - 1
    else:
        n_members, n_honest = 1, 0
    class_table = None
    if n_clusters is not None and 1 < stride and n_clusters < DEALT_CLUSTERS_PER_CLASS * stride:
        class_table = _dealt_classes(hashes, stride, seed)
    rounds_per_step = 0
    if is_warm_started(learner):
        rounds_per_step = max(1, math.ceil(_total_rounds(learner) / WARM_START_STEPS))
    rng = np.random.default_rng(seed)
    residues = rng.permutation(stride)[np.arange(n_members) % stride]
    seeds = rng.integers(0, np.iinfo(np.uint32).max, n_members, dtype=np.uint32)
    return MemberPlan(learner=learner, trees=trees, stride=stride, residues=residues, seeds=seeds,
                      n_honest=n_honest, class_table=class_table,
                      rounds_per_step=rounds_per_step)


def _dealt_classes(hashes: np.ndarray, stride: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ``hashes`` and the class dealt to each: clusters in the order of their hash
    mixed with the seed, class = position modulo ``stride`` (every class gets ``n // stride`` or
    one more clusters; the deal depends on the set of clusters and the seed only)."""
    with np.errstate(over="ignore"):
        shuffled = _mix(hashes ^ (np.uint64(seed) * _GOLDEN))
    classes = np.empty(len(hashes), dtype=np.int64)
    classes[np.argsort(shuffled, kind="stable")] = np.arange(len(hashes)) % stride
    return hashes, classes


@dataclass(frozen=True)
class Piece:
    """The rows of one residue class within one block of rows.

    Attributes
    ----------
    keys : ndarray of shape (n_rows,), uint64
    X : ndarray of shape (n_rows, n_features)
    y : ndarray of shape (n_rows,)
        The working response (y - Z b for Gaussian fits).
    weights : ndarray of shape (n_rows,) or None
        The rows' working weights (binary and count fits); None weighs rows equally.
    """

    keys: np.ndarray
    X: np.ndarray
    y: np.ndarray
    weights: np.ndarray | None = None


def training_pieces(plan: MemberPlan, *, X: np.ndarray, y: np.ndarray, keys: np.ndarray,
                    residue_of_row: np.ndarray, weights: np.ndarray | None = None
                    ) -> dict[int, Piece]:
    """Split one block's rows into the pieces that the plan's members train on.

    Parameters
    ----------
    plan : MemberPlan
    X : ndarray of shape (n_rows, n_features)
    y : ndarray of shape (n_rows,)
        Working response.
    keys : ndarray of shape (n_rows,), uint64
    residue_of_row : ndarray of shape (n_rows,)
    weights : ndarray of shape (n_rows,), optional

    Returns
    -------
    dict
        Residue class -> :class:`Piece`, for the classes that have members and rows here.
    """
    X = X.astype(plan.feature_dtype, copy=False)
    pieces = {}
    for residue in np.unique(plan.residues):
        rows = np.flatnonzero(residue_of_row == residue)
        if len(rows):
            pieces[int(residue)] = Piece(keys=keys[rows], X=X[rows], y=y[rows],
                                         weights=None if weights is None else weights[rows])
    return pieces


def _member(plan: MemberPlan, member: int) -> BaseEstimator:
    seed = int(plan.seeds[member]) & 0x7FFFFFFF
    if plan.trees:
        params = plan.learner.get_params(deep=False)
        tree_params = {name: params[name] for name in _TREE_PARAMS if name in params}
        return type(plan.learner.estimator)(**tree_params, random_state=seed)
    learner = clone(plan.learner)
    if "random_state" in learner.get_params(deep=False):
        learner.set_params(random_state=seed)
    return learner


def fit_members(plan: MemberPlan, members: np.ndarray, *pieces: Piece,
                previous: list[list[tuple[int, BaseEstimator]]] = ()
                ) -> list[tuple[int, BaseEstimator]]:
    """Fit ``members`` (all of one residue class) on the pieces of that class.

    The pieces are put in the order of their row keys first, so a member sees its rows in the
    same order however the rows were partitioned (and a warm-started member the same rows in
    the same order in every M-step).

    ``None`` stands for a block with no row of the class (one holding rows of spread
    clusters is asked for every class).

    Parameters
    ----------
    plan : MemberPlan
    members : ndarray of shape (n_members,)
    *pieces : Piece or None
    previous : list of lists of (member index, fitted member), optional
        Chunks of the M-step before that hold these members' fits, to which warm-started members
        add a stage (:attr:`MemberPlan.rounds_per_step`; the pieces' response is then what the
        earlier stages left, :attr:`StagePredictions.own`).

    Returns
    -------
    list of (member index, fitted member)
        A tree whose Poisson bootstrap drew no row (possible on a handful of rows) is left out.
    """
    pieces = [p for p in pieces if p is not None]
    if not pieces:
        return []
    keys = np.concatenate([p.keys for p in pieces])
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    X = np.concatenate([p.X for p in pieces])[order]
    y = np.concatenate([p.y for p in pieces])[order]
    weights = None if pieces[0].weights is None else np.concatenate(
        [p.weights for p in pieces])[order]
    grown_fits = {index: fit for chunk in previous for index, fit in chunk}
    fitted = []
    for member in members:
        if plan.trees:
            counts = _bootstrap_counts(keys, int(plan.seeds[member]))
            rows = np.flatnonzero(counts)
            if not len(rows):  # a tree whose bootstrap drew no row (tiny data) is not grown
                continue
            sample_weight = counts[rows] if weights is None else counts[rows] * weights[rows]
            estimator = _member(plan, member).fit(X[rows], y[rows], sample_weight=sample_weight)
        else:
            grown = grown_fits.get(int(member))
            estimator = _fit_fold_member(plan, member, X, y, weights, grown=grown)
        fitted.append((int(member), estimator))
    return fitted


def _fit_fold_member(plan: MemberPlan, member: int, X: np.ndarray, y: np.ndarray,
                     weights: np.ndarray | None = None, *, grown: BoostingStages | None = None):
    """Fit one member of a cross-fit (or the one in-sample member), saying which rows it had
    when the learner refuses them (LightGBM needs at least 2 rows, for instance).

    A warm-started member is ``grown``, its fit of the M-step before (None in the first), with
    one more stage fitted to ``y``; ``grown`` is returned as it is once it holds all its
    rounds."""
    estimator = _member(plan, member)
    stages = [] if grown is None else list(grown.stages)
    if plan.rounds_per_step:
        if len(stages) == plan.growing_steps:
            return grown
        # weighted fits only: scikit-learn bins them by weighted percentiles at every stage
        # (bench/results/families.md); unweighted, its own binning was faster (2M rows)
        bins = grown.bins if grown is not None else (
            None if weights is None else FeatureBins().fit(X))
        if bins is not None:
            X = bins.transform(X)
        rounds = min(plan.rounds_per_step,
                     _total_rounds(plan.learner) - plan.rounds_per_step * len(stages))
        seed = (int(plan.seeds[member]) + len(stages)) & 0x7FFFFFFF  # stages draw apart
        estimator.set_params(**{_round_parameter(plan.learner): rounds, "warm_start": False},
                             **({"random_state": seed}
                                if "random_state" in estimator.get_params(deep=False) else {}))
    try:
        if weights is not None:
            estimator.fit(X, y, sample_weight=weights)
        else:
            estimator.fit(X, y)
        return BoostingStages([*stages, estimator], bins) if plan.rounds_per_step else estimator
    except ValueError as error:
        raise ValueError(
            f"{type(plan.learner).__name__} could not be fitted on the {len(y)} rows of one "
            f"member's fold ({error}); with this little data use more rows per cluster or "
            "fewer folds (n_folds), a bagged forest, or oob=False") from None


def _predict(member: BaseEstimator, X: np.ndarray, trees: bool) -> np.ndarray:
    """A fitted learner's prediction as a float vector of shape (n_rows,); a single tree skips
    scikit-learn's input check (its rows are float32 already)."""
    if trees:
        return member.predict(X, check_input=False)
    return np.asarray(member.predict(X), dtype=float).reshape(-1)


def _prediction_order(plan: MemberPlan, fitted: list[tuple[int, BaseEstimator]],
                      X: np.ndarray, residue_of_row: np.ndarray) -> np.ndarray:
    """The order in which :func:`honest_predictions` predicts a block's rows: grouped by residue
    class, so that a member predicts each class it serves as one slice, and for tree members,
    within a class in the order of the leaves of one of the trees.

    A deep tree is bigger than a core's caches, so rows predicted in random order miss the cache
    at almost every node on their way down. Rows that share a leaf of one tree of the forest
    take similar paths down the others (the trees split on the same strong features), and the
    depth-first numbering of scikit-learn's nodes puts neighbouring leaves next to each other: in
    that order the same predictions run 2.5 to 3 x faster (1M rows, 3 or 10 features, trees of
    78,000 rows), for the price of one more tree's prediction. The order changes no prediction.

    Returns
    -------
    ndarray of shape (n_rows,)
        Row indices, a permutation.
    """
    if plan.trees and fitted:
        leaves = fitted[0][1].apply(X, check_input=False)
        return np.lexsort((leaves, residue_of_row))
    return np.argsort(residue_of_row, kind="stable")


def honest_predictions(plan: MemberPlan, fitted: list[tuple[int, BaseEstimator]], *,
                       X: np.ndarray, keys: np.ndarray, residue_of_row: np.ndarray) -> np.ndarray:
    """Each row's average over the members of :meth:`MemberPlan.honest_members` of its class that
    did not train on it.

    Rows that no such member missed (all rows, for one in-sample member) get the average of all
    members. The rows are grouped by class first, so a member predicts each class it serves as
    one contiguous block (only its own class's out-of-bag rows are picked out one by one), and
    trees predict them in the cache-friendly order of :func:`_prediction_order`.

    Parameters
    ----------
    plan : MemberPlan
    fitted : list of (member index, fitted member)
        At least the members of :meth:`MemberPlan.members_serving` for this block's classes
        (every member of the plan will do).
    X : ndarray of shape (n_rows, n_features)
    keys, residue_of_row : ndarray of shape (n_rows,)

    Returns
    -------
    predictions : ndarray of shape (n_rows,)
    n_in_sample : int
        Rows that no honest member served, predicted in-sample (all rows of an in-sample plan).
    """
    X = np.asarray(X, dtype=plan.feature_dtype)
    order = _prediction_order(plan, fitted, X, residue_of_row)
    X = np.ascontiguousarray(X[order])
    keys, residue_of_row = keys[order], residue_of_row[order]
    classes, starts = np.unique(residue_of_row, return_index=True)
    blocks = [slice(start, stop) for start, stop in zip(starts, [*starts[1:], len(X)])]
    serves = np.zeros((plan.n_members, len(classes)), dtype=bool)
    for column, residue in enumerate(classes):
        serves[plan.honest_members(int(residue)), column] = True
    honest_total = np.zeros(len(X))
    n_honest = np.zeros(len(X))
    for member, estimator in fitted:
        for column in np.flatnonzero(serves[member]):
            rows = blocks[column]
            if classes[column] == plan.residues[member]:  # own class: where the bootstrap missed
                rows = rows.start + np.flatnonzero(
                    plan.in_bag(member, keys[rows], residue_of_row[rows]) == 0)
            X_rows = X[rows]
            if len(X_rows):
                honest_total[rows] += _predict(estimator, X_rows, plan.trees)
                n_honest[rows] += 1
    unserved = np.flatnonzero(n_honest == 0)
    if len(unserved):
        honest_total[unserved] = np.mean(
            [_predict(estimator, X[unserved], plan.trees) for _, estimator in fitted], axis=0)
        n_honest[unserved] = 1
    predictions = np.empty(len(X))
    predictions[order] = honest_total / n_honest
    return predictions, len(unserved)


def predict_fixed_effects(model: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """``model.predict(X)`` as a float vector; a bagged forest predicts the rows in the leaf
    order of its first tree (faster on many rows, see :func:`_prediction_order`) and adds its
    trees in their order (:func:`_forest_mean`), so a prediction is the same bits every time.

    Parameters
    ----------
    model : fitted estimator
    X : ndarray of shape (n_rows, n_features)

    Returns
    -------
    ndarray of shape (n_rows,)
    """
    if not is_bagged_forest(model):
        return _predict(model, X, trees=False)
    X = np.asarray(X, dtype=np.float32)
    order = np.argsort(model.estimators_[0].apply(X, check_input=False), kind="stable")
    prediction = np.empty(len(X))
    prediction[order] = _forest_mean(model, X[order])
    return prediction


def _forest_mean(model: BaseEstimator, X: np.ndarray) -> np.ndarray:
    """The mean of a forest's trees at X (float32), the trees added in their order.

    scikit-learn's ``predict`` adds the trees in the order its threads finish, so its last bits
    vary from call to call; here the threads split the rows instead, and each adds every tree.
    """
    n_jobs = min(joblib.effective_n_jobs(model.n_jobs), max(1, len(X) // _ROWS_PER_THREAD))
    bounds = np.linspace(0, len(X), n_jobs + 1).astype(int)

    def mean(rows: slice) -> np.ndarray:
        total = np.zeros(rows.stop - rows.start)
        for tree in model.estimators_:
            total += tree.predict(X[rows], check_input=False)
        return total / len(model.estimators_)
    return np.concatenate(joblib.Parallel(n_jobs=n_jobs, prefer="threads")(
        joblib.delayed(mean)(slice(start, stop)) for start, stop in zip(bounds[:-1], bounds[1:])))


class BoostingStages(RegressorMixin, BaseEstimator):
    """A warm-started member: the sum of its stages, each a boosting fitted to what the stages
    before it left of one M-step's working response, on the member's binned features.

    Parameters
    ----------
    stages : list of fitted estimators
    bins : FeatureBins or None
        The member's bins, fitted on its rows in its first M-step (weighted fits); None: the
        stages take the features as they are.
    """

    def __init__(self, stages=(), bins=None):
        self.stages = stages
        self.bins = bins

    def predict(self, X):
        """Sum of the stages' predictions, shape (n_samples,)."""
        if self.bins is not None:
            X = self.bins.transform(X)
        return np.sum([_predict(stage, X, trees=False) for stage in self.stages], axis=0)

    def first(self, n_stages: int) -> "BoostingStages":
        """The member as its first ``n_stages`` stages made it."""
        return BoostingStages(self.stages[:n_stages], self.bins)


@dataclass(frozen=True)
class StagePredictions:
    """A block's running sums of the warm-started members' stages at its rows.

    Attributes
    ----------
    n_stages : int
        The stages summed (every member has as many).
    own : ndarray of shape (n_rows,)
        The in-sample prediction of the member that trains on the row (of its residue class),
        which that member's next stage boosts from.
    honest : ndarray of shape (n_rows,)
        The honest prediction (:func:`honest_predictions` of the members' sums).
    n_in_sample : int
        Rows that no honest member served.
    """

    n_stages: int
    own: np.ndarray
    honest: np.ndarray
    n_in_sample: int


def advance_stages(plan: MemberPlan, fitted: list[tuple[int, BoostingStages]], *,
                   X: np.ndarray, keys: np.ndarray, residue_of_row: np.ndarray,
                   previous: StagePredictions | None = None) -> StagePredictions:
    """``previous`` plus the members' newest stage at one block's rows (``previous`` itself when
    the members have no stage it lacks).

    Both sums are linear in the stages, so adding the newest stage's honest and own predictions
    gives exactly the sums of whole members, at the cost of one stage.

    Parameters
    ----------
    plan : MemberPlan
    fitted : list of (member index, BoostingStages)
        The members of the block's classes and the members serving them (every member will do).
    X : ndarray of shape (n_rows, n_features)
    keys, residue_of_row : ndarray of shape (n_rows,)
    previous : StagePredictions, optional
        The sums of the stages before the newest; None before the first.

    Returns
    -------
    StagePredictions
    """
    done = 0 if previous is None else previous.n_stages
    n_stages = len(fitted[0][1].stages) if fitted else done
    if n_stages == done:
        return previous
    if n_stages != done + 1:
        raise ValueError(f"the members have {n_stages} stages and the block's sums {done}: an "
                         "M-step adds one stage")
    newest = [(member, BoostingStages(estimator.stages[-1:], estimator.bins))
              for member, estimator in fitted]
    honest, n_in_sample = honest_predictions(plan, newest, X=X, keys=keys,
                                             residue_of_row=residue_of_row)
    X = np.asarray(X, dtype=plan.feature_dtype)
    own = np.zeros(len(X))
    for member, stage in newest:
        rows = np.flatnonzero(residue_of_row == plan.residues[member])
        if len(rows):
            own[rows] += stage.predict(X[rows])
    if previous is not None:
        own += previous.own
        honest += previous.honest
    return StagePredictions(n_stages=n_stages, own=own, honest=honest, n_in_sample=n_in_sample)


def restaged(plan: MemberPlan, fitted: list[tuple[int, BoostingStages]], *, X: np.ndarray,
             keys: np.ndarray, residue_of_row: np.ndarray) -> StagePredictions | None:
    """The sums of every stage of ``fitted`` at one block's rows, added stage by stage as the
    M-steps that grew them added them (so a fit resumed with these members goes on with the
    same bits); None for members without stages.

    Parameters
    ----------
    plan : MemberPlan
    fitted : list of (member index, BoostingStages)
    X : ndarray of shape (n_rows, n_features)
    keys, residue_of_row : ndarray of shape (n_rows,)

    Returns
    -------
    StagePredictions or None
    """
    staged = None
    for n_stages in range(1, len(fitted[0][1].stages) + 1 if fitted else 1):
        grown = [(member, estimator.first(n_stages)) for member, estimator in fitted]
        staged = advance_stages(plan, grown, X=X, keys=keys, residue_of_row=residue_of_row,
                                previous=staged)
    return staged


class FoldEnsemble(RegressorMixin, BaseEstimator):
    """The average of learners fitted on disjoint folds of clusters (a cross-fit's model).

    Parameters
    ----------
    members : list of fitted estimators
    """

    def __init__(self, members=()):
        self.members = members

    def predict(self, X):
        """Average prediction of the members, shape (n_samples,)."""
        return np.mean([_predict(m, X, trees=False) for m in self.members], axis=0)

    @property
    def feature_importances_(self):
        return np.mean([m.feature_importances_ for m in self.members], axis=0)


def assemble_model(plan: MemberPlan, fitted: list[tuple[int, BaseEstimator]],
                   n_features: int) -> BaseEstimator:
    """The fitted learner made of every member: a forest of the trees, a :class:`FoldEnsemble`
    of a cross-fit's members, or the one in-sample member itself."""
    members = [estimator for _, estimator in sorted(fitted, key=lambda item: item[0])]
    if plan.trees:
        forest = clone(plan.learner).set_params(n_estimators=len(members), oob_score=False)
        forest.estimators_ = members
        forest.estimator_ = clone(plan.learner.estimator)
        forest.n_features_in_ = n_features
        forest.n_outputs_ = 1
        return forest
    if len(members) == 1:
        return members[0]
    return FoldEnsemble(members)
