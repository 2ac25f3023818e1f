"""The Redis Streams transport against the conformance kits (needs Redis on 127.0.0.1:6379)."""

from __future__ import annotations

import pytest
from redis_support import REDIS_URL, delete_namespace, namespace_for, url_for

from atoll.testing import ExactlyOnceCrashConformance, TransportConformance
from atoll.transport.redis import RedisTransport

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True)
def _clean_namespace(tmp_path):
    yield
    delete_namespace(namespace_for(tmp_path))


class TestRedisTransport(TransportConformance):
    async def make_transport(self, tmp_path):
        return RedisTransport.from_url(url_for(namespace_for(tmp_path), lease=1))


class TestRedisCrashes(ExactlyOnceCrashConformance):
    def transport_url(self, tmp_path):
        return url_for(namespace_for(tmp_path), REDIS_URL, lease=1)
