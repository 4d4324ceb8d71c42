"""``merf_dask.dask.cluster``: configs, and ``connect`` against real scheduler and worker processes.

Fixtures
--------
plain_cluster
    ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1 over TCP.
tls_cluster
    The same over mutual TLS, with a CA and certificates made here; also a second CA and a
    client certificate it signed, which the cluster must refuse.

Tests
-----
* ``connect`` by address, by scheduler file, and with no config from ``DASK_SCHEDULER_ADDRESS``
  (in a fresh interpreter, as in a DaskJob pod); none of them stops the cluster.
* ``connect`` over TLS with a tls.yaml-style config; a certificate from another CA, and a
  plain TCP client, are refused.
* ``connect`` starts and closes what it starts: the embedded LocalCluster and a dask-ctl spec,
  also when the body raises.
* ``load_config`` rejects bad configs with a ``ValueError`` naming the file.

The processes are started in their own sessions and stopped by process group (SIGTERM, then
SIGKILL), so no worker outlives a failed test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from distributed import Client
from distributed.comm.core import CommClosedError
from distributed.security import Security

from helpers import spawn_dask, stop_process_groups
from merf_dask.dask.cluster import ClusterSpec, SchedulerConfig, connect, load_config

STARTUP_TIMEOUT = 60  # seconds; two shared cores start three interpreters at once
REFUSAL_TIMEOUT = "5s"


@dataclasses.dataclass
class RunningCluster:
    """A scheduler and its workers, started by this module."""

    address: str
    scheduler_file: Path
    processes: list[subprocess.Popen]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)


# ------------------------------------------------------------------------------- processes



def _wait_for_address(scheduler_file: Path, scheduler: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        assert scheduler.poll() is None, f"dask scheduler exited:\n{log.read_text()}"
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return json.loads(scheduler_file.read_text())["address"]
        time.sleep(0.1)
    raise TimeoutError(f"dask scheduler wrote no {scheduler_file}:\n{log.read_text()}")


@contextlib.contextmanager
def _running_cluster(workdir: Path, *, tls_args: list[str], security: Security | None,
                     ) -> Iterator[RunningCluster]:
    """Run ``dask scheduler`` and two ``dask worker`` processes until the block ends."""
    scheduler_file, log = workdir / "scheduler.json", workdir / "scheduler.log"
    protocol = ["--protocol", "tls"] if tls_args else []
    processes = []
    try:
        processes.append(spawn_dask(
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file), *protocol, *tls_args], log))
        address = _wait_for_address(scheduler_file, processes[0], log)
        for i in range(2):
            # no nanny: one process per worker starts faster and stops more simply
            processes.append(spawn_dask(
                ["worker", "--scheduler-file", str(scheduler_file), "--host", "127.0.0.1",
                 "--name", f"worker-{i}", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 *tls_args], workdir / f"worker-{i}.log"))
        try:
            with Client(address, security=security, timeout=STARTUP_TIMEOUT) as client:
                client.wait_for_workers(2, timeout=STARTUP_TIMEOUT)
        except (OSError, TimeoutError) as err:
            logs = "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(workdir.glob("*.log")))
            raise RuntimeError(f"the workers did not connect:\n{logs}") from err
        yield RunningCluster(address, scheduler_file, processes)
    finally:
        # workers first: a worker told to close by a closing scheduler while handling its own
        # SIGTERM can hang until it is killed
        stop_process_groups(processes[1:])
        stop_process_groups(processes[:1])


@pytest.fixture(scope="module")
def plain_cluster(tmp_path_factory) -> Iterator[RunningCluster]:
    with _running_cluster(tmp_path_factory.mktemp("tcp"), tls_args=[], security=None) as cluster:
        yield cluster


# ------------------------------------------------------------------------------ certificates

@dataclasses.dataclass
class Credentials:
    """PEM files: a CA certificate, and a certificate and key it signed."""

    ca: Path
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, *, issuer: str, issuer_key, is_ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def _credentials(directory: Path, ca_name: str) -> Credentials:
    """A new CA and one certificate it signed (Dask checks the CA, not the host name)."""
    directory.mkdir()
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(ca_name, ca_key, issuer=ca_name, issuer_key=ca_key, is_ca=True)
    cert = _certificate("merf-dask", key, issuer=ca_name, issuer_key=ca_key, is_ca=False)
    files = Credentials(directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory) -> Iterator[tuple[RunningCluster, Credentials, Credentials]]:
    """The cluster, its credentials, and credentials from an unrelated CA."""
    workdir = tmp_path_factory.mktemp("tls")
    good = _credentials(workdir / "good", "merf-dask CA")
    rogue = _credentials(workdir / "rogue", "other CA")
    tls_args = ["--tls-ca-file", str(good.ca), "--tls-cert", str(good.cert),
                "--tls-key", str(good.key)]
    security = Security(tls_ca_file=str(good.ca), tls_client_cert=str(good.cert),
                        tls_client_key=str(good.key), require_encryption=True)
    with _running_cluster(workdir, tls_args=tls_args, security=security) as cluster:
        yield cluster, good, rogue


# ------------------------------------------------------------------------------------ helpers

def _write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _check_cluster(client: Client) -> None:
    assert len(client.scheduler_info()["workers"]) == 2
    assert client.submit(sum, [1, 2, 3]).result() == 6


# -------------------------------------------------------------------------- running clusters

def test_connect_by_address_leaves_the_cluster_running(plain_cluster, tmp_path):
    config = _write_config(tmp_path / "tcp.yaml", {"address": plain_cluster.address})
    with connect(config) as client:
        _check_cluster(client)
    assert client.status == "closed"
    assert plain_cluster.alive()


def test_connect_by_relative_scheduler_file(plain_cluster):
    # a relative path is read relative to the config's directory, not the working directory
    config = _write_config(plain_cluster.scheduler_file.with_name("scheduler-file.yaml"),
                           {"scheduler_file": plain_cluster.scheduler_file.name})
    with connect(config) as client:
        _check_cluster(client)
    assert plain_cluster.alive()


def test_connect_without_config_uses_dask_scheduler_address(plain_cluster):
    # a fresh interpreter, because Dask reads DASK_* variables when it is imported
    code = ("from merf_dask.dask.cluster import connect\n"
            "with connect() as client:\n"
            "    print(len(client.scheduler_info()['workers']),"
            " client.submit(sum, [1, 2]).result())")
    env = {**os.environ, "DASK_SCHEDULER_ADDRESS": plain_cluster.address}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=STARTUP_TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["2", "3"]
    assert plain_cluster.alive()


def test_connect_over_tls(tls_cluster, tmp_path):
    cluster, good, _ = tls_cluster
    config = _write_config(good.ca.parent / "tls.yaml", {
        "address": cluster.address,
        "security": {"tls_ca_file": good.ca.name, "tls_client_cert": good.cert.name,
                     "tls_client_key": good.key.name}})
    with connect(config) as client:
        assert client.scheduler.address.startswith("tls://")
        _check_cluster(client)
    assert cluster.alive()


@pytest.mark.parametrize("client", ["certificate-from-another-ca", "plain-tcp"])
def test_tls_cluster_refuses_clients_without_a_valid_certificate(tls_cluster, client):
    # test_connect_over_tls is the control: only the client's credentials differ
    cluster, good, rogue = tls_cluster
    if client == "plain-tcp":
        address, security = cluster.address.replace("tls://", "tcp://"), None
    else:
        # trusts the right CA, but shows a certificate that CA did not sign; the server's
        # refusal reaches the client as an "unknown ca" alert or a bare EOF (TLS 1.3)
        address = cluster.address
        security = Security(tls_ca_file=str(good.ca), tls_client_cert=str(rogue.cert),
                            tls_client_key=str(rogue.key), require_encryption=True)
    # the refusal is immediate; the short timeout only bounds a regression that retries
    with dask.config.set({"distributed.comm.timeouts.connect": REFUSAL_TIMEOUT}):
        with pytest.raises(CommClosedError):
            Client(address, security=security, timeout=REFUSAL_TIMEOUT)
    assert cluster.alive()


# ------------------------------------------------------------------- clusters connect starts

def test_embedded_local_cluster_is_closed_on_exit():
    with dask.config.set({"scheduler-address": None}):
        with connect(n_workers=1, memory_limit="1GiB") as client:
            assert len(client.scheduler_info()["workers"]) == 1
            assert client.submit(sum, [1, 2]).result() == 3
            cluster = client.cluster
    assert cluster.status.name == "closed"


def test_dask_ctl_spec_is_scaled_and_closed_even_when_the_body_raises():
    spec = {"version": 1, "module": "distributed", "class": "LocalCluster",
            "kwargs": {"n_workers": 0, "processes": False, "dashboard_address": "127.0.0.1:0"},
            "scale": 2}
    with pytest.raises(RuntimeError, match="fit failed"):
        with connect(spec) as client:
            client.wait_for_workers(2, timeout=STARTUP_TIMEOUT)
            cluster = client.cluster
            raise RuntimeError("fit failed")
    assert cluster.status.name == "closed"


def test_sizing_arguments_need_the_embedded_cluster():
    with pytest.raises(ValueError, match="n_workers and memory_limit"):
        with connect({"address": "tcp://127.0.0.1:1"}, n_workers=2):
            pass
    with dask.config.set({"scheduler-address": "tcp://127.0.0.1:1"}):
        with pytest.raises(ValueError, match="DASK_SCHEDULER_ADDRESS"):
            with connect(memory_limit="1GiB"):
                pass


# ----------------------------------------------------------------------------------- configs

def test_load_config_resolves_paths_against_the_file(tmp_path):
    config = load_config(_write_config(tmp_path / "c.yaml", {
        "address": "tls://scheduler:8786",
        "security": {"tls_ca_file": "ca.crt", "tls_client_cert": "/etc/tls/tls.crt"}}))
    assert isinstance(config, SchedulerConfig)
    assert config.security.tls_ca_file == str(tmp_path / "ca.crt")
    assert config.security.tls_client_cert == "/etc/tls/tls.crt"
    assert config.security.require_encryption


def test_load_config_normalises_scale():
    spec = load_config({"version": 1, "module": "m", "class": "C", "scale": 3})
    assert isinstance(spec, ClusterSpec)
    assert spec.scale == {"n": 3}
    assert (spec.args, spec.kwargs, spec.adapt) == ((), {}, None)


@pytest.mark.parametrize(("content", "message"), [
    ("address: [unclosed", "cannot read a cluster config"),
    ("- a list", "a cluster config is a mapping"),
    ("adress: tcp://scheduler:8786", r"unknown keys \['adress'\]"),
    ("address: tcp://a:1\nscheduler_file: s.json", "exactly one of"),
    ("address: tcp://a:1\nsecurity: {tls_ca_file: ca.crt}", r"missing \['tls_client_cert'\]"),
    ("address: tcp://a:1\nsecurity: {tls_ca: ca.crt}", r"unknown keys \['tls_ca'\]"),
    ("version: 2\nmodule: distributed\nclass: LocalCluster", "version: 1"),
    ("version: 1\nclass: LocalCluster", "needs a string 'module'"),
    ("version: 1\nmodule: distributed", "needs a string 'class'"),
    ("version: 1\nmodule: m\nclass: C\nscale: 2\nadapt: {maximum: 4}", "at most one of"),
    ("version: 1\nmodule: m\nclass: C\nkwargs: [1]", "'kwargs' must be a mapping"),
])
def test_bad_config_names_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as raised:
        load_config(path)
    assert str(raised.value).startswith(str(path))


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_unknown_cluster_class_and_module_are_reported_with_the_file():
    with pytest.raises(ValueError, match="<mapping>: module 'distributed' has no class 'Nope'"):
        load_config({"version": 1, "module": "distributed", "class": "Nope"}).build()
    with pytest.raises(ImportError, match="<mapping>: cannot import module 'no_such_module'"):
        load_config({"version": 1, "module": "no_such_module", "class": "C"}).build()
