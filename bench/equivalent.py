"""The plain fit that one EM iteration of merf-dask stands for: the cost ratio's denominator.

merf-dask's M-step fits the members that :func:`merf_dask.core.ensemble.plan_members` plans for the
data. A bagged forest's members are its trees, each on a Poisson bootstrap of the clusters of one
residue class modulo the plan's stride (``rows / stride`` rows in expectation, every class at
least one tree): the like-for-like plain forest has as many trees, each on ``max_samples =
rows / stride`` rows. A forest of the learner's trees on *all* rows would be about ``stride``
times dearer and is not what the M-step does. Any other learner is cross-fitted on disjoint folds
that together hold every row once: its like-for-like fit is one fit on all rows.

Both benchmarks (``run.py`` and ``scaling.py``) take the denominator from here, so a cost ratio
means the same in every table.
"""

from __future__ import annotations

import math

from sklearn.base import BaseEstimator, clone

from merf_dask import MERF
from merf_dask.core.ensemble import plan_members

__all__ = ["equivalent_plain_learner"]


def equivalent_plain_learner(learner: BaseEstimator, n_rows: int) -> tuple[BaseEstimator, dict]:
    """The plain learner that one M-step of merf-dask's defaults stands for on ``n_rows`` rows.

    Parameters
    ----------
    learner : estimator
        The unfitted fixed-effects learner.
    n_rows : int
        Training rows.

    Returns
    -------
    estimator
        A clone of ``learner``, with the M-step's tree count and rows per tree for a forest.
    dict
        The plan's ``stride``, ``n_members`` and ``rows_per_member`` (for the tables).
    """
    defaults = MERF()
    plan = plan_members(learner, honest=True, n_rows=n_rows, n_folds=defaults.n_folds,
                        member_rows=defaults.member_rows, seed=0)
    plain = clone(learner)
    if plan.trees:
        plain.set_params(n_estimators=plan.n_members,
                         max_samples=None if plan.stride == 1 else math.ceil(n_rows / plan.stride))
    shape = {"stride": plan.stride, "n_members": plan.n_members,
             "rows_per_member": n_rows / plan.stride}
    return plain, shape
