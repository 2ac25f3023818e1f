"""The RabbitMQ transport against the conformance kits, on the real server."""

import pytest
from rabbitmq_helpers import delete_namespace, new_namespace, server_address, url

from atoll.testing import BrokerOutageConformance, ExactlyOnceCrashConformance, TransportConformance
from atoll.testing._crash_system import consumer, producer
from atoll.transport.rabbitmq import RabbitMQTransport

pytestmark = pytest.mark.rabbitmq

CRASH_GROUPS = [producer.name, consumer.name]


class TestRabbitMQTransport(TransportConformance):
    @pytest.fixture(autouse=True)
    async def _namespace(self):
        self.namespace = new_namespace()
        self.made: list[RabbitMQTransport] = []
        yield
        groups = {g for t in self.made for g in t._topology._groups}
        await delete_namespace(self.namespace, groups)

    async def make_transport(self, tmp_path):
        transport = RabbitMQTransport.from_url(url(self.namespace))
        self.made.append(transport)
        return transport


class TestRabbitMQClassicQueues(TestRabbitMQTransport):
    """The same contract on classic queues (for brokers without quorum queues)."""

    async def make_transport(self, tmp_path):
        transport = RabbitMQTransport.from_url(url(self.namespace, queue_type="classic"))
        self.made.append(transport)
        return transport


class TestRabbitMQCrashes(ExactlyOnceCrashConformance):
    @pytest.fixture(autouse=True)
    async def _namespace(self):
        self.namespace = new_namespace()
        yield
        await delete_namespace(self.namespace, CRASH_GROUPS)

    def transport_url(self, tmp_path):
        return url(self.namespace)


class TestRabbitMQOutages(BrokerOutageConformance):
    @pytest.fixture(autouse=True)
    async def _namespace(self):
        self.namespace = new_namespace()
        yield
        await delete_namespace(self.namespace, CRASH_GROUPS)

    def server_address(self):
        return server_address()

    def make_transport(self, host, port, tmp_path):
        return RabbitMQTransport.from_url(url(self.namespace, host=host, port=port))
