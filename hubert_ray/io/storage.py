"""fsspec URL helpers: local paths, ``file://`` and ``s3://`` all go through the same code.

Object storage (``s3://`` through s3fs/botocore):

- Credentials, region and endpoint come from the standard AWS chain (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, profiles, instance roles); botocore reads
  them itself. ``storage_options`` (``--storage-options``) override them, e.g. ``endpoint_url``.
- Retries. botocore retries each request that fails transiently (HTTP 5xx, throttling such as
  ``SlowDown``, connection resets, timeouts; ``standard`` mode, :data:`S3_RETRIES` unless the
  options or ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS`` say otherwise). Whole operations that still
  fail transiently (an audio read, a part-file upload, a model file copy) are retried again by
  :func:`with_retries`. Permanent errors (missing object, access denied) are never retried.
- :func:`retry_count` counts this process' retries of both kinds, and :func:`on_retries`
  listeners hear of each as it happens (the backend reports a worker's to the run's tally, which
  the summary's ``storage_retries`` sums). Not counted: the one transparent
  re-send aiohttp makes when a connection drops before an idempotent request is answered, and
  re-calls s3fs makes on its own after botocore gave up or when a body breaks off mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec

log = logging.getLogger("hubert_ray")
T = TypeVar("T")

S3_PROTOCOLS = ("s3", "s3a")
S3_RETRIES = {"max_attempts": 5, "mode": "standard"}
"""botocore retry config used unless ``storage_options["config_kwargs"]["retries"]`` or the
``AWS_RETRY_MODE`` / ``AWS_MAX_ATTEMPTS`` environment variables set one."""
MODEL_CACHE_ENV = "HUBERT_RAY_MODEL_CACHE"
"""Environment variable naming the local model cache root (default
``~/.cache/hubert_ray/models``)."""

_count_lock = threading.Lock()
_retries = 0
_listeners: list[Callable[[int], None]] = []


def retry_count() -> int:
    """Storage retries made by this process so far (botocore request retries + whole-operation
    retries by :func:`with_retries`). Take the difference around a piece of work."""
    return _retries


def on_retries(listener: Callable[[int], None]) -> None:
    """Call ``listener(n)`` whenever this process counts ``n`` more retries (once per listener)."""
    if listener not in _listeners:
        _listeners.append(listener)


def _add_retries(n: int) -> None:
    global _retries
    with _count_lock:
        _retries += n
    for listener in _listeners:
        listener(n)


def _on_s3_call(context: dict | None = None, **_: Any) -> None:
    """botocore ``after-call`` / ``after-call-error`` hook: count the call's retried attempts."""
    attempt = ((context or {}).get("retries") or {}).get("attempt", 1)
    if attempt > 1:
        _add_retries(attempt - 1)


def _s3_options(options: dict) -> dict:
    config_kwargs = dict(options.get("config_kwargs") or {})
    if "retries" not in config_kwargs and not (
        os.environ.get("AWS_RETRY_MODE") or os.environ.get("AWS_MAX_ATTEMPTS")
    ):
        config_kwargs["retries"] = dict(S3_RETRIES)
    return {**options, "config_kwargs": config_kwargs}


def _count_retries_of(fs: Any) -> None:
    """Attach :func:`_on_s3_call` to the s3fs instance's botocore client (once per client)."""
    try:
        client = fs.s3  # created lazily by s3fs; no request is sent
        if getattr(client, "_hubert_ray_counted", False):
            return
        client.meta.events.register("after-call.s3", _on_s3_call)
        client.meta.events.register("after-call-error.s3", _on_s3_call)
        client._hubert_ray_counted = True
    except Exception as exc:  # counting is best effort; the request itself reports real errors
        log.debug("cannot count S3 retries: %s", type(exc).__name__)


