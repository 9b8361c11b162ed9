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
