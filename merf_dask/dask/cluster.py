"""Connect to (or start) the Dask cluster that a fit runs on.

One YAML file names the cluster, so the same command line runs on a laptop, over SSH, on a
SLURM machine or inside a Kubernetes ``DaskJob``. The files in ``cluster_configs/`` are
examples of both shapes a file can take:

* **a running scheduler** -- ``address:`` or ``scheduler_file:``, plus an optional
  ``security:`` block with ``tls_ca_file``, ``tls_client_cert`` and ``tls_client_key``
  (mutual TLS; encryption is then required);
* **a cluster to start** -- a dask-ctl v1 spec: ``version: 1``, ``module:``, ``class:``,
  ``args:``, ``kwargs:`` meaning ``getattr(import_module(module), class)(*args, **kwargs)``,
  plus an optional ``scale:`` (a worker count, or keyword arguments such as ``{jobs: 4}``
  for ``cluster.scale``) or ``adapt:`` (keyword arguments for ``cluster.adapt``).

Relative paths in a file (``scheduler_file``, certificates) are resolved against the
file's directory, as kubectl does for kubeconfig files.

Classes
-------
SchedulerConfig
    A validated "connect to a running scheduler" config.
ClusterSpec
    A validated dask-ctl v1 spec; ``build()`` constructs the cluster without scaling it.

Functions
---------
load_config
    Read and validate a config file or mapping; ``ValueError`` names the file when it is bad.
connect
    Context manager yielding a ``distributed.Client``: from a config, from the
    ``DASK_SCHEDULER_ADDRESS`` environment variable, or on an embedded ``LocalCluster``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dask
import yaml
from distributed import Client, LocalCluster
from distributed.security import Security

__all__ = ["SchedulerConfig", "ClusterSpec", "load_config", "connect"]

_SCHEDULER_KEYS = frozenset({"address", "scheduler_file", "security"})
_SECURITY_KEYS = frozenset({"tls_ca_file", "tls_client_cert", "tls_client_key"})
_SPEC_KEYS = frozenset({"version", "module", "class", "args", "kwargs", "scale", "adapt"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Where a running scheduler is and how to authenticate to it.

    Attributes
    ----------
    source : str
        The file (or ``"<mapping>"``) the config came from, for error messages.
    address : str or None
        Scheduler address such as ``"tls://scheduler:8786"``.
    scheduler_file : str or None
        Path of the JSON file written by ``dask scheduler --scheduler-file``.
    security : distributed.security.Security or None
        Client-side TLS credentials.
    """

    source: str
    address: str | None = None
    scheduler_file: str | None = None
    security: Security | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """A dask-ctl v1 cluster spec and how to size the cluster once it exists.

    Attributes
    ----------
    source : str
        The file (or ``"<mapping>"``) the spec came from, for error messages.
    module, class_name : str
        Where the cluster class lives, e.g. ``"dask_jobqueue"`` and ``"SLURMCluster"``.
    args : tuple
        Positional arguments of the class.
    kwargs : dict
        Keyword arguments of the class.
    scale : dict or None
        Keyword arguments of ``cluster.scale`` (a bare count ``N`` becomes ``{"n": N}``).
    adapt : dict or None
        Keyword arguments of ``cluster.adapt``.
    """

    source: str
    module: str
    class_name: str
    args: tuple = ()
    kwargs: dict = dataclasses.field(default_factory=dict)
    scale: dict | None = None
    adapt: dict | None = None

    def build(self):
        """Construct the cluster, without scaling or adapting it.

        A dask-jobqueue cluster starts its scheduler here but submits no job, so this is
        also how to inspect one offline (``build().job_script()``). Other classes may start
        workers on construction (``LocalCluster``'s ``n_workers``, for example).

        Returns
        -------
        distributed.deploy.Cluster
            The new cluster; the caller closes it.

        Raises
        ------
        ImportError
            When ``module`` cannot be imported (its package is not installed).
        ValueError
            When ``module`` has no attribute ``class_name``.
        """
        try:
            module = importlib.import_module(self.module)
        except ImportError as err:
            raise ImportError(
                f"{self.source}: cannot import module {self.module!r} ({err}); "
                "install the package that provides the cluster class") from err
        try:
            cluster_class = getattr(module, self.class_name)
        except AttributeError:
            raise ValueError(
                f"{self.source}: module {self.module!r} has no class {self.class_name!r}"
            ) from None
        return cluster_class(*self.args, **self.kwargs)


