"""An orchestrating service for the CLI tests, importable from an atoll.toml."""

from order_saga import make_engine

engine = make_engine("cli-orders")
service = engine.service
