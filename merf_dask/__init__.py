"""merf-dask: Mixed Effects Random Forests that fit clustered data too big for one machine.

``MERF`` (:mod:`merf_dask.estimator`) is a scikit-learn regressor for
y_i = f(X_i) + Z_i b_i + e_i, fitted by the EM algorithm of Hajjem, Bellavance & Larocque (2014)
in-process or on a Dask cluster.

Layers (each imports only the ones above it)
--------------------------------------------
core        the pure numpy core: validation, hashing, sufficient statistics and the E-step, the
            M-step's ensemble with honest predictions, the EM loop over in-memory data
simulate    the paper's data-generating process
learners    the default forest and the learners the CLI names
formula     lme4 formulas: parsing, encoding, design matrices
dask        the Dask driver: the EM over partitions on workers, partitioning, cluster connections
io          lakes, model directories, checkpoints and reports
estimator   the ``MERF`` estimator (scikit-learn API, merf 1.0 compatible names)
cli         the ``merf-dask`` command line

``import merf_dask`` and an in-process fit import neither ``distributed`` nor ``dask.dataframe``.
"""

from .estimator import MERF, MERFClassifier, SingularFitWarning

__all__ = ["MERF", "MERFClassifier", "SingularFitWarning", "__version__"]
__version__ = "0.1.0"
