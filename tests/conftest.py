"""Shared fixtures: a real multi-process Dask cluster (helpers live in ``helpers.py``)."""

import pytest


@pytest.fixture(scope="module")
def dask_client():
    """A real LocalCluster with two worker processes, one per module (start-up takes seconds)."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client
