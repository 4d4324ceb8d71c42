"""The scikit-learn estimator :class:`MERF`.

``MERF`` fits y_i = f(X_i) + Z_i b_i + e_i with b_i ~ N(0, D), e_i ~ N(0, sigma2 I) by the EM
algorithm of Hajjem, Bellavance & Larocque (2014), with honest predictions of f inside EM: a
forest's out-of-bag predictions, as the authors' own code does, or cross-fitted predictions for
any other learner (:mod:`merf_dask.core.ensemble`).

Where the fit runs is decided by the input and the ``client`` parameter, never by ambient state
(as in dask-ml and LightGBM's Dask estimators):

* numpy / pandas input: in this process (:class:`~merf_dask.core.em.InMemoryEMData`), even while
  a ``distributed`` client is active, unless ``client=`` is given;
* Dask collections, or any input with ``client=``: on the cluster
  (:class:`~merf_dask.dask.em.DaskEMData`; the active client when none is given), with every
  cluster's rows in one partition, streamed from the source on every pass.

Both paths run the same loop (:func:`em.run_em`) on the same numerical core (:mod:`._core`,
:mod:`.ensemble`), and give the same model for the same seed.

Input is either merf 1.0's ``fit(X, Z, clusters, y)`` or, with ``formula=``, one frame
``fit(data)`` (a pandas or Dask DataFrame) described by an lme4 formula.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import posixpath
import uuid
import warnings
from numbers import Integral, Real

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.dummy import DummyRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import r2_score
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, has_fit_parameter

from .core import validation as check
from .core.random_effects import RandomFactor, random_effects_offset, variance_components
from .io.report import format_variance_components
from .io.checkpoint import fit_key, read_checkpoint, remove_checkpoint, write_checkpoint
from .core.em import MAX_CLUSTER_ROWS, InMemoryEMData, logger, run_em
from .core.families import BINOMIAL, FAMILIES
from .core.state import ModelState
from .core.ensemble import is_bagged_forest, plan_members, predict_fixed_effects
from .learners import default_learner, is_linear_model

__all__ = ["MERF", "SingularFitWarning"]

#: D is called singular (a boundary fit) when its smallest eigenvalue is below this fraction of
#: sigma2. lme4's ``isSingular`` asks 1e-4 of the standard-deviation ratio, but EM approaches a
#: boundary only like 1/iterations, so the variance ratio 1e-3 (a standard-deviation ratio of
#: about 0.03, a negligible random effect) is what a finished EM fit can show.
_SINGULAR_TOLERANCE = 1e-3

# internal column names of the one frame the distributed fit works on
_CLUSTER, _RESPONSE = "__cluster__", "__response__"


class SingularFitWarning(UserWarning):
    """The estimated random-effects covariance D is (nearly) singular: a boundary fit."""


def _is_dask(obj) -> bool:
    return hasattr(obj, "dask") and hasattr(obj, "npartitions")


@contextlib.contextmanager
def _bucketed_frame(frame, column: str, scratch, max_cluster_rows: int):
    """``frame`` written under ``scratch`` as a lake bucketed by ``column`` and read back (one
    partition per bucket, streamed); the lake is removed on exit."""
    from .io.filesystem import open_filesystem, url_of
    from .io.lake import read_lake, write_lake
    filesystem, root = open_filesystem(scratch)
    path = posixpath.join(root, f".merf-dask-fit-{uuid.uuid4().hex}")
    url = url_of(filesystem, path)
    logger.info("writing the training frame bucketed by cluster to %s for the fit", url)
    write_lake(frame, url, cluster_column=column, max_cluster_rows=max_cluster_rows)
    try:
        yield read_lake(url, cluster_column=column)
    finally:
        filesystem.rm(path, recursive=True)


def _active_client():
    from distributed import default_client
    try:
        return default_client()
    except ValueError:  # no client has been created in this process
        return None


class MERF(RegressorMixin, BaseEstimator):
    """Mixed Effects Random Forest, fitted by EM, in-process or on a Dask cluster.

    Parameters
    ----------
    fixed_effects_model : estimator, default=None
        Learner of the fixed effects f (any scikit-learn regressor, LightGBM or XGBoost's
        scikit-learn regressors included). None gives a random forest of 100 trees
        (:func:`merf_dask.learners.default_learner`). It is cloned, never modified or shared.
    formula : str, default=None
        lme4 formula such as ``"y ~ x1 * x2 + (1 + t | g) + (1 | h)"`` (several terms, nested
        ``a/b`` and crossed factors, ``||``, lme4's fixed-part syntax); then ``fit(data)`` and
        ``predict(data)`` take one DataFrame, and the fit sets ``formula_spec_`` (the parsed
        formula) and ``design_`` (its fitted design: encodings and stateful transforms). The
        first term's grouping factor is the one the data are partitioned by. See
        :mod:`merf_dask.formula` and docs/structures.md.
    family : {"gaussian", "binomial", "poisson"}, default="gaussian"
        The response: continuous (y = f + Z b + e), binary 0/1 (logit P(y = 1) = f + Z b) or
        counts (log E[y] = f + Z b). Binary and count fits maximise Laplace's approximation of
        the likelihood, as glmer does (:mod:`merf_dask.core.laplace`; the learner is fitted to
        a weighted working response, so it must take ``sample_weight``), in-process or on Dask,
        with nested factors and up to 3,000 crossed random effects for now. ``predict`` gives
        the probability or mean count. See :class:`MERFClassifier` for labels and
        docs/families.md.
    max_iterations : int, default=20
        Maximum number of EM iterations.
    tol : float, default=1e-3
        Stop when the relative change of the generalised log-likelihood (GLL) falls below
        ``tol``; 0 runs all ``max_iterations``.
    gll_early_stop_threshold : float, default=None
        merf 1.0's name of ``tol``, accepted so that merf 1.0 code runs unchanged; when given it
        is the stopping threshold (``tol`` must then keep its default).
    oob : "auto" or bool, default="auto"
        Use honest predictions of f at the training rows inside EM: out-of-bag predictions for a
        bagged forest, cross-fitted predictions (``n_folds`` members on disjoint folds of
        clusters) for any other learner. "auto" uses them except for linear models, whose
        in-sample fit is the maximum-likelihood estimate; False uses in-sample predictions
        (merf 1.0, which biases sigma2 low for forests). See :mod:`merf_dask.core.ensemble`.
    n_folds : int, default=2
        Folds of the cross-fit for learners that are not bagged forests: each row's honest
        prediction averages ``n_folds - 1`` members fitted without its cluster (there are more
        members, on smaller folds, when the data has more than ``n_folds * member_rows`` rows).
    member_rows : int or "auto", default="auto"
        The most rows one member (a tree, or a cross-fit's model) is fitted on, in expectation:
        bigger data gives each member a sample of whole clusters. Bounds the memory of every
        task and the size of each tree. "auto" is 100,000 rows per tree of a bagged forest and
        1,000,000 rows per member of a cross-fit (a cross-fit's model does not grow with its
        rows; its fit task holds a few copies of them, ~100 bytes per row with 3 features). A
        forest grows at least one tree per sample, so above ``n_estimators * member_rows`` rows
        it has more than ``n_estimators`` trees (256 at 20M rows by default) and every cluster
        trains it.
    max_cluster_rows : int, default=250,000
        A cluster (level of the first grouping factor) with more rows is *spread*: its rows
        are split over partitions and members by row, rather than held by one task, so a
        cluster with 40% of a lake's rows fits on workers with little memory. Its random
        effects are estimated exactly as any other's (its sums add across partitions, see
        :func:`merf_dask.core.em.spread_part`); its rows train the members of every residue
        class. The same on every backend and layout; lakes written by
        :func:`merf_dask.io.lake.write_lake` spread such clusters over buckets.
    accelerate : "auto" or bool, default="auto"
        Take a SQUAREM step (Varadhan & Roland 2008) on the variance components in EM
        iterations: two more E-steps from the iteration's honest residuals (no prediction of
        f), and many fewer iterations where EM crawls (components near zero, nested designs;
        lme4's Pastes: 20 iterations instead of 307). "auto" starts once EM crawls (its steps of
        sigma2 and D shrink by less than 10% per iteration three times in a row); False never.
        Accelerated iterations on Dask keep each partition's residuals on its worker during the
        iteration (8 bytes a row).
    random_state : int, RandomState instance or None, default=None
        Seeds every member; the same seed gives the same model whatever the number of workers
        and partitions.
    checkpoint : str, default=None
        File (local path or URL) written atomically after every EM iteration that does not end
        the fit. When it exists at the start and belongs to the same fit (same parameters and
        data size), the fit resumes after its iteration and ends with the same model; it is
        removed when the fit ends.
    client : distributed.Client, default=None
        Client of the cluster to fit on, for any input. None fits numpy / pandas input in this
        process and Dask collections on the active client.
    scratch : str or path-like, default=None
        Where a Dask DataFrame whose clusters span partitions (``dd.read_parquet`` of a lake
        laid out by day, say) is written once as a lake bucketed by the first grouping factor,
        for the fit to read out of core; a local path or URL every worker can reach. The copy
        is removed when the fit ends. None shuffles such a frame into worker memory (with a
        warning).

    Attributes
    ----------
    fe_model_ : estimator
        The fitted fixed-effects learner.
    random_effects_ : dict of str to DataFrame
        Per grouping factor (named as lme4 prints it: ``"g"``, ``"a:b"``), its random effects
        (BLUPs): a DataFrame indexed by level, one column per Z column (lme4's ``ranef``).
    random_effects_cov_ : dict of str to ndarray of shape (n_levels, q, q)
        Per grouping factor, the conditional covariances Var(b | y), rows in the order of
        ``random_effects_`` (``ranef(condVar = TRUE)``).
    variance_components_ : DataFrame
        Every variance and covariance in the layout of lme4's ``as.data.frame(VarCorr(m))``:
        columns ``grp``, ``var1``, ``var2``, ``vcov``, ``sdcor``; the ``Residual`` row last.
    b_, b_cov_, D_, z_names_ : DataFrame, ndarray, ndarray and list of str
        With one grouping factor (merf 1.0's names): ``b_`` its random effects indexed by
        cluster (n_clusters, q), ``b_cov_`` their conditional covariances (n_clusters, q, q),
        ``D_`` (q, q) their covariance, ``z_names_`` the Z columns' names; absent with several
        factors.
    sigma2_ : float
        Residual variance.
    gll_history_, sigma2_history_ : list of float
    D_history_ : list of ndarray of shape (q, q)
        D per iteration (with several grouping factors, the list of every factor's D).
    val_loss_history_ : list of float
        Validation MSE per iteration (empty without validation data).
    history_ : list of IterationRecord
        Everything logged per iteration, including timings.
    n_iter_ : int
    converged_ : bool
    oob_ : bool
        Whether honest (out-of-bag or cross-fitted) predictions were used inside EM.
    resumed_from_ : int
        The checkpointed iteration the fit resumed after (0 when it started afresh).
    n_rows_ : int
        Training rows.
    n_partitions_ : int
        Partitions the fit ran on (1 in-process).
    honest_kind_ : str
        How f was predicted at the training rows inside EM: "out-of-bag", "cross-fitted",
        "in-sample", or "partly in-sample" (honest members did not reach every row; the fit
        warns).
    state_ : merf_dask.core.state.ModelState
        Everything above as one object (what :meth:`save` writes and :meth:`load` reads).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Names of the features (formula columns, or X's DataFrame columns).

    Examples
    --------
    >>> from merf_dask import MERF
    >>> from merf_dask.simulate import simulate_frame
    >>> df = simulate_frame(n_rows=2000, n_clusters=50, seed=0)
    >>> model = MERF(formula="y ~ x1 + x2 + x3 + (1 | cluster)", random_state=0).fit(df)
    >>> model.predict(df).shape
    (2000,)
    """

    _parameter_constraints: dict = {
        "fixed_effects_model": [HasMethods(["fit", "predict"]), None],
        "formula": [str, None],
        "family": [StrOptions({"gaussian", *FAMILIES})],
        "max_iterations": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "gll_early_stop_threshold": [Interval(Real, 0, None, closed="left"), None],
        "oob": [StrOptions({"auto"}), "boolean"],
        "n_folds": [Interval(Integral, 2, None, closed="left")],
        "member_rows": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "max_cluster_rows": [Interval(Integral, 1, None, closed="left")],
        "accelerate": [StrOptions({"auto"}), "boolean"],
        "random_state": ["random_state"],
        "checkpoint": [str, os.PathLike, None],
        "client": [HasMethods(["submit", "gather"]), None],
        "scratch": [str, os.PathLike, None],
    }

    def __init__(self, fixed_effects_model=None, *, formula=None, family="gaussian",
                 max_iterations=20, tol=1e-3,
                 gll_early_stop_threshold=None, oob="auto", n_folds=2, member_rows="auto",
                 max_cluster_rows=MAX_CLUSTER_ROWS, accelerate="auto", random_state=None,
                 checkpoint=None, client=None, scratch=None):
        self.fixed_effects_model = fixed_effects_model
        self.formula = formula
        self.family = family
        self.max_iterations = max_iterations
        self.tol = tol
        self.gll_early_stop_threshold = gll_early_stop_threshold
        self.oob = oob
        self.n_folds = n_folds
        self.member_rows = member_rows
        self.max_cluster_rows = max_cluster_rows
        self.accelerate = accelerate
        self.random_state = random_state
        self.checkpoint = checkpoint
        self.client = client
        self.scratch = scratch

    # A client is shared, never copied: sklearn's clone deep-copies non-estimator parameters.
    def __sklearn_clone__(self):
        params = self.get_params(deep=False)
        return type(self)(**{name: value if name == "client" else clone(value, safe=False)
                             for name, value in params.items()})

    def __getstate__(self):
        state = super().__getstate__()
        state["client"] = None  # a client cannot travel with the model
        return state

    # ------------------------------------------------------------------ fit

    def fit(self, X, Z=None, clusters=None, y=None, X_val=None, Z_val=None, clusters_val=None,
            y_val=None):
        """Fit the model by EM.

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
            Fixed-effects features; with ``formula``, the one DataFrame holding every column
            (pandas or Dask), and Z, clusters and y are left out.
        Z : array-like or DataFrame of shape (n_samples, q)
            Random-effects design (a column of ones for a random intercept).
        clusters : array-like of shape (n_samples,)
            Cluster id of every row, of any hashable type.
        y : array-like of shape (n_samples,) or DataFrame with one column
        X_val, Z_val, clusters_val, y_val : optional
            Validation data (in memory); its MSE is recorded every iteration. With ``formula``,
            pass the validation frame as ``X_val``.

        Returns
        -------
        self : MERF
        """
        self._validate_params()
        tol = self._tol()
        learner = self._learner()
        honest = self._honest(learner)
        if self.formula is not None:
            data, validation = self._formula_training_data(X, Z, clusters, y, X_val)
        else:
            data, validation = self._array_training_data(X, Z, clusters, y, X_val, Z_val,
                                                         clusters_val, y_val)
        if not data["x_names"]:
            logger.info("the model has no features: f is a constant, the mean of y - Z b")
            learner, honest = DummyRegressor(), False
        family = self._family()
        if family is not None:
            self._check_family_fit(family, data, learner)
        # a bucketed copy of the training frame lives until the fit ends
        copies = contextlib.ExitStack()
        if data["distributed"] or self.client is not None:
            em_data, n_partitions = self._distributed_em_data(data, self.client or
                                                              _active_client(), copies)
        else:
            em_data = InMemoryEMData(X=data["X"], y=data["y"], Z=data["Z"], codes=data["codes"],
                                     levels=data["levels"], factors=data["factors"],
                                     max_cluster_rows=self.max_cluster_rows, family=family,
                                     # a forest's trees are fitted on threads here; any
                                     # other learner parallelises itself, one member at a time
                                     n_jobs=learner.n_jobs if is_bagged_forest(learner) else None)
            n_partitions = 1
        seed, start, on_state = self._checkpointing(em_data)
        plan = plan_members(learner, honest=honest, n_rows=em_data.n_rows,
                            n_folds=self.n_folds, member_rows=self.member_rows, seed=seed,
                            cluster_hashes=em_data.cluster_hashes)
        if start is not None and start.members is None and plan.rounds_per_step:
            logger.warning("the checkpoint %s holds no members of the warm-started learner: "
                           "starting afresh", self.checkpoint)
            start = None
        with copies:
            result = run_em(em_data, plan=plan, max_iterations=self.max_iterations, tol=tol,
                            validation_mse=validation, start=start, on_state=on_state,
                            accelerate=self.accelerate)
        if self.checkpoint is not None:
            remove_checkpoint(self.checkpoint)
        self._set_state(ModelState(
            fe_model=result.fe_model, effects=result.effects,
            sigma2=None if family is not None else result.sigma2,
            history=result.history, n_rows=result.n_rows, converged=result.converged,
            honest=self._honest_kind(plan, result), feature_names=data["x_names"],
            x_named=data["x_named"], z_named=data["z_named"],
            formula_spec=data.get("formula_spec"), design=data.get("design"),
            n_partitions=n_partitions, resumed_from=start.iteration if start else 0))
        self._warn_about(result, tol)
        return self

    def _tol(self) -> float:
        """The stopping threshold: ``tol``, or merf 1.0's ``gll_early_stop_threshold``."""
        if self.gll_early_stop_threshold is None:
            return self.tol
        if self.tol != 1e-3:
            raise ValueError(f"gll_early_stop_threshold={self.gll_early_stop_threshold} and "
                             f"tol={self.tol} are the same setting (merf 1.0's name and "
                             "this one); give only one")
        return self.gll_early_stop_threshold

    def _family(self):
        """The response family (:mod:`merf_dask.core.families`); None for Gaussian fits."""
        return None if self.family == "gaussian" else FAMILIES[self.family]

    def _check_family_fit(self, family, data, learner) -> None:
        """Refuse what a binary or count fit cannot take yet (the EM data check y against the
        family and refuse too many crossed random effects, where the rows are)."""
        if self.checkpoint is not None:
            raise ValueError(f"checkpoint= is for Gaussian fits for now: a {self.family} fit's "
                             "next M-step needs the working response of its last E-step, "
                             "which a checkpoint does not hold")
        if not has_fit_parameter(learner, "sample_weight"):
            raise ValueError(f"family={self.family!r} fits the learner to a weighted working "
                             f"response: {type(learner).__name__}.fit takes no sample_weight")

    def _checkpointing(self, em_data):
        """The fit's seed, the state to resume from (or None) and the checkpoint writer (or
        None); a resumed fit takes its seed from the checkpoint, so that ``random_state=None``
        resumes the same fit too."""
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        if self.checkpoint is None:
            return seed, None, None
        parameters = {k: v for k, v in self.get_params(deep=False).items()
                      if k not in ("client", "checkpoint", "scratch")}
        key = fit_key(parameters, n_rows=em_data.n_rows, n_clusters=em_data.n_clusters)
        found = read_checkpoint(self.checkpoint, key=key)
        start = None
        if found is not None:
            start, seed = found
            logger.warning("resumed from the checkpoint %s after iteration %d", self.checkpoint,
                           start.iteration)
        return seed, start, functools.partial(write_checkpoint, self.checkpoint, key=key,
                                              seed=seed)

    def _learner(self):
        if self.fixed_effects_model is None:
            return default_learner(random_state=self.random_state, family=self.family)
        return clone(self.fixed_effects_model)

    def _honest(self, learner) -> bool:
        if self.oob == "auto":
            return not is_linear_model(learner)
        return bool(self.oob)

    def _array_training_data(self, X, Z, clusters, y, X_val, Z_val, clusters_val, y_val):
        if Z is None or clusters is None or y is None:
            raise ValueError("fit(X, Z, clusters, y) needs Z, clusters and y "
                             "(or set formula= and pass one DataFrame)")
        inputs = (X, Z, clusters, y)
        if any(map(_is_dask, inputs)):
            if not all(map(_is_dask, inputs)):
                raise ValueError("X, Z, clusters and y must all be Dask collections or none")
            return self._dask_array_training_data(X, Z, clusters, y), self._validation_mse(
                X_val, Z_val, clusters_val, y_val)
        return _in_memory_data(X, [Z], [clusters], y), self._validation_mse(
            X_val, Z_val, clusters_val, y_val)

    def _dask_array_training_data(self, X, Z, clusters, y):
        import dask.dataframe as dd
        x_names = [str(c) for c in X.columns]
        z_names = [str(c) for c in Z.columns] if hasattr(Z, "columns") else ["Z0"]
        z_columns = [f"Z[{name}]" for name in z_names]
        frame = dd.map_partitions(_combine_columns, X, Z, clusters, y, x_names=x_names,
                                  z_columns=z_columns, align_dataframes=False,
                                  meta=_em_frame_meta(x_names, [z_columns], [clusters.dtype]))
        return dict(distributed=True, frame=frame, x_columns=x_names, z_columns=[z_columns],
                    factors=[_array_factor(z_names)], x_names=x_names, x_named=True,
                    z_named=hasattr(Z, "columns"))

    def _formula_training_data(self, data, Z, clusters, y, data_val):
        from .formula import ModelDesign, parse_formula
        if Z is not None or clusters is not None or y is not None:
            raise ValueError("with formula=, fit(data) takes one DataFrame; Z, clusters and y "
                             "come from the formula")
        data = _as_frame(data)
        spec = parse_formula(self.formula, columns=[str(c) for c in data.columns])
        design = ModelDesign(spec).fit(data, full_design=is_linear_model(self._learner()))
        factors = _design_factors(design)
        described = dict(formula_spec=spec, design=design, factors=factors,
                         x_names=list(design.x_names), x_named=False, z_named=False)
        validation = None
        if data_val is not None:
            validation = self._validation(*_design_arrays(design, _as_frame(data_val)))
        if _is_dask(data):
            x_columns, z_columns = _em_columns(design.x_names, factors)
            frame = data.map_partitions(
                _formula_partition, design=design, x_columns=x_columns, z_columns=z_columns,
                meta=_em_frame_meta(x_columns, z_columns,
                                    [_group_dtype(data, f.columns) for f in design.factors]))
            return dict(distributed=True, frame=frame, x_columns=x_columns,
                        z_columns=z_columns, **described), validation
        X_, Z_, groups, y_ = _design_arrays(design, data)
        return {**_in_memory_data(X_, Z_, groups, y_, factors=factors, **_design_names(design)),
                **described}, validation

    def _validation_mse(self, X_val, Z_val, clusters_val, y_val):
        given = [v is not None for v in (X_val, Z_val, clusters_val, y_val)]
        if not any(given):
            return None
        if not all(given):
            raise ValueError("validation needs all of X_val, Z_val, clusters_val and y_val")
        return self._validation(X_val, [Z_val], [clusters_val], y_val, names=_VALIDATION_NAMES)

    def _validation(self, X_val, Z_val, groups_val, y_val, *, names=None):
        """The validation MSE of an EM iterate, as a function of (fe_model, effects)."""
        names = names or {}
        X_val, _ = check.check_matrix(X_val, name=names.get("x", "X"))
        Z_val = [check.check_matrix(Zk, name=names.get("z", "Z"))[0] for Zk in Z_val]
        ids_val = [check.check_clusters(g, name=names.get("clusters", "clusters"))
                   for g in groups_val]
        y_val = check.check_vector(y_val, name=names.get("y", "y"))
        check.check_same_length(X_val=X_val, Z_val=Z_val[0], clusters_val=ids_val[0],
                                y_val=y_val)

        def validation_mse(fe_model, effects):
            codes = [levels.get_indexer(ids) for (levels, _), ids in zip(effects, ids_val)]
            prediction = (predict_fixed_effects(fe_model, X_val)
                          + random_effects_offset(Z_val, [b for _, b in effects], codes))
            return float(np.mean((y_val - prediction) ** 2))
        return validation_mse

    def _distributed_em_data(self, data, client, copies: contextlib.ExitStack):
        from .dask.em import DaskEMData
        from .dask.partitioning import ensure_cluster_partitions
        if client is None:
            raise ValueError("a fit on Dask collections needs a dask.distributed Client: "
                             "create one (Client()) or pass client=")
        if data["distributed"]:
            frame, x_columns, z_columns = data["frame"], data["x_columns"], data["z_columns"]
            aligned = ensure_cluster_partitions(frame, _factor_column(0),
                                                max_cluster_rows=self.max_cluster_rows)
            if aligned is not frame and self.scratch is not None:
                aligned = copies.enter_context(_bucketed_frame(
                    frame, _factor_column(0), self.scratch, self.max_cluster_rows))
            elif aligned is not frame:
                warnings.warn("the data is not partitioned by cluster: it was shuffled once and "
                              "is held in worker memory; to fit data larger than memory, pass "
                              "scratch= (a bucketed copy is written there for the fit) or fit "
                              "a lake bucketed by cluster (merf_dask.io.lake.bucket_lake)",
                              UserWarning, stacklevel=3)
                aligned = client.persist(aligned)
            partitions = aligned.to_delayed()
        else:
            x_columns, z_columns = _em_columns([f"X{i}" for i in range(data["X"].shape[1])],
                                               data["factors"])
            partitions = client.scatter(_cluster_partitions(
                data, x_columns=x_columns, z_columns=z_columns,
                n_partitions=2 * max(1, len(client.scheduler_info()["workers"]))))
        em_data = DaskEMData(client=client, partitions=partitions, x_columns=x_columns,
                             z_columns=z_columns, factors=data["factors"],
                             factor_columns=[_factor_column(k) for k in range(len(z_columns))],
                             y_column=_RESPONSE, max_cluster_rows=self.max_cluster_rows,
                             family=self._family())
        return em_data, len(partitions)

    def _set_state(self, state: ModelState) -> "MERF":
        """Make ``state`` this model's fitted state: the one place the fitted attributes are set
        (by fit and by load)."""
        self.state_ = state
        self.fe_model_ = state.fe_model
        self.random_effects_ = {e.factor.name: _effects_frame(e) for e in state.effects}
        self.random_effects_cov_ = {e.factor.name: e.b_cov for e in state.effects}
        self.variance_components_ = variance_components(state.effects, state.sigma2)
        self.sigma2_ = state.sigma2
        for name in ("b_", "b_cov_", "D_", "z_names_"):
            self.__dict__.pop(name, None)  # a refit with several factors has none of these
        if len(state.effects) == 1:  # merf 1.0's single-factor attributes
            (effects,) = state.effects
            self.b_ = self.random_effects_[effects.factor.name].rename_axis("cluster")
            self.b_cov_ = effects.b_cov
            self.D_ = effects.D
            self.z_names_ = list(effects.factor.z_names)
        self.history_ = state.history
        self.gll_history_ = [r.gll for r in state.history]
        self.sigma2_history_ = [r.sigma2 for r in state.history]
        # merf 1.0's D per iteration with one factor; the list of every factor's D with several
        self.D_history_ = [r.D[0] if len(r.D) == 1 else list(r.D) for r in state.history]
        self.val_loss_history_ = [r.val_mse for r in state.history if r.val_mse is not None]
        self.n_iter_ = len(state.history)
        self.n_rows_ = state.n_rows
        self.converged_ = state.converged
        self.honest_kind_ = state.honest
        self.oob_ = state.honest != "in-sample"
        self.n_features_in_ = len(state.feature_names)
        self.feature_names_in_ = np.asarray(state.feature_names, dtype=object)
        self.n_partitions_ = state.n_partitions
        self.resumed_from_ = state.resumed_from
        if state.formula_spec is not None:
            self.formula_spec_, self.design_ = state.formula_spec, state.design
        if state.classes is not None:
            self.classes_ = np.asarray(state.classes)
        return self

    @staticmethod
    def _honest_kind(plan, result) -> str:
        if not plan.n_honest:
            return "in-sample"
        if result.n_in_sample:
            return "partly in-sample"
        return "out-of-bag" if plan.trees else "cross-fitted"

    def _warn_about(self, result, tol: float) -> None:
        """The warnings a finished fit owes its user: no convergence, rows predicted in-sample
        although honest predictions were asked for, and a boundary or unidentified D."""
        if tol > 0 and not result.converged:
            warnings.warn(f"MERF did not converge in {self.max_iterations} iterations "
                          f"(relative GLL change {result.history[-1].relative_change:.2e} > "
                          f"tol={tol}); increase max_iterations", ConvergenceWarning,
                          stacklevel=3)
        if result.n_in_sample:
            warnings.warn(f"{result.n_in_sample} of {result.n_rows} training rows had no member "
                          "that did not train on them, so their f inside EM was predicted "
                          "in-sample (sigma2 is biased low); use more clusters or trees",
                          UserWarning, stacklevel=3)
        for effects, gram in zip(result.effects, result.design_gram):
            # a binary or count fit's D is on the scale of the linear predictor
            _warn_if_singular(effects, gram, 1.0 if self.sigma2_ is None else self.sigma2_)

    # -------------------------------------------------------------- predict

    def predict(self, X, Z=None, clusters=None, *, return_std=False, new_levels="average"):
        """Predict f(X) + sum_k Z_k b_k, with b = 0 for levels not seen in fit (binary and count
        fits: the probability or mean count at that linear predictor).

        Parameters
        ----------
        X : array-like or DataFrame of shape (n_samples, n_features)
            With ``formula``, the one DataFrame (pandas or Dask) holding every column.
        Z : array-like of shape (n_samples, q)
        clusters : array-like of shape (n_samples,)
        return_std : bool, default=False
            Also return the standard deviation of a new observation at each row: the square
            root of sigma2 plus, for every factor, z' Var(b | y) z at a known level and z' D z
            at a new one (the factors' conditional covariances are taken as independent).
            sigma2 comes from out-of-bag residuals, so it includes the forest's own error.
            Binary and count fits: the standard deviation of the probability or mean count
            over the same distribution of the random effects (b ~ N(b_hat, Var(b | y)) at a
            known level, N(0, D) at a new one, Laplace's normal approximation), the spread of
            the mean and not of the outcome itself (a 0/1 outcome's is sqrt(p (1 - p))).
        new_levels : {"average", "zero"}, default="average"
            Binary and count fits: a row with a level not seen in fit gets its probability or
            mean averaged over that level's random effects b ~ N(0, D) (the population-averaged
            prediction; "zero" takes b = 0, the prediction at the median level). Known levels
            use their b. Gaussian predictions are the same either way.

        Returns
        -------
        prediction : ndarray of shape (n_samples,), or a lazy Dask Series for Dask input
        std : ndarray of shape (n_samples,), only with ``return_std``; for Dask input the
            result is one lazy Dask DataFrame with columns ``prediction`` and ``prediction_std``
        """
        return self._predict(X, Z, clusters, return_std=return_std, new_levels=new_levels)

    def _predict(self, X, Z, clusters, **options):
        """Predictions of any input: ``options`` are ``_predict_design``'s."""
        check_is_fitted(self, "fe_model_")
        new_levels = options.get("new_levels", "average")
        if new_levels not in ("average", "zero"):
            raise ValueError(f"new_levels must be 'average' or 'zero', got {new_levels!r}")
        if self.formula is not None:
            return self._predict_formula(X, **options)
        if _is_dask(X):
            import dask.dataframe as dd
            return dd.map_partitions(_predict_partition, X, Z, clusters, model=_shipped(self),
                                     options=options, align_dataframes=False,
                                     meta=_prediction_meta(options.get("return_std", False)))
        return self._predict_rows(X, Z, clusters, **options)

    def _predict_rows(self, X, Z, clusters, **options):
        """Predictions of merf-style input (X, Z, clusters) of a model fitted on arrays."""
        if Z is None or clusters is None:
            raise ValueError("predict(X, Z, clusters) needs Z and clusters "
                             "(or fit with formula= and pass one DataFrame)")
        state = self.state_
        X, x_names = check.check_matrix(X, name="X", allow_empty=True)
        Z, z_names = check.check_matrix(Z, name="Z", allow_empty=True)
        ids = check.check_clusters(clusters, allow_empty=True)
        check.check_same_length(X=X, Z=Z, clusters=ids)
        if state.x_named:
            check.check_feature_names(x_names, state.feature_names, name="X")
        if state.z_named:
            check.check_feature_names(z_names, list(state.effects[0].factor.z_names), name="Z")
        return self._predict_design(X, [Z], [ids], **options)

    def _predict_design(self, X, Z, groups, *, return_std=False, new_levels="average",
                        link=False):
        """Predictions of checked input: the one path every kind of input takes (arrays, frames,
        formula designs, Dask partitions), so every input obeys the same rules: no missing or
        infinite values, no missing level, column names as in fit, any number of rows.

        ``Z`` and ``groups`` have one entry per grouping factor; ``link`` asks for the linear
        predictor f + Z b (b = 0 at new levels) of a binary or count fit.
        """
        effects = self.state_.effects
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, the model was fitted with "
                             f"{self.n_features_in_}")
        for Zk, e in zip(Z, effects):
            if Zk.shape[1] != e.factor.q:
                raise ValueError(f"Z has {Zk.shape[1]} columns, the model was fitted with "
                                 f"{e.factor.q} for {e.factor.name!r}")
        if not len(X):
            empty = np.empty(0)
            return (empty, empty.copy()) if return_std else empty
        codes = [e.levels.get_indexer(ids) for e, ids in zip(effects, groups)]
        # threads, not processes: Dask workers are daemons and cannot start joblib's process pool
        with joblib.parallel_config(backend="threading"):
            f_hat = predict_fixed_effects(self.fe_model_, X)
        prediction = f_hat + random_effects_offset(Z, [e.b for e in effects], codes)
        family = self._family()
        if family is not None and link:
            return prediction
        if family is not None:
            mean = self._family_mean(family, prediction, Z, codes, new_levels)
            if not return_std:
                return mean
            return mean, family.mean_spread(prediction, self._effects_variance(Z, codes))
        if not return_std:
            return prediction
        return prediction, np.sqrt(self.sigma2_ + self._effects_variance(Z, codes))

    def _effects_variance(self, Z, codes, *, known_levels: bool = True) -> np.ndarray:
        """The variance of every row's sum_k z_k' b_k: a new level's b is N(0, D), a known one's
        given y N(b_hat, Var(b | y)) (``known_levels=False`` counts new levels only); the
        factors are taken as independent.

        Returns
        -------
        ndarray of shape (n_rows,)
        """
        variance = np.zeros(len(codes[0]))
        for Zk, e, ck in zip(Z, self.state_.effects, codes):
            new = ck < 0
            variance[new] += np.einsum("np,pq,nq->n", Zk[new], e.D, Zk[new])
            if known_levels:
                variance[~new] += np.einsum("np,npq,nq->n", Zk[~new], e.b_cov[ck[~new]],
                                            Zk[~new])
        return variance

    def _family_mean(self, family, eta, Z, codes, new_levels):
        """The mean of y at linear predictors ``eta`` (b = 0 at new levels): with
        ``new_levels="average"``, averaged over the new levels' random effects."""
        if new_levels == "zero":
            return family.mean(eta)
        return family.averaged_mean(eta, self._effects_variance(Z, codes, known_levels=False))

    def _predict_formula(self, data, **options):
        if _is_dask(data):
            return data.map_partitions(_predict_formula_partition, model=_shipped(self),
                                       options=options,
                                       meta=_prediction_meta(options.get("return_std", False)))
        X, Z, groups, _ = _checked_design_arrays(self.design_, _as_frame(data),
                                                 require_response=False, allow_empty=True)
        return self._predict_design(X, Z, groups, **options)

    def score(self, X, Z=None, clusters=None, y=None):
        """R^2 of ``predict`` (with ``formula``: ``score(data)``, the response from the frame)."""
        check_is_fitted(self, "fe_model_")
        if self.formula is not None:
            X_, Z_, groups, y_ = _checked_design_arrays(self.design_, _as_frame(X))
            return r2_score(y_, self._predict_design(X_, Z_, groups))
        return r2_score(check.check_vector(y, name="y"), self.predict(X, Z, clusters))

    # ------------------------------------------------------------ artifacts

    def save(self, url, *, overwrite=False, storage_options=None, fingerprint=None, report=True):
        """Write the fitted model as a model directory (see :mod:`merf_dask.io.artifacts`).

        Parameters
        ----------
        url : str or path-like
            Local path or fsspec URL of the directory.
        overwrite : bool, default=False
            Replace an existing directory (otherwise ``FileExistsError``).
        storage_options : dict, optional
        fingerprint : dict, optional
            Description of the training data to record.
        report : bool, default=True
            Also write the HTML report (when matplotlib is installed).
        """
        from .io.artifacts import save_model
        check_is_fitted(self, "fe_model_")
        save_model(self.state_, self.get_params(deep=False), url, overwrite=overwrite,
                   storage_options=storage_options, fingerprint=fingerprint,
                   summary=self.summary() if report else None)

    def summary(self) -> str:
        """A text summary like statsmodels' ``summary()``: data, convergence, variance components
        (as variances, standard deviations and correlations), learner and feature importances."""
        check_is_fitted(self, "fe_model_")
        levels = ", ".join(f"{e.factor.name} {len(e.levels)}" for e in self.state_.effects)
        converged = "converged" if self.converged_ else "not converged"
        family = self._family()
        fit_lines = ([f"  final GLL:      {self.gll_history_[-1]:.6g}"] if family is None else [
            f"  family:         {family.name} ({'logit' if family is BINOMIAL else 'log'} link), "
            "Laplace",
            f"  log-likelihood: {self.history_[-1].log_likelihood:.6g}"])
        lines = [
            "Mixed Effects Random Forest (MERF)",
            f"  formula:        {self.formula or '(arrays: X, Z, clusters, y)'}",
            f"  rows:           {self.n_rows_}",
            f"  levels:         {levels}",
            f"  iterations:     {self.n_iter_} ({converged}, tol={self._tol()})",
            *fit_lines,
            f"  honest f in EM: {self.honest_kind_}",
            f"  learner:        {type(self.fe_model_).__name__}",
            "",
            *format_variance_components(self.variance_components_),
        ]
        importances = getattr(self.fe_model_, "feature_importances_", None)
        if importances is not None:
            lines += ["", "Feature importances"]
            for k in np.argsort(importances)[::-1]:
                lines.append(f"  {self.feature_names_in_[k]:<22}{importances[k]:>10.4f}")
        return "\n".join(lines)

    @classmethod
    def load(cls, url, *, storage_options=None, trusted=False):
        """Load a model directory, refusing one of another format version, whose manifest or
        files differ from the digests saved with them, or, while a signing key is set, that is
        unsigned or mis-signed (:mod:`merf_dask.io.signing`).

        The loaded model has the saved model's parameters (``get_params()``, the unfitted
        learner included) and fitted state, and ``manifest_``, the directory's manifest.

        Parameters
        ----------
        url : str or path-like
            Local path or fsspec URL of the directory.
        storage_options : dict, optional
        trusted : bool, default=False
            Also load a learner that can run code when it is loaded: one saved as a pickle
            (a learner of types merf-dask does not trust, see :mod:`merf_dask.io.learner_file`)
            or holding types outside :data:`merf_dask.io.learner_file.TRUSTED_TYPES`. Such a
            file can run arbitrary code: pass True only for model directories you or your
            pipeline wrote. The digests and the signature are checked either way.

        Raises
        ------
        merf_dask.io.learner_file.UntrustedModelError
            The learner could run code and ``trusted`` is False (a ``ValueError``).
        """
        from .io.artifacts import load_model
        params, state, manifest = load_model(url, storage_options=storage_options,
                                             trusted=trusted)
        model = cls(**params)._set_state(state)
        model.manifest_ = manifest
        return model

    # ----------------------------------------------------- merf 1.0 names

    @property
    def trained_fe_model(self):
        """merf 1.0 name of ``fe_model_``."""
        return self.fe_model_

    @property
    def trained_b(self):
        """merf 1.0 name of ``b_``."""
        return self.b_

    @property
    def gll_history(self):
        """merf 1.0 name of ``gll_history_``."""
        return self.gll_history_

    @property
    def sigma2_hat_history(self):
        """merf 1.0 name of ``sigma2_history_``."""
        return self.sigma2_history_

    @property
    def D_hat_history(self):
        """merf 1.0 name of ``D_history_``."""
        return self.D_history_

    @property
    def val_loss_history(self):
        """merf 1.0 name of ``val_loss_history_``."""
        return self.val_loss_history_


class MERFClassifier(ClassifierMixin, MERF):
    """Mixed-effects forest for binary outcomes: logit P(y = 1) = f(X) + sum_k Z_k b_k.

    :class:`MERF` with ``family="binomial"`` (its parameters, fitted attributes and inputs),
    fitted to Laplace's maximum likelihood (:mod:`merf_dask.core.laplace`), for y of any two
    labels.

    Attributes
    ----------
    classes_ : ndarray of shape (2,)
        The labels, sorted; ``predict_proba``'s second column is the second label's
        probability (the one modelled).
    """

    _parameter_constraints: dict = {**MERF._parameter_constraints,
                                    "family": [StrOptions({"binomial"})]}

    def __init__(self, fixed_effects_model=None, *, family="binomial", **parameters):
        super().__init__(fixed_effects_model, family=family, **parameters)

    def fit(self, X, Z=None, clusters=None, y=None, X_val=None, Z_val=None, clusters_val=None,
            y_val=None):
        """Fit the model; y (or the formula's response column) holds two labels of any type.

        Parameters and return value as :meth:`MERF.fit`.
        """
        self._validate_params()
        if self.formula is not None:
            from .formula import parse_formula
            frame = _as_frame(X)
            response = parse_formula(self.formula, columns=[str(c) for c in frame.columns]
                                     ).response
            if _is_dask(frame):
                X = frame.assign(**{response: self._dask_binary_labels(frame[response])})
                classes = self.classes_
            else:
                classes, encoded = _binary_labels(frame[response], name=response)
                X = frame.assign(**{response: encoded})
            if X_val is not None:
                X_val = _as_frame(X_val)
                X_val = X_val.assign(**{response: _binary_labels(
                    X_val[response], name=f"{response} of X_val", classes=classes)[1]})
        else:
            if _is_dask(y):
                y = self._dask_binary_labels(y)
                classes = self.classes_
            else:
                classes, y = _binary_labels(y, name="y")
            if y_val is not None:
                y_val = _binary_labels(y_val, name="y_val", classes=classes)[1]
        super().fit(X, Z, clusters, y, X_val, Z_val, clusters_val, y_val)
        return self._set_state(dataclasses.replace(self.state_, classes=list(classes)))

    def _dask_binary_labels(self, labels):
        """A Dask Series of labels as 0.0 / 1.0, its two labels checked and set as
        ``classes_`` (one pass over the column)."""
        import dask
        found, missing = dask.compute(labels.drop_duplicates(), labels.isna().sum())
        if missing:
            raise ValueError(f"{labels.name} has {int(missing)} missing labels")
        self.classes_, _ = _binary_labels(found.to_numpy(), name=str(labels.name))
        positive = self.classes_[1]
        return labels.map_partitions(lambda part: (part == positive).astype(float),
                                     meta=(labels.name, float))

    def _predict(self, X, Z, clusters, **options):
        check_is_fitted(self, "fe_model_")
        # the labels of a formula frame's response column are not the numbers MERF reads
        if self.formula is not None and self.formula_spec_.response in X.columns:
            X = X.drop(columns=[self.formula_spec_.response])
        return super()._predict(X, Z, clusters, **options)

    def predict_proba(self, X, Z=None, clusters=None, *, return_std=False,
                      new_levels="average"):
        """The probability of each label: array of shape (n_samples, 2), columns in the order
        of ``classes_`` (``return_std`` and ``new_levels`` as for :meth:`MERF.predict`: with
        ``return_std``, also the standard deviation of the probability, shape (n_samples,));
        for Dask input a lazy Dask DataFrame with one column per label (and
        ``probability_std``)."""
        result = self._predict(X, Z, clusters, return_std=return_std, new_levels=new_levels)
        if _is_dask(result):
            names = [str(label) for label in self.classes_]
            return result.map_partitions(_label_columns, names=names,
                                         meta=_label_columns(result._meta, names=names))
        probability = result[0] if return_std else result
        proba = np.column_stack([1.0 - probability, probability])
        return (proba, result[1]) if return_std else proba

    def predict(self, X, Z=None, clusters=None, *, new_levels="average"):
        """The more probable label of each row (``new_levels`` as for :meth:`MERF.predict`);
        for Dask input a lazy Dask Series."""
        probability = self._predict(X, Z, clusters, new_levels=new_levels)
        if _is_dask(probability):
            classes = self.classes_
            return probability.map_partitions(
                lambda p: pd.Series(classes[(p.to_numpy() > 0.5).astype(int)], index=p.index,
                                    name="prediction"),
                meta=pd.Series(dtype=classes.dtype, name="prediction"))
        return self.classes_[(probability > 0.5).astype(int)]

    def decision_function(self, X, Z=None, clusters=None):
        """The linear predictor f(X) + sum_k Z_k b_k (the log-odds of the second label; b = 0
        at levels not seen in fit), shape (n_samples,)."""
        return self._predict(X, Z, clusters, link=True)

    def score(self, X, Z=None, clusters=None, y=None):
        """Accuracy of ``predict`` (with ``formula``: ``score(data)``)."""
        check_is_fitted(self, "fe_model_")
        if self.formula is not None:
            y = _as_frame(X)[self.formula_spec_.response]
        return float(np.mean(self.predict(X, Z, clusters) == np.asarray(y)))


# scikit-learn reads an estimator's parameters from the signature of its __init__: the
# classifier's are MERF's, declared there once, with family fixed to "binomial"
MERFClassifier.__init__.__signature__ = inspect.signature(MERF.__init__).replace(parameters=[
    parameter.replace(default="binomial") if name == "family" else parameter
    for name, parameter in inspect.signature(MERF.__init__).parameters.items()])


def _binary_labels(values, *, name: str, classes=None) -> tuple[np.ndarray, np.ndarray]:
    """The two sorted labels of ``values`` (or the given ``classes``) and ``values`` as 0.0 /
    1.0 (1 for the second label)."""
    if isinstance(values, pd.DataFrame):
        if values.shape[1] != 1:
            raise ValueError(f"{name} must have one column, got {values.shape[1]}")
        values = values.iloc[:, 0]
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional, got shape {values.shape}")
    missing = pd.isna(values)
    if missing.any():
        raise ValueError(f"{name} has {int(missing.sum())} missing labels (first at row "
                         f"{int(np.flatnonzero(missing)[0])})")
    found = np.unique(values)
    if classes is None:
        if len(found) != 2:
            raise ValueError(f"{name} of a classifier must hold two labels, got {len(found)}: "
                             f"{found[:5].tolist()}")
        classes = found
    unknown = found[~np.isin(found, classes)]
    if len(unknown):
        raise ValueError(f"{name} holds the label {unknown[0]!r}, not one of the fit's "
                         f"{list(classes)}")
    return np.asarray(classes), (values == classes[1]).astype(float)


#: How the checks name merf-style validation data.
_VALIDATION_NAMES = dict(x="X_val", z="Z_val", clusters="clusters_val", y="y_val")


def _factor_column(k: int) -> str:
    """The distributed fit frame's column of factor k's levels (factor 0 partitions it)."""
    return _CLUSTER if k == 0 else f"__factor{k}__"


def _array_factor(z_names) -> RandomFactor:
    """The one grouping factor of a merf-style fit(X, Z, clusters, y)."""
    return RandomFactor(name="cluster", z_names=tuple(z_names))


def _design_factors(design) -> list[RandomFactor]:
    return [RandomFactor(name=f.name, z_names=tuple(f.z_names),
                         blocks=tuple(tuple(block) for block in f.blocks))
            for f in design.factors]


def _design_names(design) -> dict:
    """How the checks name a formula design's columns."""
    return dict(x_names=list(design.x_names), z_names=[list(f.z_names) for f in design.factors],
                group_names=[f"grouping column {f.name!r}" for f in design.factors])


def _design_arrays(design, frame):
    """(X, Z, groups, y) of a pandas frame through a fitted formula design."""
    arrays = design.transform(frame)
    return arrays.X, arrays.Z, arrays.groups, arrays.y


def _checked_design_arrays(design, frame, *, require_response=True, allow_empty=False):
    """:func:`_design_arrays` checked by the rules of every input (predict and score)."""
    arrays = design.transform(frame, require_response=require_response)
    names = _design_names(design)
    X, _ = check.check_matrix(arrays.X, name="X", allow_empty=allow_empty,
                              columns=names["x_names"], allow_no_columns=True)
    Z = [check.check_matrix(Zk, name="Z", allow_empty=allow_empty, columns=z_names)[0]
         for Zk, z_names in zip(arrays.Z, names["z_names"])]
    groups = [check.check_clusters(g, name=name, allow_empty=allow_empty)
              for g, name in zip(arrays.groups, names["group_names"])]
    y = check.check_vector(arrays.y, name=design.spec.response) if require_response else None
    return X, Z, groups, y


def _checked_design(X, Z, groups, y, *, x_names=None, z_names=None, group_names=None):
    """X, every factor's Z and level ids, and y checked by the rules of every fit
    (``x_names``, ``z_names`` and ``group_names`` name a formula design's columns in error
    messages), with the DataFrame column names of X and of the first Z (None for arrays)."""
    z_names = z_names or [None] * len(Z)
    group_names = group_names or ["clusters"] * len(groups)
    X, x_frame_names = check.check_matrix(X, name="X", columns=x_names,
                                          allow_no_columns=x_names is not None)
    checked_Z = [check.check_matrix(Zk, name="Z", columns=names, largest=check.LARGEST_VALUE)
                 for Zk, names in zip(Z, z_names)]
    ids = [check.check_clusters(g, name=name) for g, name in zip(groups, group_names)]
    y = check.check_vector(y, name="y")
    check.check_same_length(X=X, Z=checked_Z[0][0], clusters=ids[0], y=y)
    return X, [Zk for Zk, _ in checked_Z], ids, y, x_frame_names, checked_Z[0][1]


def _in_memory_data(X, Z, groups, y, *, factors=None, **names) -> dict:
    """The checked data of an in-memory fit (``names`` as for :func:`_checked_design`; without
    ``factors``, the merf-style fit's one factor named after Z's columns)."""
    X, Z, ids, y, x_frame_names, z_frame_names = _checked_design(X, Z, groups, y, **names)
    factorized = [pd.factorize(g, sort=False) for g in ids]
    if factors is None:
        factors = [_array_factor(z_frame_names or [f"Z{i}" for i in range(Z[0].shape[1])])]
    return dict(distributed=False, X=X, Z=Z, y=y,
                codes=[codes.astype(np.int64) for codes, _ in factorized],
                levels=[pd.Index(levels) for _, levels in factorized], factors=factors,
                x_names=x_frame_names or [f"X{i}" for i in range(X.shape[1])],
                x_named=x_frame_names is not None, z_named=z_frame_names is not None)


def _as_frame(data):
    if isinstance(data, pd.DataFrame) or _is_dask(data):
        return data
    raise ValueError(f"with formula=, data must be a pandas or Dask DataFrame, got "
                     f"{type(data).__name__}")


def _group_dtype(data, columns):
    """The dtype of a factor's level labels in a distributed fit's frame: the column's own, or
    strings for an interaction."""
    if len(columns) == 1:
        return data[columns[0]].dtype
    return pd.Series(["a"]).dtype


def _em_columns(x_names, factors) -> tuple[list[str], list[list[str]]]:
    """The distributed fit frame's X columns and every factor's Z columns."""
    return list(x_names), [[f"Z{k}[{name}]" for name in f.z_names]
                           for k, f in enumerate(factors)]


def _cluster_partitions(data, *, x_columns, z_columns, n_partitions) -> list[pd.DataFrame]:
    """In-memory training data cut into frames that each hold whole levels of factor 0."""
    groups = [np.asarray(levels, dtype=object)[codes]
              for levels, codes in zip(data["levels"], data["codes"])]
    frame = _em_frame(data["X"], data["Z"], groups, data["y"], x_columns=x_columns,
                      z_columns=z_columns)
    part_of_row = data["codes"][0] % min(n_partitions, len(data["levels"][0]))
    return [part for _, part in frame.groupby(part_of_row, sort=True)]


def _em_frame(X, Z, groups, y, *, x_columns, z_columns) -> pd.DataFrame:
    """The frame a distributed fit works on: X and every factor's Z columns and levels, and the
    response.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    Z : list of ndarray of shape (n_samples, q_k)
    groups : list of array-like of shape (n_samples,)
    y : ndarray of shape (n_samples,)
    x_columns : list of str
    z_columns : list of list of str
    """
    frame = pd.DataFrame(np.column_stack([X, *Z]),
                         columns=[*x_columns, *(c for columns in z_columns for c in columns)])
    for k, levels in enumerate(groups):
        frame[_factor_column(k)] = np.asarray(levels)
    frame[_RESPONSE] = np.asarray(y, dtype=float).reshape(-1)
    return frame


def _em_frame_meta(x_columns, z_columns, group_dtypes) -> pd.DataFrame:
    """The empty frame that tells Dask the columns and types of :func:`_em_frame` (inferring
    them would run the checks on Dask's made-up rows)."""
    return _em_frame(np.empty((0, len(x_columns))),
                     [np.empty((0, len(columns))) for columns in z_columns],
                     [pd.Series([], dtype=dtype) for dtype in group_dtypes], np.empty(0),
                     x_columns=x_columns, z_columns=z_columns)


def _checked_em_frame(X, Z, groups, y, *, x_columns, z_columns, **names) -> pd.DataFrame:
    """:func:`_em_frame` of one partition, checked by the rules of an in-memory fit (an empty
    partition passes: a filtered frame or an empty file has them)."""
    if len(X):  # checked as an in-memory fit's data, without its factorization; the ids go on
        # as given (the checked Series would cost a round trip through Arrow strings)
        X, Z, _, y, _, _ = _checked_design(X, Z, groups, y, **names)
    return _em_frame(np.asarray(X, dtype=float).reshape(len(X), len(x_columns)),
                     [np.asarray(Zk, dtype=float).reshape(len(X), len(columns))
                      for Zk, columns in zip(Z, z_columns)], groups, y,
                     x_columns=x_columns, z_columns=z_columns)


def _combine_columns(X, Z, clusters, y, *, x_names, z_columns) -> pd.DataFrame:
    """One partition of the distributed fit's frame from four Dask collections (on the
    workers)."""
    return _checked_em_frame(X, [Z], [clusters], y, x_columns=x_names, z_columns=[z_columns])


def _formula_partition(part, *, design, x_columns, z_columns) -> pd.DataFrame:
    """One partition of the distributed fit's frame from a formula (on the workers)."""
    X, Z, groups, y = _design_arrays(design, part)
    return _checked_em_frame(X, Z, groups, y, x_columns=x_columns, z_columns=z_columns,
                             **_design_names(design))


def _effects_frame(effects) -> pd.DataFrame:
    """A factor's b as lme4's ``ranef`` shows it: levels by Z columns."""
    return pd.DataFrame(effects.b, index=pd.Index(effects.levels, name=effects.factor.name),
                        columns=list(effects.factor.z_names))


def _warn_if_singular(effects, gram: np.ndarray, sigma2: float) -> None:
    """Warn about a factor whose design cannot inform D, or whose D is (nearly) singular."""
    factor = effects.factor
    gram_eigenvalues, gram_vectors = np.linalg.eigh(gram)
    if gram_eigenvalues[0] <= 1e-10 * max(gram_eigenvalues[-1], np.finfo(float).tiny):
        direction = gram_vectors[:, 0]
        columns = [name for name, weight in zip(factor.z_names, direction) if abs(weight) > 1e-6]
        warnings.warn(f"boundary (singular) fit: the random-effects design of {factor.name!r} "
                      f"has no variation in the direction of columns {columns} (all zero or "
                      "collinear), so the data cannot inform D there and it keeps its starting "
                      "value in that direction; drop one of those columns", SingularFitWarning,
                      stacklevel=4)
        return
    eigenvalues = np.linalg.eigvalsh(effects.D)
    if eigenvalues[0] <= _SINGULAR_TOLERANCE * sigma2:
        warnings.warn(f"boundary (singular) fit: the random-effects covariance of "
                      f"{factor.name!r} is nearly singular (eigenvalues "
                      f"{np.array2string(eigenvalues, precision=3)}, sigma2 {sigma2:.3g}); "
                      "consider fewer random-effect columns", SingularFitWarning, stacklevel=4)


def _label_columns(part, *, names: list[str]) -> pd.DataFrame:
    """One partition of a classifier's predictions (a probability Series, or a ``prediction`` /
    ``prediction_std`` frame) as one probability column per label, named ``names`` (and
    ``probability_std``)."""
    with_std = isinstance(part, pd.DataFrame)
    probability = part["prediction"] if with_std else part
    columns = {names[0]: 1.0 - probability, names[1]: probability}
    if with_std:
        columns["probability_std"] = part["prediction_std"]
    return pd.DataFrame(columns, index=part.index)


def _prediction_meta(return_std):
    if return_std:
        return pd.DataFrame({"prediction": pd.Series(dtype=float),
                             "prediction_std": pd.Series(dtype=float)})
    return ("prediction", float)


def _as_prediction_frame(result, index, return_std):
    if return_std:
        prediction, std = result
        return pd.DataFrame({"prediction": prediction, "prediction_std": std}, index=index)
    return pd.Series(result, index=index, name="prediction")


def _predict_partition(X, Z, clusters, *, model, options):  # merf-style Dask input
    result = model._predict_rows(X, Z, clusters, **options)
    return _as_prediction_frame(result, X.index, options.get("return_std", False))


def _predict_formula_partition(part, *, model, options):
    return _as_prediction_frame(model._predict_formula(part, **options), part.index,
                                options.get("return_std", False))


def _shipped(model):
    """The model as a future broadcast to the workers when a client is active (predicting Dask
    input), so a lazy prediction graph carries a reference instead of the pickled forest in
    every task."""
    client = model.client or _active_client()
    return model if client is None else client.scatter(model, broadcast=True, hash=False)
