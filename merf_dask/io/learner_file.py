"""The learner file of a model directory, written and read without unpickling by default.

A pickle runs whatever code it holds when it is loaded, so anyone who can write a model directory
could run code in every process that loads it. The learner (the fitted fixed-effects learner and
the unfitted one, a ``{"fitted": ..., "unfitted": ...}`` dict) is therefore written as

``learner.skops``
    a :mod:`skops.io` file (a zip of JSON and ``.npy`` arrays) when it holds only types of
    :data:`TRUSTED_TYPES` and skops's own defaults (Python's builtins, numpy arrays, dtypes and
    random generators, scikit-learn's public estimators). A fitted ``lightgbm.LGBMRegressor``
    travels in it as :class:`LightGBMText`: its attributes and its booster in LightGBM's own text
    model format, from which :meth:`LightGBMText.regressor` rebuilds it. skops constructs
    nothing before every type in the file has been checked against the trusted ones.
``learner.joblib``
    a joblib pickle, for any other learner (a class of your own, XGBoost, a pipeline around a
    LightGBM model, ...), with a warning at save time. Loading it needs ``trusted=True``.

Trusting a type means constructing it from the file's data. The tree types of scikit-learn
(:data:`TRUSTED_TYPES` names them) hold node indices that scikit-learn follows without bounds
checks, and LightGBM parses its text model in C++: a crafted file of trusted types cannot run
code, but it could crash the process or read memory out of bounds when it predicts. Signed model
directories (:mod:`merf_dask.io.signing`) close that too: only a holder of the key can write
one.

Names
-----
SKOPS_FILE, PICKLE_FILE
    The learner file's two names; the manifest says which one a directory holds.
TRUSTED_TYPES
    The types, beyond skops's defaults, that a learner file may hold.
UntrustedModelError
    A learner file refused because loading it could run code (a ``ValueError``).
LightGBMText
    A fitted LightGBM regressor as data.
dump_learner, load_learner
"""

from __future__ import annotations

import io
import sys
import warnings
import zipfile

import joblib
import skops.io

from ..core.binning import FeatureBins
from ..core.ensemble import BoostingStages, FoldEnsemble

__all__ = ["SKOPS_FILE", "PICKLE_FILE", "TRUSTED_TYPES", "UntrustedModelError", "LightGBMText",
           "dump_learner", "load_learner"]

SKOPS_FILE, PICKLE_FILE = "learner.skops", "learner.joblib"


class LightGBMText:
    """A fitted ``lightgbm.LGBMRegressor`` as data: every attribute but its booster, and the
    booster as LightGBM's text model (``Booster.model_to_string``), which keeps every split and
    leaf value exactly (LightGBM writes them with 17 significant digits).

    Parameters
    ----------
    attributes : dict
        The regressor's attributes (its parameters and fitted attributes) but ``_Booster``.
    model : str
        The booster's text model.
    """

    def __init__(self, *, attributes: dict, model: str):
        self.attributes = attributes
        self.model = model

    @classmethod
    def of(cls, regressor) -> LightGBMText:
        """The text form of a fitted ``lightgbm.LGBMRegressor``."""
        attributes = {name: value for name, value in vars(regressor).items() if name != "_Booster"}
        return cls(attributes=attributes, model=regressor.booster_.model_to_string())

    def regressor(self):
        """The fitted ``lightgbm.LGBMRegressor``, its booster parsed from the text model.

        Raises
        ------
        ImportError
            When LightGBM is not installed.
        """
        try:
            from lightgbm import Booster, LGBMRegressor
        except ImportError as error:
            raise ImportError("this model's learner is a LightGBM model: "
                              "pip install 'merf-dask[lightgbm]'") from error
        regressor = LGBMRegressor()
        regressor.__dict__.update(self.attributes)
        regressor._Booster = Booster(model_str=self.model)  # after the update, which cannot set it
        return regressor


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: Types a ``learner.skops`` file may hold beyond skops's defaults (which trust Python's builtins,
#: numpy arrays, dtypes and random generators, and scikit-learn's public estimators, the
#: regressors among them): merf-dask's ensemble, the parts of the named learners
#: (:mod:`merf_dask.learners`) and the parts of scikit-learn's regressors fitted with their
#: defaults. A learner with any other type is pickled (see the module notes).
TRUSTED_TYPES: tuple[str, ...] = (
    # merf-dask: a cross-fit's ensemble, a warm-started member and its bins, a fitted LightGBM
    # model as text
    _type_name(FoldEnsemble),
    _type_name(BoostingStages),
    _type_name(FeatureBins),
    _type_name(LightGBMText),
    # the named learners: scikit-learn's trees (forests, extra trees), histogram boosting's
    # trees, LightGBM's scikit-learn regressor (unfitted templates) and its best scores
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "lightgbm.sklearn.LGBMRegressor",
    "collections.OrderedDict",
    # scikit-learn's other regressors: neighbour trees and their metrics, Gaussian process
    # kernels, MLP optimisers, stacking's and voting's estimator bunch, Tweedie losses
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._dist_metrics.ManhattanDistance64",
    "sklearn.metrics._dist_metrics.MinkowskiDistance64",
    "sklearn.metrics._dist_metrics.ChebyshevDistance64",
    "sklearn.gaussian_process.kernels.ConstantKernel",
    "sklearn.gaussian_process.kernels.WhiteKernel",
    "sklearn.gaussian_process.kernels.RBF",
    "sklearn.gaussian_process.kernels.Matern",
    "sklearn.gaussian_process.kernels.RationalQuadratic",
    "sklearn.gaussian_process.kernels.ExpSineSquared",
    "sklearn.gaussian_process.kernels.DotProduct",
    "sklearn.gaussian_process.kernels.Sum",
    "sklearn.gaussian_process.kernels.Product",
    "sklearn.gaussian_process.kernels.Exponentiation",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.utils._bunch.Bunch",
    "sklearn._loss.loss.HalfTweedieLoss",
    "sklearn._loss.loss.HalfTweedieLossIdentity",
)

