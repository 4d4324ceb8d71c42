"""Model directories: what a fitted :class:`~merf_dask.MERF` leaves behind, and loading it back.

A model directory (local path or fsspec URL) holds::

    learner.skops            the fitted fixed-effects learner and the unfitted one (the
                             ``fixed_effects_model`` parameter), as data: skops for
                             scikit-learn, LightGBM's text model for LightGBM
                             (:mod:`merf_dask.io.learner_file`); ``learner.joblib``, a pickle,
                             instead for a learner of types merf-dask does not trust
    random_effects_<k>.parquet
                             one per grouping factor (k = 0, 1, ... in model order): the
                             level, one column per random effect, and the entries of
                             Var(b | y) (``var[name]`` and ``cov[name1,name2]``)
    manifest.json            format version, every parameter, input schema and encoder, variance
                             components, GLL / sigma2 / D histories, package versions, a data
                             fingerprint, the model's size, the SHA-256 of every other file and
                             its own SHA-256 (``manifest_sha256``, over the rest of the manifest)
    signature                with a signing key set: an HMAC-SHA256 of the manifest
                             (:mod:`merf_dask.io.signing`)

It is written through :func:`merf_dask.io.filesystem.atomic_directory` (all or nothing; an existing
directory is replaced only with ``overwrite=True``). The module works on a
:class:`~merf_dask.core.state.ModelState` and the estimator's parameters, never on the estimator.
:func:`load_model` checks the format version and every digest, the manifest's own included, and
refuses a directory whose files were changed. The digests catch corruption and careless edits,
not an attacker who can rewrite the digests too; that attacker cannot run code through a loaded
model, as a pickle is loaded only with ``trusted=True``, and with a signing key set cannot
change the directory at all (the signature is checked before any other file is read).

Functions
---------
save_model, load_model
read_manifest
    The manifest alone (for ``merf-dask show``).
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from importlib import metadata

import numpy as np
import pandas as pd

from ..core.em import IterationRecord
from ..core.state import ModelState
from ..core.random_effects import FactorEffects, RandomFactor
from ..formula import ModelDesign
from . import signing
from .filesystem import atomic_directory, check_complete, open_filesystem
from .learner_file import PICKLE_FILE, SKOPS_FILE, dump_learner, load_learner
from .report import render_report

__all__ = ["save_model", "load_model", "read_manifest", "MANIFEST",
           "random_effects_file"]

MANIFEST = "manifest.json"
#: Version 2: the manifest carries its own digest, the unfitted learner and every parameter.
#: Version 3: the learner file is data (``learner.skops``) unless its types are not trusted,
#: named by the manifest's ``learner_file``; an optional signature.
FORMAT_VERSION = 3
#: The manifest's key holding the SHA-256 of the rest of the manifest.
MANIFEST_DIGEST = "manifest_sha256"
_PACKAGES = ("merf-dask", "numpy", "pandas", "scikit-learn", "dask", "distributed", "pyarrow")
_LEVEL_COLUMN = "level"


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def random_effects_file(k: int) -> str:
    """The model directory's file of factor k's random effects."""
    return f"random_effects_{k}.parquet"


def _random_effects_frame(effects) -> pd.DataFrame:
    names = list(effects.factor.z_names)
    frame = pd.DataFrame({_LEVEL_COLUMN: np.asarray(effects.levels)})
    for j, name in enumerate(names):
        frame[name] = effects.b[:, j]
    for j, name in enumerate(names):
        frame[f"var[{name}]"] = effects.b_cov[:, j, j]
        for k in range(j + 1, len(names)):
            frame[f"cov[{name},{names[k]}]"] = effects.b_cov[:, j, k]
    return frame


def _factor_effects(frame: pd.DataFrame, described: dict) -> FactorEffects:
    """A factor's effects from its file and its manifest entry."""
    factor = RandomFactor(name=described["name"], z_names=tuple(described["z_names"]),
                          blocks=tuple(tuple(block) for block in described["blocks"]))
    names, q = list(factor.z_names), factor.q
    b_cov = np.empty((len(frame), q, q))
    for j, name in enumerate(names):
        b_cov[:, j, j] = frame[f"var[{name}]"].to_numpy()
        for k in range(j + 1, q):
            b_cov[:, j, k] = b_cov[:, k, j] = frame[f"cov[{name},{names[k]}]"].to_numpy()
    return FactorEffects(factor=factor, levels=pd.Index(frame[_LEVEL_COLUMN], name=factor.name),
                         b=frame[names].to_numpy(dtype=float), b_cov=b_cov,
                         D=np.asarray(described["D"], dtype=float))


