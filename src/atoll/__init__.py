"""atoll: microservice systems that stay correct when things fail.

The facade: what a service author needs. Each concern has its own package
(``atoll.messages``, ``atoll.persistence``, ``atoll.transport``, ``atoll.service``,
``atoll.config``, ``atoll.determinism``, ``atoll.testing``).
"""

from atoll._errors import AtollError
from atoll._version import __version__
from atoll.messages import Command, Envelope, Event, Message, Reply
from atoll.service import Context, Service, ServiceRuntime

__all__ = [
    "AtollError",
    "Command",
    "Context",
    "Envelope",
    "Event",
    "Message",
    "Reply",
    "Service",
    "ServiceRuntime",
    "__version__",
]
