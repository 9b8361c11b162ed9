"""Failures at the output end: a file system that fills up mid-run, a bucket that does not exist.
The job stops with one line naming the output and the cause and exit code 5; what it wrote is
whole, and a rerun once the cause is fixed completes with every segment once.

The rest of these tests, in other tiers (tests/conftest.py), are in
``tests/integration/test_output_failures.py``.
"""

from __future__ import annotations

import pytest

from hubert_ray.core.errors import OutputError
from hubert_ray.io import storage


@pytest.mark.parametrize(
    ("exc", "cause"),
    [
        (OSError(28, "No space left on device"), "no space left on the device"),
        (OSError(122, "Disk quota exceeded"), "disk quota exceeded"),
        (PermissionError(13, "Permission denied"), "permission denied"),
        (FileNotFoundError(2, "NoSuchBucket"), "it does not exist"),
        (OSError(5, "Input/output error"), "Input/output error"),
    ],
)
def test_writing_to_names_the_output_and_the_cause(exc, cause):
    with pytest.raises(OutputError) as caught:
        with storage.writing_to("s3://b/out"):
            raise exc
    assert caught.value.output == "s3://b/out" and caught.value.reason.startswith(cause)
    assert isinstance(caught.value.__cause__, OSError)