def _json_random_state(value):
    """A ``random_state`` parameter as JSON: an int or None as is, a RandomState by its state."""
    if isinstance(value, np.random.RandomState):
        state = value.get_state(legacy=False)
        return {"RandomState": {**state, "state": {"key": state["state"]["key"].tolist(),
                                                   "pos": state["state"]["pos"]}}}
    return None if value is None else int(value)


def _random_state_from_json(value):
    if isinstance(value, dict):
        state = value["RandomState"]
        generator = np.random.RandomState()
        generator.set_state({**state, "state": {"key": np.asarray(state["state"]["key"],
                                                                   dtype=np.uint32),
                                                "pos": state["state"]["pos"]}})
        return generator
    return value


def _parameters(params: dict) -> dict:
    """The estimator's parameters as JSON (the learner is stored in the learner file, a client
    never travels)."""
    values = {name: value for name, value in params.items()
              if name not in ("fixed_effects_model", "client")}
    values["random_state"] = _json_random_state(values["random_state"])
    if values.get("checkpoint") is not None:
        values["checkpoint"] = str(values["checkpoint"])
    return values


def _schema(state) -> dict:
    schema = {"features": list(state.feature_names), "x_named": bool(state.x_named),
              "z_named": bool(state.z_named)}
    if state.design is not None:
        schema["design"] = state.design.to_dict()
    return schema


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's content without its own digest (keys sorted)."""
    content = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def save_model(state, params: dict, url, *, overwrite: bool = False,
               storage_options: dict | None = None, fingerprint: dict | None = None,
               summary: str | None = None) -> None:
    """Write a fitted model as a model directory (atomically).

    Parameters
    ----------
    state : merf_dask.core.state.ModelState
        The fitted model.
    params : dict
        The estimator's ``get_params(deep=False)``; ``fixed_effects_model`` (the unfitted
        learner) is stored with the fitted one, so a loaded model's ``get_params()`` is the
        saved model's.
    url : str or path-like
        Destination directory, local or fsspec URL.
    overwrite : bool, default=False
        Replace an existing directory.
    storage_options : dict, optional
    fingerprint : dict, optional
        Description of the training data to record
        (:func:`merf_dask.io.filesystem.data_fingerprint`).
    summary : str, optional
        The model's text summary; with it, the HTML report (:mod:`merf_dask.io.report`) is
        written too when matplotlib is installed.

    Raises
    ------
    ValueError
        The signing key in the environment is unusable (:func:`merf_dask.io.signing.signing_key`).

    Warns
    -----
    UserWarning
        The learner holds types merf-dask does not trust, so it is pickled
        (:func:`merf_dask.io.learner_file.dump_learner`).

    Notes
    -----
    With a signing key set, the directory is signed (a ``signature`` file).
    """
    key = signing.signing_key()  # before any work: a bad key fails at once
    learner_file, learner_bytes = dump_learner(
        {"fitted": state.fe_model, "unfitted": params["fixed_effects_model"]})
    files = {learner_file: learner_bytes}
    for k, effects in enumerate(state.effects):
        buffer = io.BytesIO()
        _random_effects_frame(effects).to_parquet(buffer, index=False)
        files[random_effects_file(k)] = buffer.getvalue()
    model_size = sum(len(content) for content in files.values())  # the report is not the model
    if summary is not None:
        files.update(render_report(state, summary=summary) or {})
    learner = state.fe_model
    manifest = {
        "format_version": FORMAT_VERSION,
        "learner_file": learner_file,
        "parameters": _parameters(params),
        "learner": type(learner).__module__ + "." + type(learner).__qualname__,
        "learner_params": {k: v for k, v in learner.get_params(deep=False).items()
                           if isinstance(v, (int, float, str, bool, type(None)))},
        "schema": _schema(state),
        "n_rows": int(state.n_rows),
        "n_clusters": int(len(state.effects[0].levels)),
        "sigma2": state.sigma2,
        "classes": None if state.classes is None else np.asarray(state.classes).tolist(),
        "factors": [{"name": e.factor.name, "z_names": list(e.factor.z_names),
                     "blocks": [list(block) for block in e.factor.blocks],
                     "n_levels": int(len(e.levels)), "D": np.asarray(e.D).tolist()}
                    for e in state.effects],
        "n_iter": len(state.history),
        "converged": bool(state.converged),
        "oob": state.honest != "in-sample",
        "honest": state.honest,
        "n_partitions": int(state.n_partitions),
        "resumed_from": int(state.resumed_from),
        "history": [r.to_json() for r in state.history],
        "data_fingerprint": fingerprint,
        "model_size_bytes": model_size,
        "versions": _versions(),
        "sha256": {name: hashlib.sha256(content).hexdigest() for name, content in files.items()},
    }
    manifest = json.loads(json.dumps(manifest, default=float))  # the values a reader will see
    manifest[MANIFEST_DIGEST] = _manifest_digest(manifest)
    files[MANIFEST] = json.dumps(manifest, indent=2).encode()
    if key is not None:  # over the manifest's bytes, which hold every other file's SHA-256
        files[signing.SIGNATURE] = signing.sign(files[MANIFEST], key=key)
    with atomic_directory(url, overwrite=overwrite, storage_options=storage_options) as staging:
        filesystem, root = open_filesystem(staging, storage_options=storage_options)
        for name, content in files.items():
            with filesystem.open(f"{root}/{name}", "wb") as handle:
                handle.write(content)


