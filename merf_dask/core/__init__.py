"""The pure numerical core: one block of cluster-whole rows in, small arrays out.

Nothing here imports Dask or does I/O; every function takes numpy arrays (and pandas indexes of
cluster ids) and is tested without a cluster.

Modules
-------
validation   what users pass to ``fit`` / ``predict`` as checked numpy arrays
hashing      stable hashes of cluster ids (lake buckets and the M-step's residue classes)
exact_sum    float sums whose bits do not depend on the order or partitioning of the terms
random_effects  the joint E-step of every grouping factor (local elimination, the crossed
             system's shares) and the variance-component updates
crossed_solve  the crossed unknowns: dense on the driver, or conjugate gradients with stochastic
             traces when they are many
ensemble     the M-step's members and their honest (out-of-bag, cross-fitted) predictions
binning      a warm-started member's feature bins, fitted once for all its stages
em           the EM loop over any :class:`~merf_dask.core.em.EMData`, and the in-memory data
state        the fitted model as one object (what fit writes and the artifacts save and load)
"""
