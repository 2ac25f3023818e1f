"""Test kits for atoll and for backends built on it.

Conformance kits are base classes of pytest tests: subclass one per backend and
implement its factory. They need ``pytest`` and ``pytest-asyncio`` (asyncio mode auto).
"""

from atoll.testing._crash_kit import (
    CRASH_POINTS,
    ExactlyOnceCrashConformance,
    InProcessCrashConformance,
    SimulatedCrash,
)
from atoll.testing._database_kit import DatabaseConformance
from atoll.testing._eventstore_kit import EventStoreConformance
from atoll.testing._outage_kit import BrokerOutageConformance
from atoll.testing._proxy import TcpProxy
from atoll.testing._sagas import (
    RawCommand,
    RawEvent,
    SagaTestKit,
    ScriptedParticipant,
    SentCommand,
)
from atoll.testing._transport_kit import Recorder, TransportConformance
from atoll.testing._waiting import wait_until

__all__ = [
    "CRASH_POINTS",
    "BrokerOutageConformance",
    "DatabaseConformance",
    "EventStoreConformance",
    "ExactlyOnceCrashConformance",
    "InProcessCrashConformance",
    "RawCommand",
    "RawEvent",
    "Recorder",
    "SagaTestKit",
    "ScriptedParticipant",
    "SentCommand",
    "SimulatedCrash",
    "TcpProxy",
    "TransportConformance",
    "wait_until",
]
