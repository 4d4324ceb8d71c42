"""Files and directories on a local disk or any fsspec store, written all or nothing.

Atomicity
---------
Everything is written into a hidden sibling ``.<name>.tmp-<uuid>`` and moved into place only after
the last byte was written; any failure removes the sibling. On a local disk the move is a
``rename``, which is atomic (replacing an existing directory takes two renames, so a reader may
briefly find nothing there, but never a mix of old and new). Object stores have no rename: a marker
file ``_INCOMPLETE`` is put in the destination, the old files are deleted, the new ones copied, and
the marker is deleted last; a failed copy removes the destination. Readers refuse a directory
holding the marker (:func:`check_complete`), so a publish killed half-way is detected rather than
read. Tools that do not know the marker can still see a directory mid-copy, and two writers racing
for one destination are not arbitrated.

Functions
---------
open_filesystem
    The fsspec filesystem and bare path of a URL.
atomic_directory
    Context manager that publishes a directory only when everything in it was written.
check_complete
    Raise when a directory carries the marker of an interrupted publish on an object store.
data_fingerprint
    A cheap fingerprint of a dataset: its files' paths, sizes and modification marks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["open_filesystem", "url_of", "atomic_directory", "check_complete", "data_fingerprint",
           "INCOMPLETE_MARKER"]

#: What fsspec filesystems report of a file's version: a local file's mtime, an object's ETag or
#: last-modified time.
_VERSION_KEYS = ("mtime", "ETag", "LastModified", "last_modified", "etag")

#: File present in a destination on an object store while a publish is copying into it.
INCOMPLETE_MARKER = "_INCOMPLETE"


def open_filesystem(url: str | os.PathLike, *, storage_options: dict | None = None
                    ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path within it, without a trailing slash.

    Parameters
    ----------
    url : str or path-like
        A local path or an fsspec URL such as ``s3://bucket/prefix``.
    storage_options : dict, optional
        Passed to the filesystem (credentials, ``client_kwargs={"endpoint_url": ...}``, ...).

    Returns
    -------
    filesystem : fsspec.AbstractFileSystem
    path : str
    """
    filesystem, path = fsspec.core.url_to_fs(os.fspath(url), **(storage_options or {}))
    return filesystem, path.rstrip("/") or path


def check_complete(url: str | os.PathLike, *, storage_options: dict | None = None) -> None:
    """Raise ``ValueError`` when ``url`` holds the marker of an interrupted publish.

    Parameters
    ----------
    url : str or path-like
        A directory written through :func:`atomic_directory`.
    storage_options : dict, optional
    """
    filesystem, path = open_filesystem(url, storage_options=storage_options)
    if filesystem.exists(f"{path}/{INCOMPLETE_MARKER}"):
        raise ValueError(
            f"{url} is incomplete: a write into it was interrupted (it holds "
            f"{INCOMPLETE_MARKER}); write it again with overwrite=True / --overwrite")


@contextlib.contextmanager
def atomic_directory(url: str | os.PathLike, *, overwrite: bool = False,
                     storage_options: dict | None = None) -> Iterator[str]:
    """Write a directory in a hidden sibling and move it to ``url`` only if the block succeeds.

    Parameters
    ----------
    url : str or path-like
        Destination directory (local path or fsspec URL); it must have a parent.
    overwrite : bool
        Replace an existing destination. Locally the old directory stays in place until the new one
        is complete; on an object store it is deleted when the copy starts (see the module notes).
    storage_options : dict, optional

    Yields
    ------
    str
        The temporary directory to write into, a local path or a URL like ``url``.

    Raises
    ------
    FileExistsError
        ``url`` exists and ``overwrite`` is False.
    OSError
        The temporary directory cannot be created (read-only or missing parent, parent is a file,
        permission denied); same subclass as the underlying error, naming ``url``.
    """
    filesystem, path = open_filesystem(url, storage_options=storage_options)
    parent, name = posixpath.split(path)
    if not parent or not name:
        raise ValueError(f"cannot write {url}: a directory needs a parent directory or prefix")
    if not overwrite and filesystem.exists(path):
        raise FileExistsError(
            f"{url} already exists; pass overwrite=True / --overwrite to replace it")
    staging = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        filesystem.makedirs(staging)
    except OSError as error:
        raise type(error)(f"cannot write {url}: creating {staging} failed: {error}") from error
    try:
        yield url_of(filesystem, staging)
        if isinstance(filesystem, LocalFileSystem):
            _rename_into_place(filesystem, staging, path)
        else:
            _copy_into_place(filesystem, staging, path)
    except BaseException as error:
        _remove_after_failure(filesystem, staging, error)
        raise


def url_of(filesystem: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` on ``filesystem`` as a URL (a bare path for the local disk)."""
    return path if isinstance(filesystem, LocalFileSystem) else filesystem.unstrip_protocol(path)


def _rename_into_place(filesystem: LocalFileSystem, staging: str, destination: str) -> None:
    # the old directory is only moved aside, so a failed rename can put it back
    retired = None
    if os.path.lexists(destination):
        parent, name = posixpath.split(destination)
        retired = posixpath.join(parent, f".{name}.old-{uuid.uuid4().hex}")
        os.rename(destination, retired)
    try:
        os.rename(staging, destination)
    except BaseException:
        if retired is not None:
            os.rename(retired, destination)
        raise
    if retired is not None:
        filesystem.rm(retired, recursive=True)


def _copy_into_place(filesystem: fsspec.AbstractFileSystem, staging: str, destination: str
                     ) -> None:
    marker = f"{destination}/{INCOMPLETE_MARKER}"
    filesystem.touch(marker)  # a failure here leaves an existing destination untouched
    try:
        stale = [path for path in filesystem.find(destination) if path != marker]
        if stale:
            filesystem.rm(stale)
        # workers wrote the staged files, so this process's listing cache may not know them
        filesystem.invalidate_cache(staging)
        sources = filesystem.find(staging)
        filesystem.copy(sources, [destination + source[len(staging):] for source in sources])
    except BaseException as error:
        _remove_after_failure(filesystem, destination, error)
        raise
    filesystem.rm(marker)
    filesystem.rm(staging, recursive=True)


def _remove_after_failure(filesystem: fsspec.AbstractFileSystem, path: str,
                          error: BaseException) -> None:
    # the original error is what the caller needs; a failed clean-up is only noted on it
    try:
        if filesystem.exists(path):
            filesystem.rm(path, recursive=True)
    except Exception as cleanup_error:
        error.add_note(f"could not remove {url_of(filesystem, path)}: {cleanup_error}")


# ---------------------------------------------------------------- reading


def data_fingerprint(url: str | os.PathLike, *, storage_options: dict | None = None) -> dict:
    """A cheap fingerprint of a dataset: SHA-256 over its files' paths, sizes and modification
    marks (mtime, ETag), read from a listing (no data is read).

    Parameters
    ----------
    url : str or path-like
    storage_options : dict, optional

    Returns
    -------
    dict
        ``source`` (the URL), ``n_files`` and ``sha256``.
    """
    filesystem, root = open_filesystem(url, storage_options=storage_options)
    files = sorted([path[len(root):], info.get("size"),
                    *(str(info[key]) for key in _VERSION_KEYS if key in info)]
                   for path, info in filesystem.find(root, detail=True).items())
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {"source": str(url), "n_files": len(files), "sha256": digest}
