"""Offline checks of the deployment configs in ``cluster_configs/``.

Nothing here needs a Kubernetes API server, a SLURM controller or SSH hosts.

Validators (each helper returns a list of problems; each has a test proving it can fail)
-------------------------------------------------------------------------------------------
_crd_problems
    DaskCluster / DaskJob / DaskAutoscaler against the CRD schemas shipped in the
    dask-kubernetes wheel, in strict mode: unknown fields are errors (the API server would
    silently prune them) and nulls are pruned first (as the API server does).
_builtin_problems
    Built-in kinds (NetworkPolicy, and the Pods and Services the operator creates from the
    CRDs' embedded specs) with kubernetes-validate in strict mode.
_removed_commands
    No ``dask-scheduler`` / ``dask-worker``: distributed >= 2026.6 no longer installs them.
_pod_problems
    Pod hardening: non-root, no privilege escalation, no capabilities, read-only root with a
    writable /tmp, requests and limits, TLS material from the ``merf-dask-tls`` Secret.
_env_problems
    Every ``DASK_*`` variable names a real Dask config key, with a value of the default's type.
_unknown_helm_keys
    Helm overrides only use keys of the operator chart's own values.yaml.
_overlay
    ``kubectl kustomize`` builds the prod overlay, which changes what it should, and its
    output passes the validators above (kustomize itself accepts a patch of a misspelt path).
SLURM golden file
    ``hpc/slurm.yaml``, loaded by ``merf_dask.dask.cluster``, renders
    ``tests/golden/slurm_job_script.sh`` (scheduler address and interpreter normalised).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import re
import shutil
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import dask.config
import distributed  # noqa: F401  (registers the distributed.* config defaults)
import jsonschema
import kubernetes_validate
import pytest
import yaml

from merf_dask.dask.cluster import ClusterSpec, SchedulerConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster_configs"
K8S_BASE = CONFIGS / "kubernetes" / "base"
PROD_OVERLAY = CONFIGS / "kubernetes" / "overlays" / "prod"
HELM_VALUES = CONFIGS / "kubernetes" / "helm" / "operator-values.yaml"
GOLDEN_SLURM = Path(__file__).parent / "golden" / "slurm_job_script.sh"
CHART = files("dask_kubernetes") / "operator/deployment/helm/dask-kubernetes-operator"

CRD_GROUP = "kubernetes.dask.org"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
TLS_SECRET = "merf-dask-tls"
KUSTOMIZE = shutil.which("kubectl")


# ------------------------------------------------------------------------------------ loading

def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifests() -> list[tuple[str, dict]]:
    """``(file:kind/name, doc)`` for every resource in the kustomize base."""
    listed = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())["resources"]
    return [(f"{name}:{doc['kind']}/{doc['metadata']['name']}", doc)
            for name in listed for doc in _documents(K8S_BASE / name)]


def _ids(pairs):
    return [label for label, _ in pairs]


def _is_crd(doc: dict) -> bool:
    return doc["apiVersion"].startswith(CRD_GROUP + "/")


MANIFESTS = _manifests()
CRD_MANIFESTS = [(label, doc) for label, doc in MANIFESTS if _is_crd(doc)]
BUILTIN_MANIFESTS = [(label, doc) for label, doc in MANIFESTS if not _is_crd(doc)]
CONFIG_FILES = sorted(CONFIGS.rglob("*.yaml"))


def _cluster_spec(doc: dict) -> dict | None:
    """The DaskCluster spec of a DaskCluster or DaskJob (``None`` for other kinds)."""
    if doc["kind"] == "DaskJob":
        return doc["spec"]["cluster"]["spec"]
    return doc["spec"] if doc["kind"] == "DaskCluster" else None


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """The pod specs the operator turns a DaskCluster or DaskJob into pods with."""
    name, cluster = f"{doc['kind']}/{doc['metadata']['name']}", _cluster_spec(doc)
    job = [(f"{name}.job", doc["spec"]["job"]["spec"])] if doc["kind"] == "DaskJob" else []
    return job + ([] if cluster is None else [(f"{name}.scheduler", cluster["scheduler"]["spec"]),
                                              (f"{name}.worker", cluster["worker"]["spec"])])


POD_SPECS = [pair for _, doc in CRD_MANIFESTS for pair in _pod_specs(doc)]
SERVICES = [(f"{label}.scheduler", _cluster_spec(doc)["scheduler"]["service"])
            for label, doc in CRD_MANIFESTS if _cluster_spec(doc) is not None]
CONTAINERS = [(f"{where}/{c['name']}", c) for where, spec in POD_SPECS for c in spec["containers"]]


# --------------------------------------------------------------------------------- validators

@functools.cache
def _crd(kind: str) -> dict:
    return yaml.safe_load((CHART / "crds" / f"{kind.lower()}.yaml").read_text())


@functools.cache
def _crd_validator(kind: str, *, strict: bool) -> jsonschema.Draft4Validator:
    (version,) = _crd(kind)["spec"]["versions"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    if strict:
        # what kubeconform -strict does: a field the schema does not list is an error
        _forbid_unlisted_fields(schema)
        # the API server validates these itself; the CRD schema does not list them
        schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"},
                                    metadata={"type": "object"})
    return jsonschema.Draft4Validator(schema)


def _forbid_unlisted_fields(schema) -> None:
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _forbid_unlisted_fields(value)
    elif isinstance(schema, list):
        for value in schema:
            _forbid_unlisted_fields(value)


def _prune_nulls(value):
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_nulls(v) for v in value]
    return value


def _crd_problems(doc: dict, *, strict: bool = True) -> list[str]:
    crd = _crd(doc["kind"])
    expected = f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"
    problems = [] if doc["apiVersion"] == expected else [f"apiVersion is not {expected}"]
    validator = _crd_validator(doc["kind"], strict=strict)
    problems += [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                 for e in validator.iter_errors(_prune_nulls(doc))]
    return problems


def _builtin_problems(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path))}: {err.message}"]
    return []


_REMOVED_COMMAND = re.compile(r"(?<![\w-])dask-(scheduler|worker)(?![\w-])")


def _removed_commands(value) -> list[str]:
    """Strings in a parsed document that invoke the removed console scripts."""
    if isinstance(value, dict):
        return [hit for v in value.values() for hit in _removed_commands(v)]
    if isinstance(value, list):
        return [hit for v in value for hit in _removed_commands(v)]
    return [value] if isinstance(value, str) and _REMOVED_COMMAND.search(value) else []


def _pod_problems(pod: dict) -> list[str]:
    problems = [] if pod.get("automountServiceAccountToken") is False else [
        "automountServiceAccountToken is not false"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        sc, where = c.get("securityContext", {}), f"container {c['name']}"
        expected = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True}
        problems += [f"{where}: securityContext.{key} is not {value}"
                     for key, value in expected.items() if sc.get(key) != value]
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{where}: capabilities do not drop ALL")
        resources = c.get("resources", {})
        problems += [f"{where}: no {kind}.{r}" for kind in ("requests", "limits")
                     for r in ("cpu", "memory") if r not in resources.get(kind, {})]
        mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in c.get("volumeMounts", [])}
        if "emptyDir" not in mounts.get("/tmp", {}):
            problems.append(f"{where}: /tmp is not an emptyDir (the root filesystem is read-only)")
        tls_paths = [e["value"] for e in c.get("env", []) if "__TLS__" in e["name"]]
        secret_dirs = [path for path, volume in mounts.items()
                       if volume.get("secret", {}).get("secretName") == TLS_SECRET]
        if not tls_paths or not all(
                any(p.startswith(d + "/") for d in secret_dirs) for p in tls_paths):
            problems.append(f"{where}: TLS files do not come from the {TLS_SECRET} Secret")
    return problems


# keys that Dask reads but that have no default in the config schema
_DASK_KEYS_WITHOUT_DEFAULT = {"scheduler-address"}
_MISSING = object()


def _env_problems(container: dict) -> list[str]:
    problems = []
    for var in container.get("env", []):
        if not var["name"].startswith("DASK_"):
            continue
        # Dask's own parser: DASK_A__B_C=v becomes {"a": {"b_c": literal_eval(v)}}
        collected = dask.config.collect_env({var["name"]: var["value"]})
        key, value = _flatten(collected)
        if key.replace("_", "-") in _DASK_KEYS_WITHOUT_DEFAULT:
            continue
        default = dask.config.get(key, _MISSING)
        if default is _MISSING:
            problems.append(f"{var['name']}: no Dask config key {key!r}")
        elif default is not None and not isinstance(value, type(default)):
            problems.append(f"{var['name']}: {value!r} is not a {type(default).__name__} "
                            f"like the default {default!r}")
    return problems


def _flatten(nested: dict) -> tuple[str, object]:
    ((key, value),) = nested.items()
    if isinstance(value, dict) and len(value) == 1:
        subkey, leaf = _flatten(value)
        return f"{key}.{subkey}", leaf
    return key, value


def _unknown_helm_keys(values: dict, chart: dict, prefix: str = "") -> list[str]:
    """Keys of ``values`` that ``chart`` does not have.

    Below a chart default that is not a non-empty mapping (``resources: {}``,
    ``podSecurityContext: {}``) anything goes: those are free-form Kubernetes objects.
    """
    unknown = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in chart:
            unknown.append(path)
        elif isinstance(chart[key], dict) and chart[key]:
            if isinstance(value, dict):
                unknown += _unknown_helm_keys(value, chart[key], prefix=path + ".")
            else:
                unknown.append(f"{path} (the chart has a mapping here)")
    return unknown


def _overlay(directory: Path) -> tuple[list[dict], list[str]]:
    """Build a kustomization; return its resources and their validation problems."""
    built = subprocess.run([KUSTOMIZE, "kustomize", str(directory)],
                           capture_output=True, text=True, timeout=60)
    if built.returncode:
        return [], [f"kubectl kustomize {directory}: {built.stderr}"]
    docs = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    problems = [f"{doc['kind']}/{doc['metadata']['name']}: {problem}" for doc in docs
                for problem in (_crd_problems(doc) if _is_crd(doc) else _builtin_problems(doc))]
    return docs, problems


def _normalised_job_script(spec: ClusterSpec, *, workdir: Path) -> str:
    # dask-jobqueue creates the (relative) log directory when the cluster is built
    with contextlib.chdir(workdir), contextlib.closing(spec.build()) as cluster:
        script = cluster.job_script()
    # the scheduler's address and this interpreter's path differ on every machine
    script = re.sub(r"tcp://[^\s]+", "tcp://SCHEDULER:PORT", script)
    return script.replace(sys.executable, "PYTHON")


# ------------------------------------------------------------------------- Kubernetes manifests

def test_base_has_every_operator_kind():
    assert {doc["kind"] for _, doc in CRD_MANIFESTS} == {"DaskCluster", "DaskJob", "DaskAutoscaler"}


@pytest.mark.parametrize("doc", [doc for _, doc in CRD_MANIFESTS], ids=_ids(CRD_MANIFESTS))
def test_crd_manifest_validates_strictly(doc):
    assert _crd_problems(doc) == []


@pytest.mark.parametrize("doc", [doc for _, doc in BUILTIN_MANIFESTS], ids=_ids(BUILTIN_MANIFESTS))
def test_builtin_manifest_validates_strictly(doc):
    assert _builtin_problems(doc) == []


@pytest.mark.parametrize("pod", [pod for _, pod in POD_SPECS], ids=_ids(POD_SPECS))
def test_operator_pods_validate_and_are_hardened(pod):
    # the operator copies these specs into Pods (via Deployments), which the API server
    # validates against its own, newer PodSpec schema than the one embedded in the CRDs
    as_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod}
    assert _builtin_problems(as_pod) == []
    assert _pod_problems(pod) == []


@pytest.mark.parametrize("service", [s for _, s in SERVICES], ids=_ids(SERVICES))
def test_scheduler_service_validates(service):
    as_service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "check"},
                  "spec": service}
    assert _builtin_problems(as_service) == []


@pytest.mark.parametrize("container", [c for _, c in CONTAINERS], ids=_ids(CONTAINERS))
def test_dask_env_vars_are_real_config_keys(container):
    assert _env_problems(container) == []


@pytest.mark.parametrize("container", [c for _, c in CONTAINERS if c["name"] == "scheduler"],
                         ids=[label for label, c in CONTAINERS if c["name"] == "scheduler"])
def test_scheduler_http_routes_are_the_defaults_plus_the_api(container):
    (routes,) = [var for var in container["env"] if var["name"].endswith("__HTTP__ROUTES")]
    _, modules = _flatten(dask.config.collect_env({routes["name"]: routes["value"]}))
    # distributed's shipped defaults, read from its YAML: a scheduler started without bokeh in
    # this process appends a route to the live config list in place
    shipped = yaml.safe_load((files("distributed") / "distributed.yaml").read_text())
    defaults = shipped["distributed"]["scheduler"]["http"]["routes"]
    assert set(modules) == {*defaults, "distributed.http.scheduler.api"}
    for module in modules:
        importlib.import_module(module)


@pytest.mark.parametrize("container", [c for _, c in CONTAINERS], ids=_ids(CONTAINERS))
def test_containers_run_dask_subcommands(container):
    args = container["args"]
    if container["name"] == "job":
        assert args[:2] == ["merf-dask", "fit"]
    else:
        assert args[:2] == ["dask", container["name"]]


@pytest.mark.skipif(KUSTOMIZE is None, reason="kubectl (for `kubectl kustomize`) is not installed")
def test_prod_overlay_builds_and_validates():
    docs, problems = _overlay(PROD_OVERLAY)
    assert problems == []
    assert sorted(d["kind"] for d in docs) == sorted(d["kind"] for _, d in MANIFESTS)
    assert {doc["metadata"]["namespace"] for doc in docs} == {"merf-prod"}
    by_kind = {doc["kind"]: doc for doc in docs}
    assert by_kind["DaskCluster"]["spec"]["worker"]["replicas"] == 16
    assert by_kind["DaskJob"]["spec"]["cluster"]["spec"]["worker"]["replicas"] == 32
    assert by_kind["DaskAutoscaler"]["spec"]["maximum"] == 64
    images = {c["image"] for doc in docs for _, pod in _pod_specs(doc) for c in pod["containers"]}
    assert images == {"registry.example.org/merf-dask:0.1.0"}


def test_helm_values_use_only_chart_keys():
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    assert _unknown_helm_keys(yaml.safe_load(HELM_VALUES.read_text()), chart) == []


# --------------------------------------------------------------------- every config in the tree

@pytest.mark.parametrize("path", CONFIG_FILES,
                         ids=[str(p.relative_to(CONFIGS)) for p in CONFIG_FILES])
def test_no_removed_dask_commands(path):
    assert _removed_commands(_documents(path)) == []


@pytest.mark.parametrize("name", ["tcp.yaml", "scheduler-file.yaml", "tls.yaml"])
def test_scheduler_configs_load(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, SchedulerConfig)
    assert (config.address is None) != (config.scheduler_file is None)
    if name == "tls.yaml":
        assert config.address.startswith("tls://")
        assert config.security.require_encryption
        assert config.security.tls_client_cert.endswith("tls.crt")


@pytest.mark.parametrize("name", ["local.yaml", "ssh.yaml", "hpc/slurm.yaml"])
def test_dask_ctl_specs_load_and_name_a_cluster_factory(name):
    spec = load_config(CONFIGS / name)
    assert isinstance(spec, ClusterSpec)
    # a class, or a factory function such as distributed.SSHCluster
    assert callable(getattr(importlib.import_module(spec.module), spec.class_name))


# building the cluster starts a scheduler, whose HTTP server moves off 8787 when it is taken
_ANOTHER_DASHBOARD = pytest.mark.filterwarnings("ignore:Port 8787 is already in use")


@_ANOTHER_DASHBOARD
def test_slurm_job_script_matches_golden_file(tmp_path):
    spec = load_config(CONFIGS / "hpc" / "slurm.yaml")
    assert spec.scale == {"jobs": 4}  # applied by connect(), never here: nothing is submitted
    assert _normalised_job_script(spec, workdir=tmp_path) == GOLDEN_SLURM.read_text()


# -------------------------------------------------------- every validator can fail (negatives)

def _daskcluster() -> dict:
    return copy.deepcopy(next(doc for _, doc in CRD_MANIFESTS if doc["kind"] == "DaskCluster"))


def test_strict_crd_validation_catches_a_misspelt_field():
    doc = _daskcluster()
    doc["spec"]["worker"]["replica"] = doc["spec"]["worker"].pop("replicas")
    # the API server would prune the typo and run one worker; only strict mode notices
    assert _crd_problems(doc, strict=False) == []
    assert any("'replica' was unexpected" in p for p in _crd_problems(doc))


def test_crd_validation_catches_wrong_types_and_missing_fields():
    doc = _daskcluster()
    doc["spec"]["worker"]["replicas"] = "four"
    del doc["spec"]["scheduler"]["service"]
    problems = _crd_problems(doc)
    assert any("'four' is not of type 'integer'" in p for p in problems)
    assert any("'service' is a required property" in p for p in problems)


def test_builtin_validation_catches_a_misspelt_field():
    doc = copy.deepcopy(next(doc for _, doc in BUILTIN_MANIFESTS if doc["kind"] == "NetworkPolicy"))
    doc["spec"]["podSelectr"] = doc["spec"].pop("podSelector")
    assert _builtin_problems(doc) != []


def test_removed_command_check_flags_old_scripts_only():
    assert _removed_commands({"args": ["dask-worker", "tcp://s:8786"]}) == ["dask-worker"]
    assert _removed_commands(["/usr/bin/dask-scheduler --port 8786"]) != []
    assert _removed_commands({"name": "merf-dask-scheduler", "args": ["dask", "worker"]}) == []


def test_pod_check_catches_root_and_a_missing_tmp():
    pod = copy.deepcopy(_daskcluster()["spec"]["worker"]["spec"])
    container = pod["containers"][0]
    del container["securityContext"]["runAsNonRoot"]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/tmp"]
    problems = _pod_problems(pod)
    assert any("runAsNonRoot" in p for p in problems)
    assert any("/tmp" in p for p in problems)


def test_env_check_catches_a_misspelt_key_and_a_wrong_type():
    container = {"env": [
        {"name": "DASK_DISTRIBUTED__COMM__TLS__CA_FIEL", "value": "/ca.crt"},
        {"name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES", "value": "distributed.http.health"},
    ]}
    problems = _env_problems(container)
    assert any("no Dask config key" in p for p in problems)
    assert any("is not a list" in p for p in problems)


def test_helm_check_catches_a_misspelt_key():
    chart = yaml.safe_load((CHART / "values.yaml").read_text())
    values = {"kopfArg": ["--namespace=merf"], "image": {"tags": "x"},
              "resources": {"limits": {"cpu": 1}}}
    assert _unknown_helm_keys(values, chart) == ["kopfArg", "image.tags"]


@pytest.mark.skipif(KUSTOMIZE is None, reason="kubectl (for `kubectl kustomize`) is not installed")
def test_overlay_check_catches_a_misspelt_patch(tmp_path):
    # a copy of the tree, because kustomize only loads bases by relative path
    shutil.copytree(K8S_BASE.parent, tmp_path, dirs_exist_ok=True)
    overlay_file = tmp_path / PROD_OVERLAY.relative_to(K8S_BASE.parent) / "kustomization.yaml"
    overlay = yaml.safe_load(overlay_file.read_text())
    overlay["patches"][0]["patch"] = "- {op: replace, path: /spec/worker/replica, value: 16}"
    overlay_file.write_text(yaml.safe_dump(overlay))
    # kustomize "replaces" the missing field without complaint: strict validation notices
    docs, problems = _overlay(overlay_file.parent)
    assert docs
    assert any("'replica' was unexpected" in p for p in problems)


@_ANOTHER_DASHBOARD
def test_golden_comparison_notices_a_changed_spec(tmp_path):
    spec = load_config(CONFIGS / "hpc" / "slurm.yaml")
    changed = dataclasses.replace(spec, kwargs={**spec.kwargs, "walltime": "01:00:00"})
    assert _normalised_job_script(changed, workdir=tmp_path) != GOLDEN_SLURM.read_text()
