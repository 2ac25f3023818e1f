"""The API gateway: declarative routes, auth, rate limits, resilience, aggregation.

Run it with ``python -m atoll.gateway --config gateway.yaml`` (``atoll up`` does when
``atoll.toml`` has a ``[gateway]`` section), or in-process::

    gateway = Gateway("gateway.yaml", system="atoll.toml")
    await gateway.start()
    ...
    await gateway.stop()

``docs/gateway.md`` describes the configuration, the security model and the
performance design.
"""

from atoll.gateway._auth import AuthError, Identity
from atoll.gateway._config import GatewayConfig, load_gateway_config
from atoll.gateway._gateway import Gateway
from atoll.gateway._tokens import mint_token

__all__ = [
    "AuthError",
    "Gateway",
    "GatewayConfig",
    "Identity",
    "load_gateway_config",
    "mint_token",
]
