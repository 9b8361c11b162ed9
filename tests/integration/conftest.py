"""Fixtures of the integration tier."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on loopback (:class:`tests.integration.s3_server.S3Server`), one per
    test module."""
    pytest.importorskip("moto.server")
    from tests.integration.s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()
