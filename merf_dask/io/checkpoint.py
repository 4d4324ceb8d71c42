"""Checkpoints of the EM loop, so that a killed fit resumes after its last finished iteration.

A checkpoint is one Parquet file: for every grouping factor k, a column ``level<k>`` of its levels
and columns ``b<k>[j]`` of their b (the factors' columns padded with nulls to the longest), and in
the file's metadata each factor's number of levels, the iteration, sigma2, every D, the history,
the fit's seed and a key naming the fit it belongs to (its parameters and data size); a fit with
warm-started members (which its next M-step goes on from) adds a column ``members``, whose first
cell is their learner file (skops, trusted types only, as in a model directory). It is
written to a temporary name and renamed, so a reader sees the previous checkpoint or the new one,
never half of one; on object stores the upload itself is atomic.

Functions
---------
fit_key
    The key of a fit: what must match for a checkpoint to be resumed.
write_checkpoint, read_checkpoint, remove_checkpoint
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import warnings

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.em import EMState, IterationRecord
from ..core.ensemble import FoldEnsemble
from .filesystem import open_filesystem
from .learner_file import SKOPS_FILE, dump_learner, load_learner

__all__ = ["fit_key", "write_checkpoint", "read_checkpoint", "remove_checkpoint"]

logger = logging.getLogger("merf_dask")

_METADATA_KEY = b"merf_dask:checkpoint"


def fit_key(parameters: dict, *, n_rows: int, n_clusters: int) -> str:
    """Hash of the fit's parameters (learners by their full parameters, not their repr, which
    scikit-learn abbreviates) and the size of its data."""
    return joblib.hash({"parameters": parameters, "n_rows": n_rows, "n_clusters": n_clusters})


def write_checkpoint(url: str | os.PathLike, state: EMState, *, key: str, seed: int) -> None:
    """Write ``state`` and the fit's ``seed`` to ``url`` atomically (temporary name, then
    rename)."""
    longest = max(len(levels) for levels, _ in state.effects)
    columns = {}
    for k, (levels, b) in enumerate(state.effects):
        padding = longest - len(levels)
        level_array = pa.array(np.asarray(levels))
        columns[f"level{k}"] = pa.concat_arrays([level_array, pa.nulls(padding, level_array.type)])
        for j in range(b.shape[1]):
            columns[f"b{k}[{j}]"] = pa.array(np.concatenate([b[:, j], np.full(padding, np.nan)]))
    metadata = {"key": key, "seed": seed, "iteration": state.iteration, "sigma2": state.sigma2,
                "D": [np.asarray(D).tolist() for D in state.D],
                "n_levels": [len(levels) for levels, _ in state.effects],
                "history": [r.to_json() for r in state.history]}
    members = _members_file(state.members)
    if members is not None:
        columns["members"] = pa.array([members, *[None] * (longest - 1)], type=pa.binary())
        metadata["member_indices"] = [int(member) for member, _ in state.members]
    table = pa.table(columns)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(metadata).encode()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    filesystem, path = open_filesystem(url)
    filesystem.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    # one fixed temporary name: a write killed half-way leaves a file the next write replaces
    filesystem.pipe_file(_temporary(path), buffer.getvalue())
    filesystem.mv(_temporary(path), path)


def _members_file(members: list | None) -> bytes | None:
    """The skops learner file of warm-started members, or None when there are none or they hold
    types a checkpoint does not load safely (such a fit resumes from the start)."""
    if not members:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the model directory's pickle warning
        name, content = dump_learner(FoldEnsemble([estimator for _, estimator in members]))
    if name != SKOPS_FILE:
        logger.warning("the checkpoint holds no members: the learner has types merf-dask does "
                       "not load safely, so a resumed fit would start afresh")
        return None
    return content


def _temporary(path: str) -> str:
    return f"{path}.tmp"


def read_checkpoint(url: str | os.PathLike, *, key: str) -> tuple[EMState, int] | None:
    """The state and seed in the checkpoint at ``url``; None when there is none or it is
    another fit's."""
    filesystem, path = open_filesystem(url)
    if not filesystem.exists(path):
        return None
    try:
        table = pq.read_table(io.BytesIO(filesystem.cat_file(path)))
        metadata = json.loads((table.schema.metadata or {})[_METADATA_KEY])
    except (pa.ArrowInvalid, KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{url} is not a merf-dask checkpoint ({type(error).__name__}); "
                         "remove it to start the fit afresh") from None
    if metadata["key"] != key:
        logger.warning("ignoring the checkpoint %s: it belongs to a fit with other parameters "
                       "or data", url)
        return None
    effects = []
    for k, (n_levels, D) in enumerate(zip(metadata["n_levels"], metadata["D"])):
        levels = pd.Index(table.column(f"level{k}").slice(0, n_levels).to_pandas())
        b = np.column_stack([table.column(f"b{k}[{j}]").slice(0, n_levels).to_numpy()
                             for j in range(len(D))]).reshape(n_levels, len(D))
        effects.append((levels, b))
    history = [IterationRecord.from_json(r) for r in metadata["history"]]
    members = None
    if "members" in table.column_names:
        ensemble = load_learner(SKOPS_FILE, table.column("members")[0].as_py(),
                                source=f"{url} (its members)")
        members = list(zip(metadata["member_indices"], ensemble.members))
    state = EMState(iteration=metadata["iteration"], sigma2=metadata["sigma2"],
                    D=[np.asarray(D, dtype=float) for D in metadata["D"]], history=history,
                    effects=effects, members=members)
    return state, int(metadata["seed"])


def remove_checkpoint(url: str | os.PathLike) -> None:
    """Remove the checkpoint at ``url`` (and a half-written one) if there is one."""
    filesystem, path = open_filesystem(url)
    for leftover in (path, _temporary(path)):
        if filesystem.exists(leftover):
            filesystem.rm(leftover)
