"""Optional signatures of model directories: an HMAC-SHA256 of the manifest with a shared key.

The manifest holds the SHA-256 of every other file of a model directory, so a signature over the
manifest's bytes covers the whole directory. Anyone who can write a directory can rewrite those
digests, but without the key no one can sign the result: with a key set, :func:`sign` gives the
``signature`` file that :func:`merf_dask.io.artifacts.save_model` writes beside the manifest, and
:func:`verify` refuses a directory whose signature is missing or does not match, before anything
else of it is trusted. Without a key nothing is signed or checked.

The key is the text of ``MERF_DASK_SIGNING_KEY``, or the content of the file named by
``MERF_DASK_SIGNING_KEY_FILE`` (a mounted secret; whitespace at its ends is dropped), at least
16 bytes (``openssl rand -hex 32`` makes one). Every process that saves or loads models of one
pipeline sets the same key.

Names
-----
KEY_VARIABLE, KEY_FILE_VARIABLE
    The environment variables that hold the key or name its file.
SIGNATURE
    The signature's file name in a model directory.
SignatureError
    A missing or mismatching signature (a ``ValueError``).
signing_key, sign, verify
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

__all__ = ["KEY_VARIABLE", "KEY_FILE_VARIABLE", "SIGNATURE", "SignatureError", "signing_key",
           "sign", "verify"]

KEY_VARIABLE, KEY_FILE_VARIABLE = "MERF_DASK_SIGNING_KEY", "MERF_DASK_SIGNING_KEY_FILE"
SIGNATURE = "signature"
_MIN_KEY_BYTES = 16
_SCHEME = b"hmac-sha256"


class SignatureError(ValueError):
    """A model directory refused while a signing key is set: unsigned, or signed otherwise."""


def signing_key() -> bytes | None:
    """The signing key from the environment, or None when neither variable is set.

    Raises
    ------
    ValueError
        Both variables are set, the key file cannot be read, or the key is shorter than 16
        bytes (an empty variable included: a secret that failed to mount must not switch the
        checks off).
    """
    text, path = os.environ.get(KEY_VARIABLE), os.environ.get(KEY_FILE_VARIABLE)
    if text is not None and path is not None:
        raise ValueError(f"both {KEY_VARIABLE} and {KEY_FILE_VARIABLE} are set; set one of them")
    if text is not None:
        key, origin = text.encode(), KEY_VARIABLE
    elif path is not None:
        try:
            key, origin = Path(path).read_bytes().strip(), f"{KEY_FILE_VARIABLE}={path}"
        except OSError as error:
            raise ValueError(f"cannot read the signing key: {KEY_FILE_VARIABLE}={path}: "
                             f"{error.strerror or error}") from None
    else:
        return None
    if len(key) < _MIN_KEY_BYTES:
        raise ValueError(f"the signing key ({origin}) has {len(key)} bytes; use at least "
                         f"{_MIN_KEY_BYTES} (e.g. openssl rand -hex 32)")
    return key


def sign(manifest: bytes, *, key: bytes) -> bytes:
    """The content of the ``signature`` file for a manifest's bytes: ``hmac-sha256 <hex>``."""
    digest = hmac.new(key, manifest, hashlib.sha256).hexdigest().encode()
    return _SCHEME + b" " + digest + b"\n"


def verify(manifest: bytes, signature: bytes | None, *, key: bytes, source: str) -> None:
    """Check the ``signature`` file's content against a manifest's bytes.

    Parameters
    ----------
    manifest : bytes
        The manifest exactly as read.
    signature : bytes or None
        The signature file's content; None when the directory has none.
    key : bytes
    source : str
        The model directory, for messages.

    Raises
    ------
    SignatureError
        No signature, or one that does not match (the manifest or the signature was changed,
        or another key signed it).
    """
    if signature is None:
        raise SignatureError(
            f"{source} is not signed, and a signing key is set ({KEY_VARIABLE} or "
            f"{KEY_FILE_VARIABLE}): refusing to load it; save it again with the key set")
    # compare_digest: the time taken says nothing about how much of a forged signature matched
    if not hmac.compare_digest(signature.strip(), sign(manifest, key=key).strip()):
        raise SignatureError(
            f"{source}/{SIGNATURE} does not match the manifest: the directory was changed "
            "after it was signed, or signed with another key; refusing to load it")