def load_config(config: str | os.PathLike | Mapping[str, Any]) -> SchedulerConfig | ClusterSpec:
    """Read and validate a cluster config.

    Parameters
    ----------
    config : str, os.PathLike or Mapping
        Path of a YAML file, or the already-parsed mapping.

    Returns
    -------
    SchedulerConfig or ClusterSpec
        ``SchedulerConfig`` when the config has ``address`` or ``scheduler_file``,
        otherwise the dask-ctl spec.

    Raises
    ------
    ValueError
        When the file cannot be read or parsed, or the config has unknown or missing keys
        or values of the wrong type. The message starts with the file name.
    """
    if isinstance(config, Mapping):
        source, base, raw = "<mapping>", Path.cwd(), config
    else:
        path = Path(config)
        source, base = str(path), path.parent
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{source}: cannot read a cluster config: {err}") from err
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: a cluster config is a mapping, got {type(raw).__name__}")
    if "address" in raw or "scheduler_file" in raw:
        return _scheduler_config(raw, source=source, base=base)
    return _cluster_spec(raw, source=source)


@contextlib.contextmanager
def connect(
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    n_workers: int | None = None,
    memory_limit: str | int | None = None,
) -> Iterator[Client]:
    """Yield a client of the cluster named by ``config``; close what was started here.

    Clusters and schedulers that were already running are left running: only the client
    is closed. A cluster built from a dask-ctl spec, or the embedded ``LocalCluster``, is
    closed on exit, also when the body raises.

    Parameters
    ----------
    config : str, os.PathLike, Mapping or None
        A cluster config file or mapping (see :func:`load_config`). ``None`` connects to
        the scheduler in the ``scheduler-address`` Dask config key (the
        ``DASK_SCHEDULER_ADDRESS`` environment variable, which the Dask Kubernetes operator
        sets in ``DaskJob`` pods) when it is set, and otherwise starts an embedded
        ``LocalCluster`` of single-threaded worker processes.
    n_workers : int, optional
        Worker processes of the embedded ``LocalCluster``; default: one per CPU available
        to this process (cgroup quotas included).
    memory_limit : str or int, optional
        Memory limit per worker of the embedded ``LocalCluster``; default ``"auto"``
        (the machine's memory divided among the workers).

    Yields
    ------
    distributed.Client

    Raises
    ------
    ValueError
        When the config is bad (see :func:`load_config`), or when ``n_workers`` or
        ``memory_limit`` is given but no embedded cluster is started for them to size.
    """
    spec = None if config is None else load_config(config)
    if (n_workers is not None or memory_limit is not None) and (
            spec is not None or dask.config.get("scheduler-address", None)):
        # refusing beats silently running on a cluster of a different size than asked for
        raise ValueError(
            "n_workers and memory_limit size the embedded LocalCluster; they cannot be "
            "combined with a cluster config or DASK_SCHEDULER_ADDRESS")

    with contextlib.ExitStack() as stack:
        if isinstance(spec, SchedulerConfig):
            client = Client(spec.address, scheduler_file=spec.scheduler_file,
                            security=spec.security)
        elif isinstance(spec, ClusterSpec):
            cluster = stack.enter_context(contextlib.closing(spec.build()))
            if spec.scale is not None:
                cluster.scale(**spec.scale)
            elif spec.adapt is not None:
                cluster.adapt(**spec.adapt)
            client = Client(cluster)
        elif dask.config.get("scheduler-address", None):
            client = Client()
        else:
            # single-threaded worker processes: the per-partition EM steps are largely
            # Python-level work that holds the GIL, so processes run partitions in parallel
            cluster = stack.enter_context(contextlib.closing(LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True,
                memory_limit="auto" if memory_limit is None else memory_limit,
                # no dashboard; the scheduler's HTTP server (health, metrics) still starts,
                # so keep it local and off port 8787, where a user's own cluster may be
                dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})))
            client = Client(cluster)
        # registered last so it closes first, while its cluster is still up
        stack.enter_context(contextlib.closing(client))
        yield client


