"""Model directories: what a fitted :class:`~merf_dask.MERF` leaves behind, and loading it back.

A model directory (local path or fsspec URL) holds::

    learner.joblib           the fitted fixed-effects learner
    random_effects.parquet   cluster id, one column per random effect, and the entries of
                             Var(b_i | y_i) (``var[name]`` and ``cov[name1,name2]``)
    manifest.json            formula, parameters, input schema and encoder, variance components,
                             GLL / sigma2 / D histories, package versions, a data fingerprint,
                             the model's size and the SHA-256 of every other file

It is written through :func:`merf_dask.io.filesystem.atomic_directory` (all or nothing; an existing
directory is replaced only with ``overwrite=True``). :func:`load_model` recomputes every hash and
refuses a directory whose files were changed.

Functions
---------
save_model, load_model
read_manifest
    The manifest alone (for ``merf-dask show``).
data_fingerprint
    A cheap fingerprint of a lake (its files' paths and sizes).
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from importlib import metadata

import joblib
import numpy as np
import pandas as pd

from .report import render_report
from .filesystem import atomic_directory, check_complete, open_filesystem

__all__ = ["save_model", "load_model", "read_manifest", "data_fingerprint", "MANIFEST", "LEARNER", "RANDOM_EFFECTS"]

MANIFEST, LEARNER, RANDOM_EFFECTS = "manifest.json", "learner.joblib", "random_effects.parquet"
FORMAT_VERSION = 1
_PACKAGES = ("merf-dask", "numpy", "pandas", "scikit-learn", "dask", "distributed", "pyarrow")
_CLUSTER_COLUMN = "cluster"


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _random_effects_frame(model) -> pd.DataFrame:
    names = list(model.z_names_)
    frame = pd.DataFrame({_CLUSTER_COLUMN: model.b_.index.to_numpy()})
    for j, name in enumerate(names):
        frame[name] = model.b_.iloc[:, j].to_numpy()
    for j, name in enumerate(names):
        frame[f"var[{name}]"] = model.b_cov_[:, j, j]
        for k in range(j + 1, len(names)):
            frame[f"cov[{name},{names[k]}]"] = model.b_cov_[:, j, k]
    return frame


def _conditional_covariances(frame: pd.DataFrame, names: list[str]) -> np.ndarray:
    q = len(names)
    b_cov = np.empty((len(frame), q, q))
    for j, name in enumerate(names):
        b_cov[:, j, j] = frame[f"var[{name}]"].to_numpy()
        for k in range(j + 1, q):
            b_cov[:, j, k] = b_cov[:, k, j] = frame[f"cov[{name},{names[k]}]"].to_numpy()
    return b_cov


def _parameters(model) -> dict:
    params = model.get_params(deep=False)
    learner = model.fe_model_
    return {
        "formula": params["formula"],
        "max_iterations": params["max_iterations"],
        "tol": params["tol"],
        "oob": params["oob"],
        "n_folds": params["n_folds"],
        "member_rows": params["member_rows"],
        "random_state": params["random_state"] if isinstance(params["random_state"], int) else None,
        "learner": type(learner).__module__ + "." + type(learner).__qualname__,
        "learner_params": {k: v for k, v in learner.get_params(deep=False).items()
                           if isinstance(v, (int, float, str, bool, type(None)))},
    }


def _schema(model) -> dict:
    schema = {"features": list(model.feature_names_in_), "random_effects": list(model.z_names_)}
    if model.formula is not None:
        spec = model.formula_spec_
        schema.update(response=spec.response, group=spec.group, slopes=list(spec.random),
                      random_intercept=spec.random_intercept, encoder=model.encoder_.to_dict())
    return schema


def save_model(model, url, *, overwrite: bool = False, storage_options: dict | None = None,
               fingerprint: dict | None = None, report: bool = True) -> None:
    """Write a fitted model as a model directory (atomically).

    Parameters
    ----------
    model : MERF
        A fitted model.
    url : str or path-like
        Destination directory, local or fsspec URL.
    overwrite : bool, default=False
        Replace an existing directory.
    storage_options : dict, optional
    fingerprint : dict, optional
        Description of the training data to record (see :func:`data_fingerprint`).
    report : bool, default=True
        Also write the HTML report (:mod:`merf_dask.io.report`) when matplotlib is installed.
    """
    learner_bytes = io.BytesIO()
    joblib.dump(model.fe_model_, learner_bytes, compress=3)
    effects_bytes = io.BytesIO()
    _random_effects_frame(model).to_parquet(effects_bytes, index=False)
    files = {LEARNER: learner_bytes.getvalue(), RANDOM_EFFECTS: effects_bytes.getvalue()}
    model_size = sum(len(content) for content in files.values())  # the report is not the model
    if report:
        files.update(render_report(model, summary=model.summary()) or {})
    manifest = {
        "format_version": FORMAT_VERSION,
        "parameters": _parameters(model),
        "schema": _schema(model),
        "n_rows": int(model.n_rows_),
        "n_clusters": int(len(model.b_)),
        "sigma2": model.sigma2_,
        "D": model.D_.tolist(),
        "n_iter": model.n_iter_,
        "converged": bool(model.converged_),
        "oob": bool(model.oob_),
        "history": [r.to_json() for r in model.history_],
        "data_fingerprint": fingerprint,
        "model_size_bytes": model_size,
        "versions": _versions(),
        "sha256": {name: hashlib.sha256(content).hexdigest() for name, content in files.items()},
    }
    files[MANIFEST] = json.dumps(manifest, indent=2, default=float).encode()
    with atomic_directory(url, overwrite=overwrite, storage_options=storage_options) as staging:
        filesystem, root = open_filesystem(staging, storage_options=storage_options)
        for name, content in files.items():
            with filesystem.open(f"{root}/{name}", "wb") as handle:
                handle.write(content)


def read_manifest(url, *, storage_options: dict | None = None) -> dict:
    """The manifest of a model directory, with a clear error when there is none."""
    filesystem, root = open_filesystem(url, storage_options=storage_options)
    if not filesystem.exists(f"{root}/{MANIFEST}"):
        raise FileNotFoundError(f"{url} is not a model directory: it has no {MANIFEST}")
    check_complete(url, storage_options=storage_options)
    with filesystem.open(f"{root}/{MANIFEST}", "rb") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{url}/{MANIFEST} is not valid JSON: {error}") from None


def load_model(url, *, storage_options: dict | None = None):
    """Load a model directory written by :func:`save_model`, checking every file's SHA-256.

    Raises
    ------
    FileNotFoundError
        ``url`` is not a model directory.
    ValueError
        A file is missing or its content differs from the hash in the manifest.
    """
    from ..estimator import MERF
    from ..formula import FeatureEncoder, FormulaSpec
    from ..core.em import IterationRecord

    manifest = read_manifest(url, storage_options=storage_options)
    filesystem, root = open_filesystem(url, storage_options=storage_options)
    contents = {}
    for name, expected in manifest["sha256"].items():
        path = f"{root}/{name}"
        if not filesystem.exists(path):
            raise ValueError(f"model directory {url} is missing {name}")
        contents[name] = filesystem.cat_file(path)
        if hashlib.sha256(contents[name]).hexdigest() != expected:
            raise ValueError(f"{url}/{name} was modified after the model was saved "
                             "(SHA-256 differs from the manifest); refusing to load it")
    params = manifest["parameters"]
    schema = manifest["schema"]
    model = MERF(formula=params["formula"], max_iterations=params["max_iterations"],
                 tol=params["tol"], oob=params["oob"], n_folds=params["n_folds"],
                 member_rows=params["member_rows"],
                 random_state=params["random_state"])
    model.fe_model_ = joblib.load(io.BytesIO(contents[LEARNER]))
    effects = pd.read_parquet(io.BytesIO(contents[RANDOM_EFFECTS]))
    names = schema["random_effects"]
    model.z_names_ = names
    model.b_ = pd.DataFrame(effects[names].to_numpy(), columns=names,
                            index=pd.Index(effects[_CLUSTER_COLUMN], name="cluster"))
    model.b_cov_ = _conditional_covariances(effects, names)
    model.sigma2_ = float(manifest["sigma2"])
    model.D_ = np.asarray(manifest["D"], dtype=float)
    model.history_ = [IterationRecord.from_json(r) for r in manifest["history"]]
    model.gll_history_ = [r.gll for r in model.history_]
    model.sigma2_history_ = [r.sigma2 for r in model.history_]
    model.D_history_ = [r.D for r in model.history_]
    model.val_loss_history_ = [r.val_mse for r in model.history_ if r.val_mse is not None]
    model.n_rows_ = manifest["n_rows"]
    model.n_iter_ = manifest["n_iter"]
    model.converged_ = manifest["converged"]
    model.oob_ = manifest["oob"]
    model.feature_names_in_ = np.asarray(schema["features"], dtype=object)
    model.n_features_in_ = len(schema["features"])
    if params["formula"] is not None:
        model.formula_spec_ = FormulaSpec(
            text=params["formula"], response=schema["response"], fixed=tuple(schema["features"]),
            random=tuple(schema["slopes"]), random_intercept=schema["random_intercept"],
            group=schema["group"])
        model.encoder_ = FeatureEncoder.from_dict(schema["encoder"])
    model.manifest_ = manifest
    return model


def data_fingerprint(url, *, storage_options: dict | None = None) -> dict:
    """A cheap fingerprint of a lake: SHA-256 over its files' paths and sizes (no data is read)."""
    filesystem, root = open_filesystem(url, storage_options=storage_options)
    files = sorted((path[len(root):], info["size"])
                   for path, info in filesystem.find(root, detail=True).items())
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {"source": str(url), "n_files": len(files), "sha256": digest}
