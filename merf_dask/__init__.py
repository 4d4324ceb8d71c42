"""merf-dask: Mixed Effects Random Forests that fit clustered data too big for one machine.

``MERF`` (:mod:`merf_dask.estimator`) is a scikit-learn regressor for
y_i = f(X_i) + Z_i b_i + e_i, fitted by the EM algorithm of Hajjem, Bellavance & Larocque (2014)
in-process or on a Dask cluster.

Modules
-------
estimator      the ``MERF`` estimator (scikit-learn API, merf 1.0 compatible names)
em             the EM loop, written once for in-memory and distributed data
dask_em        the EM over cluster-whole partitions streamed by Dask workers
_core          the pure numpy E-step on per-cluster sufficient statistics
ensemble       the M-step's members and their honest (out-of-bag, cross-fitted) predictions
learners       the default forest and the learners the CLI names
checkpoint     atomic checkpoints of the EM loop, to resume a killed fit
partitioning   cluster hashes; keeping each cluster's rows in one partition
simulate       the paper's data-generating process
"""

from .estimator import MERF, SingularFitWarning

__all__ = ["MERF", "SingularFitWarning", "__version__"]
__version__ = "0.1.0"