_TRUST_HINT = ("only if you or your pipeline wrote this model directory, load it with "
               "trusted=True (merf-dask commands: --trust-model)")


class UntrustedModelError(ValueError):
    """A learner file refused because loading it could run code: a pickle, a skops file with
    types outside :data:`TRUSTED_TYPES`, or a file that is not a skops file at all."""


def _is_fitted_lightgbm(learner) -> bool:
    lightgbm = sys.modules.get("lightgbm")  # no LightGBM model exists unless it was imported
    return (lightgbm is not None and type(learner) is lightgbm.LGBMRegressor
            and learner.__sklearn_is_fitted__())


def _as_data(learner):
    """``learner`` with every fitted LightGBM regressor, alone, a member of a
    :class:`FoldEnsemble` or a stage of a :class:`BoostingStages` (the shapes
    :func:`merf_dask.core.ensemble.assemble_model` gives), replaced by its
    :class:`LightGBMText`; a dict's values likewise."""
    if isinstance(learner, dict):
        return {key: _as_data(value) for key, value in learner.items()}
    if isinstance(learner, FoldEnsemble):
        return FoldEnsemble([_as_data(member) for member in learner.members])
    if isinstance(learner, BoostingStages):
        return BoostingStages([_as_data(stage) for stage in learner.stages], learner.bins)
    return LightGBMText.of(learner) if _is_fitted_lightgbm(learner) else learner


def _from_data(learner):
    """The inverse of :func:`_as_data`."""
    if isinstance(learner, dict):
        return {key: _from_data(value) for key, value in learner.items()}
    if isinstance(learner, FoldEnsemble):
        return FoldEnsemble([_from_data(member) for member in learner.members])
    if isinstance(learner, BoostingStages):
        return BoostingStages([_from_data(stage) for stage in learner.stages], learner.bins)
    return learner.regressor() if isinstance(learner, LightGBMText) else learner


def _untrusted_types(content: bytes) -> list[str]:
    """The types of a skops file outside skops's defaults and :data:`TRUSTED_TYPES` (read from
    its schema; nothing is constructed)."""
    return sorted(set(skops.io.get_untrusted_types(data=content)) - set(TRUSTED_TYPES))


def dump_learner(learner) -> tuple[str, bytes]:
    """The learner file for ``learner``: its name and its content.

    Parameters
    ----------
    learner : object
        What to store (a model directory stores ``{"fitted": ..., "unfitted": ...}``).

    Returns
    -------
    name : {SKOPS_FILE, PICKLE_FILE}
    content : bytes

    Warns
    -----
    UserWarning
        When ``learner`` holds types outside skops's defaults and :data:`TRUSTED_TYPES`, or
        that skops cannot write: it is pickled, and loading it needs ``trusted=True``.
    """
    try:
        content = skops.io.dumps(_as_data(learner), compression=zipfile.ZIP_DEFLATED,
                                 compresslevel=3)
        untrusted = ", ".join(_untrusted_types(content))
    except (TypeError, ValueError) as error:  # skops refuses objects it cannot write as data
        untrusted = f"one skops cannot write: {error}"
    if not untrusted:
        return SKOPS_FILE, content
    warnings.warn(f"the learner holds types merf-dask does not load safely ({untrusted}): it is "
                  f"saved as a pickle ({PICKLE_FILE}), and loading the model directory needs "
                  "trusted=True (merf-dask commands: --trust-model)", UserWarning,
                  stacklevel=4)  # the caller of MERF.save
    pickled = io.BytesIO()
    joblib.dump(learner, pickled, compress=3)
    return PICKLE_FILE, pickled.getvalue()


def load_learner(name: str, content: bytes, *, trusted: bool = False, source: str):
    """The learner stored in a learner file by :func:`dump_learner`.

    Parameters
    ----------
    name : str
        The file's name, which says its format: ``SKOPS_FILE`` or ``PICKLE_FILE``.
    content : bytes
    trusted : bool, default=False
        Load a pickle, and a skops file with types outside :data:`TRUSTED_TYPES`, too. Such a
        file can run arbitrary code when it is loaded: only for files you or your pipeline
        wrote.
    source : str
        The file's path or URL, for messages.

    Raises
    ------
    UntrustedModelError
        Without ``trusted``: the file is a pickle or holds untrusted types. Either way: a file
        named ``SKOPS_FILE`` that is not a skops file (it is never unpickled).
    ValueError
        ``name`` is no learner file's name.
    """
    if name == PICKLE_FILE:
        if not trusted:
            raise UntrustedModelError(
                f"{source} is a pickle, and loading a pickle runs any code it holds: refusing to "
                f"load it; {_TRUST_HINT}")
        return joblib.load(io.BytesIO(content))
    if name != SKOPS_FILE:
        raise ValueError(f"{source}: {name!r} is not a learner file (expected {SKOPS_FILE} or "
                         f"{PICKLE_FILE})")
    try:
        untrusted = _untrusted_types(content)
    except Exception as error:  # whatever a malformed or foreign file makes skops raise
        raise UntrustedModelError(
            f"{source} is not a skops file ({type(error).__name__}: {error}); it may be a pickle, "
            "which would run code when loaded: refusing to load it") from None
    if untrusted and not trusted:
        raise UntrustedModelError(
            f"{source} holds types merf-dask does not trust ({', '.join(untrusted)}): refusing "
            f"to load it; {_TRUST_HINT}")
    return _from_data(skops.io.loads(content, trusted=[*TRUSTED_TYPES, *untrusted]))
