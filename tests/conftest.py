"""Shared fixtures: a real multi-process Dask cluster, a scratch location for bucketed copies
(helpers live in ``helpers.py``)."""

import pytest


@pytest.fixture(scope="module")
def dask_client():
    """A real LocalCluster with two worker processes, one per module (start-up takes seconds)."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(autouse=True)
def scratch_location(tmp_path_factory, monkeypatch):
    """Bucketed copies of foreign lakes (``merf-dask fit``) go to a temporary directory, never
    to the user's cache."""
    monkeypatch.setenv("MERF_DASK_SCRATCH", str(tmp_path_factory.mktemp("scratch")))
