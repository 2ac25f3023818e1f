"""The reference shop, run the way `make demo` runs it: `atoll up`, separate processes."""

import asyncio
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from atoll.testing import wait_until
from support import SHOP, free_port


class Shop:
    def __init__(self, tmp_path, extra_env=None, args=()):
        self.tmp_path = tmp_path
        self.extra_env = extra_env or {}
        self.args = list(args)
        self.ports = {
            name: free_port() for name in ("orders", "inventory", "catalog", "payments", "shipping")
        }
        self.collector_port = free_port()
        self.gateway_port = free_port()
        self.gateway_admin_port = free_port()
        self.gateway = f"http://127.0.0.1:{self.gateway_port}"
        self.traces = f"http://127.0.0.1:{self.collector_port}"
        self.payments = f"http://127.0.0.1:{self.ports['payments']}"
        self.orders = f"http://127.0.0.1:{self.ports['orders']}"
        self.inventory = f"http://127.0.0.1:{self.ports['inventory']}"
        self.process: subprocess.Popen[str] | None = None
        self.log = tmp_path / "shop.log"

    def start(self):
        env = dict(os.environ)
        env["ATOLL__SYSTEM__DATA_DIR"] = str(self.tmp_path / "data")
        env["ATOLL__SYSTEM__COLLECTOR__PORT"] = str(self.collector_port)
        env["ATOLL__GATEWAY__PORT"] = str(self.gateway_port)
        env["ATOLL__GATEWAY__ADMIN_PORT"] = str(self.gateway_admin_port)
        for name, port in self.ports.items():
            env[f"ATOLL__SERVICES__{name.upper()}__PORT"] = str(port)
        env.update(self.extra_env)
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "atoll",
                    "up",
                    "--config",
                    str(SHOP / "atoll.toml"),
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                text=True,
            )

    async def wait_ready(self, client):
        # Every service: the first order needs catalog's prices, payments and shipping.
        urls = [f"http://127.0.0.1:{port}" for port in self.ports.values()]

        async def ready():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"atoll up exited with {self.process.returncode}; its log ends:\n"
                    + self.log_tail()
                )
            for url in urls:
                try:
                    if (await client.get(f"{url}/readyz")).status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
            return True

        try:
            await wait_until(ready, timeout=60, what=f"the shop to be ready (log: {self.log})")
        except AssertionError as error:
            # CI keeps no files: the log's end is the only account of what hung.
            raise AssertionError(f"{error}\nthe log ends:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no log: {error})"

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(60)


async def order(client, shop, items, customer="c1"):
    response = await client.post(
        f"{shop.orders}/orders", json={"customer_id": customer, "items": items}
    )
    assert response.status_code == 202, response.text
    return response.json()["order_id"]


async def final(client, shop, order_id):
    result = {}

    async def settled():
        body = (await client.get(f"{shop.orders}/orders/{order_id}")).json()
        result.update(body)
        return body["status"] != "PENDING"

    await wait_until(settled, timeout=30, what=f"order {order_id} to settle")
    return result


async def stock_is(client, shop, sku, expected):
    return await stock(client, shop, sku) == expected


async def stock(client, shop, sku):
    return (await client.get(f"{shop.inventory}/stock/{sku}")).json()["available"]


async def trace_of(client, shop, order_id, services):
    """The trace in the embedded collector found by ``order.id``, once ``services`` are in it."""
    found = {}

    async def arrived():
        listing = await client.get(
            f"{shop.traces}/api/traces", params={"attr": f"order.id={order_id}"}
        )
        for summary in listing.json()["traces"]:
            trace = (await client.get(f"{shop.traces}/api/traces/{summary['trace_id']}")).json()
            if services <= {span["service"] for span in trace["spans"]}:
                found.update(trace)
                return True
        return False

    try:
        await wait_until(arrived, timeout=30, interval=0.5, what=f"the trace of order {order_id}")
    except AssertionError:
        listing = await client.get(
            f"{shop.traces}/api/traces", params={"attr": f"order.id={order_id}"}
        )
        seen = [
            {
                span["service"]
                for span in (await client.get(f"{shop.traces}/api/traces/{t['trace_id']}")).json()[
                    "spans"
                ]
            }
            for t in listing.json()["traces"]
        ]
        raise AssertionError(f"traces of order {order_id} hold services {seen}") from None
    return found


async def logs_of(client, shop, trace_id, bodies):
    """The log records of a trace in the embedded collector, once ``bodies`` are in it."""
    found = []

    async def arrived():
        response = await client.get(f"{shop.traces}/api/logs", params={"trace_id": trace_id})
        found[:] = response.json()["logs"]
        return bodies <= {r["body"] for r in found}

    try:
        await wait_until(arrived, timeout=30, interval=0.5, what=f"the logs of trace {trace_id}")
    except AssertionError:
        raise AssertionError(f"trace {trace_id} has logs {[r['body'] for r in found]}") from None
    return found


@pytest.mark.timeout(180)
async def test_the_shop_takes_orders_end_to_end(tmp_path):
    shop = Shop(tmp_path)
    shop.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            apples = await stock(client, shop, "apple")
            confirmed_id = await order(client, shop, [{"sku": "apple", "qty": 3}])
            confirmed = await final(client, shop, confirmed_id)
            assert confirmed["status"] == "CONFIRMED"
            assert confirmed["items"] == [
                {"sku": "apple", "qty": 3, "unit_price_cents": 50, "price_source": "catalog"}
            ]
            assert confirmed["total_cents"] == 150
            assert confirmed["priced_from_fallback"] is False
            # One trace follows the order through every service it touched.
            everyone = {"orders", "inventory", "catalog", "payments", "shipping"}
            trace = await trace_of(client, shop, confirmed_id, everyone)
            names = {span["name"] for span in trace["spans"]}
            assert "process inventory.ReserveStock" in names
            assert "process payments.CapturePayment" in names
            # The saga's steps are in the trace too.
            assert "saga place-order: started" in names
            assert "eventstore append" in names  # the Order's events, in the same trace
            assert any(n.startswith("saga place-order: reply") for n in names)
            # Each service's log lines are in the trace too, each under the span that
            # wrote it (OTLP logs to the same collector).
            wanted = {
                "order placed",
                "stock reserved",
                "payment authorized",
                "payment captured",
                "shipment scheduled",
            }
            logged = await logs_of(client, shop, trace["trace_id"], wanted)
            by_body = {r["body"]: r for r in logged}
            span_ids = {span["span_id"] for span in trace["spans"]}
            assert {r["span_id"] for r in logged} <= span_ids
            assert by_body["stock reserved"]["service"] == "inventory"
            assert by_body["stock reserved"]["attributes"]["order_id"] == confirmed_id
            # The order-history projection answers a customer's orders.
            history = []

            async def listed():
                history[:] = (await client.get(f"{shop.orders}/customers/c1/orders")).json()
                return any(
                    h["order_id"] == confirmed_id and h["status"] == "CONFIRMED" for h in history
                )

            await wait_until(listed, what="the order in the customer's history")
            assert next(h for h in history if h["order_id"] == confirmed_id)["total_cents"] == 150
            ready = (await client.get(f"{shop.orders}/readyz")).json()
            [projection] = ready["projections"]["projections"]
            assert projection["name"] == "order-history"
            assert await stock(client, shop, "apple") == apples - 3

            unknown = await final(
                client, shop, await order(client, shop, [{"sku": "kiwi", "qty": 1}])
            )
            assert unknown["status"] == "REJECTED"
            assert "kiwi: unknown SKU" in unknown["reason"]

            short = await final(
                client, shop, await order(client, shop, [{"sku": "durian", "qty": 5}])
            )
            assert short["status"] == "REJECTED"
            assert "durian: only 2 left, 5 wanted" in short["reason"]
            assert await stock(client, shop, "durian") == 2, "a rejected order held stock"

            # 30 concurrent orders for the 20 boxes of cherries: exactly 20 succeed.
            ids = await asyncio.gather(
                *(
                    order(client, shop, [{"sku": "cherry", "qty": 1}], f"c{1 + i % 3}")
                    for i in range(30)
                )
            )
            outcomes = await asyncio.gather(*(final(client, shop, i) for i in ids))
            statuses = sorted(o["status"] for o in outcomes)
            assert statuses.count("CONFIRMED") == 20
            assert statuses.count("REJECTED") == 10
            assert await stock(client, shop, "cherry") == 0

            # Each failing step shows its compensation path.
            poor = await final(
                client, shop, await order(client, shop, [{"sku": "banana", "qty": 5}], "poor")
            )
            assert poor["status"] == "REJECTED"
            assert "insufficient funds" in poor["reason"]
            refused = await final(
                client, shop, await order(client, shop, [{"sku": "durian", "qty": 1}])
            )
            assert refused["status"] == "REJECTED"
            assert "carrier refuses" in refused["reason"]
            await wait_until(
                lambda: stock_is(client, shop, "durian", 2), what="durian back in stock"
            )
            assert await stock(client, shop, "banana") == 50, "a rejected order kept stock"
            payment = (await client.get(f"{shop.payments}/payments/{refused['order_id']}")).json()
            assert payment["status"] == "VOIDED"
            checks = (await client.get(f"{shop.payments}/admin/invariants")).json()
            assert checks["conserved"]
            assert checks["no_negative_balance"]
            sagas = (await client.get(f"{shop.orders}/atoll/sagas")).json()
            states = {s["state"] for s in sagas}
            assert states <= {"COMPLETED", "COMPENSATED"}, states

            invalid = await client.post(
                f"{shop.orders}/orders",
                json={"customer_id": "c1", "items": [{"sku": "apple", "qty": -1}]},
            )
            assert invalid.status_code == 422
            assert invalid.headers["content-type"] == "application/problem+json"
            missing = await client.get(f"{shop.orders}/orders/nope")
            assert missing.status_code == 404
            assert missing.json()["status"] == 404
        assert shop.stop() == 0
        assert "all services stopped" in shop.log.read_text()

        # A restart keeps everything and does not seed stock again.
        shop.start()
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            assert await stock(client, shop, "cherry") == 0
            assert (await client.get(f"{shop.orders}/orders/{ids[0]}")).json()["status"] in {
                "CONFIRMED",
                "REJECTED",
            }
        assert shop.stop() == 0
    finally:
        if shop.process is not None and shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(120)
async def test_a_killed_supervisor_takes_its_services_with_it(tmp_path):
    # Children run in their own sessions; SIGKILL leaves the supervisor no chance to stop
    # them, so the kernel does (SIGTERM on parent death): their ports are free again.
    shop = Shop(tmp_path)
    shop.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
        ports = [*shop.ports.values(), shop.collector_port, shop.gateway_port]
        assert all(listening(port) for port in ports)
        shop.process.kill()
        shop.process.wait()

        async def all_stopped():
            return not any(listening(port) for port in ports)

        await wait_until(all_stopped, timeout=30, what="the killed supervisor's services to stop")
    finally:
        if shop.process is not None and shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()


@pytest.mark.timeout(120)
async def test_the_shop_runs_in_one_process_on_the_in_memory_transport(tmp_path):
    shop = Shop(tmp_path)
    env = dict(os.environ)
    env["ATOLL__SYSTEM__DATA_DIR"] = str(tmp_path / "data")
    env["ATOLL__SYSTEM__TRANSPORT"] = "memory://"
    env["ATOLL__SYSTEM__COLLECTOR__PORT"] = str(shop.collector_port)
    for name, port in shop.ports.items():
        env[f"ATOLL__SERVICES__{name.upper()}__PORT"] = str(port)
    with shop.log.open("w") as log:
        shop.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "atoll",
                "up",
                "--single-process",
                "--config",
                str(SHOP / "atoll.toml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            placed = await final(
                client, shop, await order(client, shop, [{"sku": "banana", "qty": 2}])
            )
            assert placed["status"] == "CONFIRMED"
        assert shop.stop() == 0
    finally:
        if shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()


def test_memory_transport_without_single_process_is_refused_clearly(tmp_path):
    env = dict(os.environ, ATOLL__SYSTEM__TRANSPORT="memory://")
    result = subprocess.run(
        [sys.executable, "-m", "atoll", "up", "--config", str(SHOP / "atoll.toml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "system.transport" in result.stderr
    assert "--single-process" in result.stderr


BROKERS = [
    pytest.param(None, "", id="postgresql+embedded"),
    pytest.param(
        "production",
        "nats://127.0.0.1:4222?namespace={ns}",
        id="postgresql+nats",
        marks=pytest.mark.nats,
    ),
    pytest.param(
        "redis",
        "redis://127.0.0.1:6379/0?namespace={ns}",
        id="postgresql+redis",
        marks=pytest.mark.redis,
    ),
    pytest.param(
        "rabbitmq",
        "amqp://guest:guest@127.0.0.1:5672/?namespace={ns}",
        id="postgresql+rabbitmq",
        marks=pytest.mark.rabbitmq,
    ),
]


async def _forget_broker_state(profile, namespace):
    if profile == "production":
        from nats_support import drop_namespaces  # noqa: PLC0415

        await drop_namespaces([namespace])
    elif profile == "redis":
        from transport.redis_support import delete_namespace  # noqa: PLC0415

        delete_namespace(namespace)
    elif profile == "rabbitmq":
        from transport.rabbitmq_helpers import delete_namespace  # noqa: PLC0415

        await delete_namespace(
            namespace, ["orders", "inventory", "catalog", "payments", "shipping"]
        )


@pytest.mark.postgres
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("profile", "transport"), BROKERS)
async def test_the_shop_runs_unchanged_on_postgresql_and_each_broker(tmp_path, profile, transport):
    """`atoll up --profile NAME`, as the README documents it; the environment only gives
    this run its own schemas and namespace so it shares nothing with other runs."""
    import asyncpg  # noqa: PLC0415 - only this test needs it

    token = tmp_path.name[-8:].replace("-", "_").lower()
    namespace = f"shoptest{token}"
    schemas = {
        name: f"shop_test_{token}_{name}"
        for name in ("orders", "inventory", "catalog", "payments", "shipping")
    }
    env = {
        f"ATOLL__SERVICES__{name.upper()}__DATABASE": (
            f"postgresql://postgres@127.0.0.1:5432/test?schema={schema}"
        )
        for name, schema in schemas.items()
    }
    if transport:
        env["ATOLL__SYSTEM__TRANSPORT"] = transport.format(ns=namespace)
    shop = Shop(tmp_path, extra_env=env, args=["--profile", profile] if profile else [])
    shop.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            placed = await final(
                client, shop, await order(client, shop, [{"sku": "apple", "qty": 1}])
            )
            assert placed["status"] == "CONFIRMED"
            rejected = await final(
                client, shop, await order(client, shop, [{"sku": "durian", "qty": 9}])
            )
            assert rejected["status"] == "REJECTED"
            ids = await asyncio.gather(
                *(
                    order(client, shop, [{"sku": "cherry", "qty": 3}], f"c{1 + i % 3}")
                    for i in range(10)
                )
            )
            outcomes = [
                o["status"] for o in await asyncio.gather(*(final(client, shop, i) for i in ids))
            ]
            assert outcomes.count("CONFIRMED") == 6, outcomes  # 20 boxes, 3 per order
            assert await stock(client, shop, "cherry") == 2
        assert shop.stop() == 0
    finally:
        if shop.process is not None and shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        for schema in schemas.values():
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
        await _forget_broker_state(profile, namespace)


@pytest.mark.timeout(180)
async def test_the_catalog_breaker_opens_and_closes_while_orders_keep_coming(tmp_path):
    shop = Shop(tmp_path)
    catalog = f"http://127.0.0.1:{shop.ports['catalog']}"
    shop.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await shop.wait_ready(client)
            # A first order teaches orders the price of apples.
            first = await final(
                client, shop, await order(client, shop, [{"sku": "apple", "qty": 1}])
            )
            assert first["items"][0]["price_source"] == "catalog"

            async def breaker():
                body = (await client.get(f"{shop.orders}/atoll/breakers")).json()
                return next(b for b in body["breakers"] if b["name"] == "catalog")

            assert (await breaker())["state"] == "closed"
            faulty = await client.put(f"{catalog}/admin/faults", json={"error_rate": 1.0})
            assert faulty.json() == {"latency_ms": 0, "error_rate": 1.0}
            fallbacks = []
            for _ in range(4):
                placed = await final(
                    client, shop, await order(client, shop, [{"sku": "apple", "qty": 1}], "c2")
                )
                fallbacks.append(placed)
            assert all(o["priced_from_fallback"] for o in fallbacks)
            assert all(o["items"][0]["unit_price_cents"] == 50 for o in fallbacks)
            assert all(o["status"] == "CONFIRMED" for o in fallbacks)
            open_breaker = await breaker()
            assert open_breaker["state"] == "open", open_breaker
            # A SKU never priced before cannot fall back: refused, nothing recorded.
            unpriced = await client.post(
                f"{shop.orders}/orders",
                json={"customer_id": "c", "items": [{"sku": "banana", "qty": 1}]},
            )
            assert unpriced.status_code == 503
            assert unpriced.headers["content-type"] == "application/problem+json"
            assert "Retry-After" in unpriced.headers
            # Heal catalog; after the breaker's wait, trial calls close it again.
            await client.delete(f"{catalog}/admin/faults")

            async def priced_by_catalog():
                placed = await final(
                    client, shop, await order(client, shop, [{"sku": "apple", "qty": 1}])
                )
                return not placed["priced_from_fallback"]

            await wait_until(
                priced_by_catalog, timeout=30, interval=0.5, what="catalog prices again"
            )
            await wait_until(
                lambda: breaker_state_is(client, shop, "closed"),
                timeout=30,
                what="the breaker to close",
            )
        assert shop.stop() == 0
    finally:
        if shop.process is not None and shop.process.poll() is None:
            shop.process.kill()
            shop.process.wait()


async def breaker_state_is(client, shop, state):
    await order(client, shop, [{"sku": "apple", "qty": 1}])
    body = (await client.get(f"{shop.orders}/atoll/breakers")).json()
    return next(b for b in body["breakers"] if b["name"] == "catalog")["state"] == state