def _scheduler_config(raw: Mapping, *, source: str, base: Path) -> SchedulerConfig:
    _check_keys(raw, _SCHEDULER_KEYS, source=source, what="a scheduler config")
    if ("address" in raw) == ("scheduler_file" in raw):
        raise ValueError(f"{source}: give exactly one of 'address' and 'scheduler_file'")
    address, scheduler_file = raw.get("address"), raw.get("scheduler_file")
    if address is not None and not isinstance(address, str):
        raise ValueError(f"{source}: 'address' must be a string, got {address!r}")
    if scheduler_file is not None:
        scheduler_file = _resolve(scheduler_file, base=base, source=source, key="scheduler_file")
    return SchedulerConfig(source=source, address=address, scheduler_file=scheduler_file,
                           security=_security(raw.get("security"), source=source, base=base))


def _security(raw: Any, *, source: str, base: Path) -> Security | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: 'security' must be a mapping, got {raw!r}")
    _check_keys(raw, _SECURITY_KEYS, source=source, what="'security'")
    missing = {"tls_ca_file", "tls_client_cert"} - raw.keys()
    if missing:
        # the key may live in the certificate file, but the CA and certificate cannot:
        # Dask servers demand a client certificate signed by the cluster's CA
        raise ValueError(f"{source}: 'security' is missing {sorted(missing)}")
    files = {key: _resolve(value, base=base, source=source, key=key)
             for key, value in raw.items()}
    return Security(require_encryption=True, **files)


def _cluster_spec(raw: Mapping, *, source: str) -> ClusterSpec:
    _check_keys(raw, _SPEC_KEYS, source=source,
                what="a dask-ctl spec (or use 'address'/'scheduler_file')")
    if raw.get("version") != 1:
        raise ValueError(f"{source}: a dask-ctl spec needs 'version: 1', "
                         f"got {raw.get('version')!r}")
    for key in ("module", "class"):
        if not isinstance(raw.get(key), str):
            raise ValueError(f"{source}: a dask-ctl spec needs a string '{key}'")
    args, kwargs = raw.get("args") or [], raw.get("kwargs") or {}
    if not isinstance(args, list):
        raise ValueError(f"{source}: 'args' must be a list, got {args!r}")
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{source}: 'kwargs' must be a mapping, got {kwargs!r}")
    scale, adapt = raw.get("scale"), raw.get("adapt")
    if scale is not None and adapt is not None:
        raise ValueError(f"{source}: give at most one of 'scale' and 'adapt'")
    if isinstance(scale, int) and not isinstance(scale, bool):
        scale = {"n": scale}
    for key, value in (("scale", scale), ("adapt", adapt)):
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{source}: '{key}' must be a mapping"
                             f"{' or a worker count' if key == 'scale' else ''}, got {value!r}")
    return ClusterSpec(source=source, module=raw["module"], class_name=raw["class"],
                       args=tuple(args), kwargs=dict(kwargs),
                       scale=None if scale is None else dict(scale),
                       adapt=None if adapt is None else dict(adapt))


def _check_keys(raw: Mapping, allowed: frozenset, *, source: str, what: str) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(map(str, unknown))} in {what}; "
                         f"allowed: {sorted(allowed)}")


def _resolve(value: Any, *, base: Path, source: str, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{source}: '{key}' must be a path, got {value!r}")
    return str(base / Path(value).expanduser())