def filesystem(uri: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """Return ``(fs, path)`` for a URL or local path (``s3://`` gets the retry defaults)."""
    options = dict(storage_options or {})
    s3 = fsspec.core.split_protocol(uri)[0] in S3_PROTOCOLS
    if s3:
        options = _s3_options(options)
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if s3:
        _count_retries_of(fs)
    return fs, path


_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)
_TRANSIENT_ERRNOS = {
    errno.EIO,
    errno.EAGAIN,
    errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable, 503
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: InternalError, 500
}
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
}


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` may succeed.

    Transient: timeouts, connection errors (builtin, botocore, aiohttp), HTTP 5xx / 429 and
    throttling codes, OSErrors with an I/O, busy or connection errno (how s3fs reports
    ``SlowDown`` and ``InternalError``). Permanent: missing objects, access denied, anything else.
    """
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    module = type(exc).__module__.split(".", 1)[0]
    if module in ("botocore", "aiobotocore"):
        response = getattr(exc, "response", None)
        if isinstance(response, dict):  # ClientError: an HTTP error response
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
            return code in _TRANSIENT_CODES or status >= 500 or status == 429
        import botocore.exceptions as bexc
        from botocore.parsers import ResponseParserError  # throttling answers with bad XML

        return isinstance(
            exc,
            (
                bexc.HTTPClientError,  # connection errors, resets, read/connect timeouts
                bexc.IncompleteReadError,
                bexc.ResponseStreamingError,
                ResponseParserError,
            ),
        )
    if module == "aiohttp":
        import aiohttp

        return isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False


def with_retries(
    fn: Callable[..., T],
    *args: Any,
    attempts: int = 3,
    base_delay_s: float = 0.25,
    max_delay_s: float = 8.0,
    sleep: Callable[[float], None] = time.sleep,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)``, retried up to ``attempts`` times in all while it fails
    transiently (:func:`is_transient`), with exponential backoff and full jitter. Each retry is
    counted in :func:`retry_count`; the last error, or any permanent one, is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            delay = random.uniform(0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1)))
            # Type and errno only: messages are the caller's to report (no URLs with tokens).
            log.warning(
                "storage: transient %s (errno %s) in %s; retry %d/%d in %.2fs",
                type(exc).__name__,
                getattr(exc, "errno", None),
                getattr(fn, "__name__", "operation"),
                attempt,
                attempts - 1,
                delay,
            )
            _add_retries(1)
            sleep(delay)
    raise AssertionError("unreachable")


_OUTPUT_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for the file system",
}


def write_failure(exc: BaseException) -> str | None:
    """What stopped a write, in a few words (``None`` if ``exc`` is not a storage failure):
    no space, a quota, permissions, a missing bucket or folder, or the storage's own message."""
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "it does not exist (a missing bucket or parent folder)"
    if isinstance(exc, OSError):
        if exc.errno in _OUTPUT_CAUSES:
            return _OUTPUT_CAUSES[exc.errno]
        return (exc.strerror or str(exc) or type(exc).__name__).strip()[:300]
    return None


@contextlib.contextmanager
def writing_to(output: str):
    """Storage failures inside the block become one :class:`OutputError` naming ``output``."""
    from hubert_ray.core.errors import OutputError

    try:
        yield
    except OSError as exc:
        raise OutputError(output, write_failure(exc)) from exc


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


def read_json(uri: str, storage_options: dict | None = None) -> dict | None:
    """The JSON object at ``uri``; ``None`` if there is none."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(uri: str, obj: Any, storage_options: dict | None = None) -> None:
    """``obj`` as indented JSON at ``uri``: serialised first, written in one call (never half a
    file), its local directory created."""
    fs, path = filesystem(uri, storage_options)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with_retries(fs.pipe_file, path, json.dumps(obj, indent=2).encode())


def local_model_dir(
    uri: str, storage_options: dict | None = None, cache_root: str | None = None
) -> str:
    """A local directory holding the model at ``uri``.

    Local paths (and ``file://``) are used in place. Remote directories are copied once per node
    into ``cache_root`` (default ``$HUBERT_RAY_MODEL_CACHE`` or ``~/.cache/hubert_ray/models``)
    as ``<key>/<model dir name>``, where ``key`` hashes the URL and every file's name, size and
    ETag (a model re-uploaded under the same URL gets a fresh copy). The copy goes to a private
    ``.partial-*`` directory, each file's size is checked, and it is renamed into place only when
    complete: a half-copied cache is never used, and concurrent callers on one node end with one
    copy (the first rename wins; the others use it and delete theirs).
    """
    import hashlib
    import shutil
    import tempfile

    if not is_remote(uri):
        fs, path = filesystem(uri, storage_options)
        return path
    cache_root = (
        cache_root
        or os.environ.get(MODEL_CACHE_ENV)
        or os.path.join(os.path.expanduser("~"), ".cache", "hubert_ray", "models")
    )
    os.makedirs(cache_root, exist_ok=True)
    fs, path = filesystem(uri, storage_options)
    path = path.rstrip("/")
    listing = with_retries(fs.find, path, detail=True)
    files = {
        p: info
        for p, info in sorted(listing.items())
        if info.get("type", "file") == "file" and p.startswith(path + "/")
    }
    if not files:
        raise FileNotFoundError(f"model directory {uri} is empty or does not exist")
    ident = [uri.rstrip("/")] + [
        f"{p[len(path) + 1 :]}\t{info.get('size')}\t{info.get('ETag') or info.get('mtime') or ''}"
        for p, info in files.items()
    ]
    entry = os.path.join(cache_root, hashlib.sha256("\n".join(ident).encode()).hexdigest()[:24])
    name = posixpath.basename(path) or "model"
    final = os.path.join(entry, name)
    if os.path.isdir(final):
        return final
    _remove_stale_partials(cache_root)

    def fetch(remote: str, dest: str, size: int | None) -> None:
        fs.get_file(remote, dest)
        got = os.path.getsize(dest)
        if size is not None and got != size:
            raise OSError(errno.EIO, f"copied {got} of {size} bytes of {remote}")

    tmp = tempfile.mkdtemp(prefix=".partial-", dir=cache_root)
    try:
        for remote, info in files.items():
            dest = os.path.join(tmp, name, remote[len(path) + 1 :])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with_retries(fetch, remote, dest, info.get("size"))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished first: use its copy
            if not os.path.isdir(final):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove_stale_partials(cache_root: str, max_age_s: float = 6 * 3600) -> None:
    """Delete ``.partial-*`` copies left by processes killed mid-copy (never used anyway)."""
    import shutil

    now = time.time()
    for name in os.listdir(cache_root):
        full = os.path.join(cache_root, name)
        try:
            if name.startswith(".partial-") and now - os.path.getmtime(full) > max_age_s:
                shutil.rmtree(full, ignore_errors=True)
        except OSError:
            pass
