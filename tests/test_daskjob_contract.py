"""The DaskJob's job-runner command works against a Dask scheduler it finds as the operator says.

``cluster_configs/kubernetes/base/daskjob.yaml`` runs ``merf-dask fit`` in a pod whose only link to
its cluster is ``DASK_SCHEDULER_ADDRESS``. This test runs the manifest's job container command as
written, with the lake and model URLs pointed at local directories, against a real
``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 (plain TCP), in an environment
holding nothing else but PATH and HOME, as the pod's does (the image sets no other variable the
CLI reads). It checks that the command succeeds, writes the model directory, and that the fit's
tasks ran on that scheduler, not on an embedded cluster.

What is not covered here: the image (Dockerfile), TLS (tests/test_cluster_connect.py), the
manifests' schemas and kustomize rendering (tests/test_deploy_configs.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from distributed import Client

from helpers import spawn_dask, stop_process_groups
from merf_dask.io.lake import write_simulated_lake

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster_configs" / "kubernetes" / "base" / "daskjob.yaml"
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent  # the virtualenv's bin/, where merf-dask and dask live
LAKE_URL, MODEL_URL = "s3://lake/merf/", "s3://models/merf/"
# the client's TLS settings: what the job container sets besides the scheduler address
TLS_VARIABLE = re.compile(r"DASK_DISTRIBUTED__COMM__(TLS__.+|REQUIRE_ENCRYPTION)")
STARTUP_TIMEOUT = 60  # seconds; two shared cores start three interpreters at once
JOB_TIMEOUT = 300


def _job_container() -> dict:
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    (job,) = [doc for doc in docs if doc["kind"] == "DaskJob"]
    # the operator runs the job pod's first container, the one named "job"
    container = job["spec"]["job"]["spec"]["containers"][0]
    assert container["name"] == "job"
    return container




@pytest.fixture
def scheduler_address(tmp_path) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, plain TCP."""
    scheduler_file = tmp_path / "scheduler.json"
    processes = [spawn_dask(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                         "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log")]
    try:
        for i in range(2):
            processes.append(spawn_dask(
                ["worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                 "--name", f"worker-{i}", "--nthreads", "1", "--no-nanny", "--no-dashboard"],
                tmp_path / f"worker-{i}.log"))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not scheduler_file.exists():  # the workers wait for it the same way
            assert processes[0].poll() is None, (tmp_path / "scheduler.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.1)
        with Client(scheduler_file=str(scheduler_file), timeout=STARTUP_TIMEOUT,
                    set_as_default=False) as client:
            client.wait_for_workers(2, timeout=STARTUP_TIMEOUT)
            yield client.scheduler.address
    finally:
        stop_process_groups(processes[1:])  # workers first: a worker told to close by a closing scheduler
        stop_process_groups(processes[:1])  # while handling its own SIGTERM can hang


def _finished_tasks(address: str) -> dict[str, int]:
    """Tasks that reached memory on the scheduler, by task prefix (a running total)."""
    with Client(address, timeout=STARTUP_TIMEOUT, set_as_default=False) as client:
        return client.run_on_scheduler(lambda dask_scheduler: {
            name: prefix.state_counts["memory"]
            for name, prefix in dask_scheduler.task_prefixes.items()})


def test_daskjob_command_fits_on_the_scheduler_in_dask_scheduler_address(tmp_path,
                                                                          scheduler_address):
    container = _job_container()
    if "command" not in container:
        # Kubernetes passes `args` to the image's ENTRYPOINT when there is one
        assert not re.search(r"^\s*ENTRYPOINT", DOCKERFILE.read_text(), flags=re.MULTILINE)
    argv = [*container.get("command", []), *container["args"]]
    assert argv.count(LAKE_URL) == 1 and argv.count(MODEL_URL) == 1, argv

    # 2,000 rows: the job runs with the default --max-iterations 20 and --seed 0, with which
    # EM stops after three iterations on this lake
    lake, output = tmp_path / "lake", tmp_path / "models" / "merf"
    write_simulated_lake(lake, n_rows=2000, n_clusters=50, seed=1, n_buckets=2)
    output.parent.mkdir()  # the bucket exists; the prefix merf/ does not
    # the URLs' trailing slashes are kept: the CLI must take the paths as the manifest writes them
    argv = [f"{lake}/" if arg == LAKE_URL else f"{output}/" if arg == MODEL_URL else arg
            for arg in argv]

    # The manifest's variables are the scheduler address (replaced by this test's scheduler),
    # the client's TLS settings and the connect timeout for a runner pod that starts before
    # its scheduler. TLS is dropped: the loopback cluster here is plain TCP, and mutual TLS
    # is covered by the TLS tests of tests/test_cluster_connect.py. The timeout is dropped
    # with it, as the scheduler here is up before the job starts.
    names = [variable["name"] for variable in container.get("env", [])]
    assert "DASK_SCHEDULER_ADDRESS" in names
    assert {name for name in names if not TLS_VARIABLE.fullmatch(name)} == {
        "DASK_SCHEDULER_ADDRESS", "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"}, names
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.pathsep.join([str(BIN), "/usr/local/bin", "/usr/bin", "/bin"]),
           "HOME": str(home), "DASK_SCHEDULER_ADDRESS": scheduler_address}
    assert Path(shutil.which(argv[0], path=env["PATH"])).parent == BIN

    assert sum(_finished_tasks(scheduler_address).values()) == 0
    run = subprocess.run(argv, env=env, cwd=home, capture_output=True, text=True,
                         timeout=JOB_TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert (output / "manifest.json").is_file(), run.stdout
    assert json.loads((output / "manifest.json").read_text())
    assert f"model written to {output}" in run.stdout
    # the fit's tasks ran on this scheduler (an embedded LocalCluster would have its own)
    finished = _finished_tasks(scheduler_address)
    assert sum(finished.values()) > 0, finished