def read_manifest(url, *, storage_options: dict | None = None) -> dict:
    """The manifest of a model directory, checked: its format version, its signature while a
    signing key is set (:mod:`merf_dask.io.signing`) and its own digest.

    Raises
    ------
    FileNotFoundError
        ``url`` has no manifest.
    ValueError
        The manifest is not JSON, was written in another format version (the message names it
        and says to fit the model again), or was changed after the model was saved.
    merf_dask.io.signing.SignatureError
        A signing key is set and the directory is unsigned or its signature does not match.
    """
    filesystem, root = open_filesystem(url, storage_options=storage_options)
    if not filesystem.exists(f"{root}/{MANIFEST}"):
        raise FileNotFoundError(f"{url} is not a model directory: it has no {MANIFEST}")
    check_complete(url, storage_options=storage_options)
    raw = filesystem.cat_file(f"{root}/{MANIFEST}")  # the bytes the signature is over
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{url}/{MANIFEST} is not valid JSON: {error}") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        # format 2 and older hold the learner as a pickle, which this version never reads
        # unasked; their layout is not this version's either, so they are fitted again
        pickled = " (its learner a pickle, which runs code when loaded)" \
            if version in (1, 2) else ""
        raise ValueError(
            f"{url} is a model directory of format version {version}{pickled}; this merf-dask "
            f"({_versions()['merf-dask']}) reads format version {FORMAT_VERSION}: fit the model "
            "again with this version and save it")
    key = signing.signing_key()
    if key is not None:
        signature = f"{root}/{signing.SIGNATURE}"
        signing.verify(raw, filesystem.cat_file(signature) if filesystem.exists(signature)
                       else None, key=key, source=str(url))
    if manifest.get(MANIFEST_DIGEST) != _manifest_digest(manifest):
        raise ValueError(f"{url}/{MANIFEST} was modified after the model was saved (its "
                         f"{MANIFEST_DIGEST} does not match its content); refusing to load it")
    return manifest


