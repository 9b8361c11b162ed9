"""fsspec URL helpers: local paths, ``file://`` and ``s3://`` all go through the same code."""

from __future__ import annotations

import posixpath
from typing import Any

import fsspec


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """Return ``(fs, path)`` for a URL or local path."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(base_dir: str, path: str) -> str:
    """Resolve ``path`` relative to ``base_dir`` (a local dir or URL); absolute paths/URLs pass."""
    if "://" in path or path.startswith("/"):
        return path
    if "://" in base_dir:
        scheme, rest = base_dir.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"
    return posixpath.normpath(posixpath.join(base_dir, path))


def parent(uri: str) -> str:
    """The directory containing ``uri`` (same scheme)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    import os

    return os.path.dirname(os.path.abspath(uri))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def local_model_dir(
    uri: str, storage_options: dict | None = None, cache_root: str | None = None
) -> str:
    """A local directory holding the model at ``uri``.

    Local paths (and ``file://``) are used in place. Remote directories are copied once per node
    into ``cache_root`` (default ``~/.cache/hubert_ray/models``): the copy goes to a private
    temporary directory that is renamed into place only when complete, so a half-copied cache is
    never used, and concurrent actors on one node agree on a single copy.
    """
    import hashlib
    import os
    import shutil
    import tempfile

    if not is_remote(uri):
        fs, path = filesystem(uri, storage_options)
        return path
    cache_root = cache_root or os.path.join(
        os.path.expanduser("~"), ".cache", "hubert_ray", "models"
    )
    os.makedirs(cache_root, exist_ok=True)
    final = os.path.join(cache_root, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24])
    if os.path.isdir(final):
        return final
    fs, path = filesystem(uri, storage_options)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=cache_root)
    try:
        for remote in fs.find(path):
            rel = remote[len(path.rstrip("/")) + 1 :]
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(remote, dest)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: use its copy
            if not os.path.isdir(final):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
