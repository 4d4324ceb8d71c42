"""The Dask driver: the EM over cluster-whole partitions on a ``distributed`` cluster.

Imported only when a fit or prediction runs on a cluster (``import merf_dask`` does not start
or import ``distributed``).

Modules
-------
em             :class:`~merf_dask.dask.em.DaskEMData`, the EM's data on Dask workers
partitioning   keeping every cluster's rows in one partition of a Dask DataFrame
cluster        connecting to (or starting) the cluster a job runs on
"""
