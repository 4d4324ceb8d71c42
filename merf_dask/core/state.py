"""What a fitted model knows, as one object: written by ``MERF.fit``, read and written by
:mod:`merf_dask.io.artifacts`, and turned into the estimator's fitted attributes in one place
(``MERF._set_state``).

Classes
-------
ModelState
"""

from __future__ import annotations

from dataclasses import dataclass

from sklearn.base import BaseEstimator

from .em import IterationRecord
from .random_effects import FactorEffects

__all__ = ["ModelState", "HONEST_KINDS"]

#: How f was predicted at the training rows inside EM.
HONEST_KINDS = ("out-of-bag", "cross-fitted", "in-sample", "partly in-sample")


@dataclass
class ModelState:
    """A fitted MERF.

    Attributes
    ----------
    fe_model : estimator
        The fitted fixed-effects learner.
    effects : list of FactorEffects
        Every grouping factor's levels, b, Var(b | y) and D, the partition factor first.
    sigma2 : float or None
        None for binary and count fits (no residual variance).
    history : list of IterationRecord
    n_rows : int
    converged : bool
    honest : str
        One of ``HONEST_KINDS``.
    feature_names : list of str
    x_named, z_named : bool
        X (Z) was a DataFrame at fit, whose column names prediction checks.
    formula_spec : merf_dask.formula.FormulaSpec or None
    design : merf_dask.formula.ModelDesign or None
        The fitted formula design (encoders and stateful transforms).
    n_partitions : int
    resumed_from : int
    classes : list or None
        A classifier's two labels of y (the second is the one whose probability is modelled).
    """

    fe_model: BaseEstimator
    effects: list[FactorEffects]
    sigma2: float | None
    history: list[IterationRecord]
    n_rows: int
    converged: bool
    honest: str
    feature_names: list[str]
    x_named: bool = False
    z_named: bool = False
    formula_spec: object | None = None
    design: object | None = None
    n_partitions: int = 1
    resumed_from: int = 0
    classes: list | None = None