def load_model(url, *, storage_options: dict | None = None, trusted: bool = False):
    """Load a model directory written by :func:`save_model`, checking every file's SHA-256.

    Parameters
    ----------
    url : str or path-like
    storage_options : dict, optional
    trusted : bool, default=False
        Also load a learner file that can run code when it is loaded: a pickle
        (``learner.joblib``, written for learners of types merf-dask does not trust) or a
        skops file with types outside :data:`merf_dask.io.learner_file.TRUSTED_TYPES`.
        Only for model directories you or your pipeline wrote. It does not skip the digests or
        the signature.

    Returns
    -------
    params : dict
        The estimator's parameters, as ``get_params(deep=False)`` gave them at save time.
    state : merf_dask.core.state.ModelState
    manifest : dict

    Raises
    ------
    FileNotFoundError
        ``url`` is not a model directory.
    ValueError
        The manifest or a file is missing, of another format version, or differs from the
        hashes in the manifest.
    merf_dask.io.learner_file.UntrustedModelError
        Without ``trusted``: the learner file could run code (a ``ValueError`` too).
    merf_dask.io.signing.SignatureError
        A signing key is set and the directory is unsigned or mis-signed (a ``ValueError``).
    """
    manifest = read_manifest(url, storage_options=storage_options)
    filesystem, root = open_filesystem(url, storage_options=storage_options)
    learner_file = manifest.get("learner_file")
    if learner_file not in (SKOPS_FILE, PICKLE_FILE):
        raise ValueError(f"{url}/{MANIFEST} names no learner file ({learner_file!r}); refusing "
                         "to load it")
    hashes = manifest.get("sha256") or {}
    contents = {}
    effect_files = [random_effects_file(k) for k in range(len(manifest["factors"]))]
    for name in (learner_file, *effect_files, *hashes):
        if name not in hashes:
            raise ValueError(f"{url}/{MANIFEST} lists no SHA-256 for {name}; refusing to load it")
        path = f"{root}/{name}"
        if not filesystem.exists(path):
            raise ValueError(f"model directory {url} is missing {name}")
        contents[name] = filesystem.cat_file(path)
        if hashlib.sha256(contents[name]).hexdigest() != hashes[name]:
            raise ValueError(f"{url}/{name} was modified after the model was saved "
                             "(SHA-256 differs from the manifest); refusing to load it")
    learner = load_learner(learner_file, contents[learner_file], trusted=trusted,
                           source=f"{url}/{learner_file}")
    params = {**manifest["parameters"], "fixed_effects_model": learner["unfitted"]}
    params["random_state"] = _random_state_from_json(params["random_state"])
    schema = manifest["schema"]
    effects = [_factor_effects(pd.read_parquet(io.BytesIO(contents[name])), described)
               for name, described in zip(effect_files, manifest["factors"])]
    formula_spec = design = None
    if params["formula"] is not None:
        design = ModelDesign.from_dict(schema["design"])
        formula_spec = design.spec
    state = ModelState(
        fe_model=learner["fitted"], effects=effects,
        sigma2=None if manifest["sigma2"] is None else float(manifest["sigma2"]),
        history=[IterationRecord.from_json(r) for r in manifest["history"]],
        n_rows=manifest["n_rows"], converged=manifest["converged"], honest=manifest["honest"],
        feature_names=list(schema["features"]), x_named=schema["x_named"],
        z_named=schema["z_named"], formula_spec=formula_spec, design=design,
        n_partitions=manifest["n_partitions"], resumed_from=manifest["resumed_from"],
        classes=manifest.get("classes"))
    return params, state, manifest
