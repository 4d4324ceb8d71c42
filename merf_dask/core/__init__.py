"""The pure numerical core: one block of cluster-whole rows in, small arrays out.

Nothing here imports Dask or does I/O; every function takes numpy arrays (and pandas indexes of
cluster ids) and is tested without a cluster.

Modules
-------
validation   what users pass to ``fit`` / ``predict`` as checked numpy arrays
hashing      stable hashes of cluster ids (lake buckets and the M-step's residue classes)
random_effects  the joint E-step of every grouping factor (local elimination, crossed solve) and
             the variance-component updates
ensemble     the M-step's members and their honest (out-of-bag, cross-fitted) predictions
em           the EM loop over any :class:`~merf_dask.core.em.EMData`, and the in-memory data
state        the fitted model as one object (what fit writes and the artifacts save and load)
"""
