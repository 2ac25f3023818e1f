"""Operators see and repair instances over HTTP and with `atoll sagas`."""

import asyncio
import contextlib
import json
from pathlib import Path

import httpx
import pytest
import sagas_cli_app as cli_app
import uvicorn
from order_saga import ChargePayment, Order, PaymentCharged, happy, make_engine, order_saga
from typer.testing import CliRunner

from atoll.sagas import to_mermaid
from atoll.sagas.cli import app as sagas_cli
from atoll.testing import SagaTestKit
from support import free_port


@pytest.fixture
async def kit(tmp_path):
    kit = SagaTestKit(make_engine("admin-orders"), tmp_path)
    happy(kit)
    kit.participant("payments").on(ChargePayment, None)
    async with kit:
        yield kit


@pytest.fixture
async def client(kit):
    transport = httpx.ASGITransport(app=kit.service.http)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def test_list_show_and_count_instances(kit, client):
    first = await kit.start("place-order", Order(order_id="a"), saga_id="saga-a")
    await kit.advance(1)
    await kit.start("place-order", Order(order_id="b"), saga_id="saga-b")
    await kit.advance(1)
    [held, _] = kit.held("payments")
    await kit.reply(held, PaymentCharged(order_id="a", payment_id="p"))
    listed = (await client.get("/atoll/sagas")).json()
    assert [(i["saga_id"], i["state"]) for i in listed] == [
        ("saga-a", "COMPLETED"),
        ("saga-b", "RUNNING"),
    ]
    older = (await client.get("/atoll/sagas", params={"before": listed[0]["updated_at"]})).json()
    assert [i["saga_id"] for i in older] == ["saga-b"]
    completed = (await client.get("/atoll/sagas", params={"state": "COMPLETED"})).json()
    assert [i["saga_id"] for i in completed] == [first]
    view = (await client.get(f"/atoll/sagas/{first}")).json()
    assert view["state"] == "COMPLETED"
    assert [s["name"] for s in view["steps"]] == [
        "reserve-stock",
        "charge-payment",
        "ship",
        "confirm",
    ]
    assert view["history"][0]["event"] == "started"
    counts = (await client.get("/atoll/sagas/counts")).json()
    assert counts == [
        {"name": "place-order", "state": "COMPLETED", "count": 1},
        {"name": "place-order", "state": "RUNNING", "count": 1},
    ]
    definitions = (await client.get("/atoll/sagas/definitions")).json()
    assert definitions[0]["name"] == "place-order"
    assert definitions[0]["steps"][2] == {
        "name": "ship",
        "group": 2,
        "parallel": "fulfil",
        "action": "send to shipping",
        "compensation": "send to shipping",
    }
    diagram = await client.get("/atoll/sagas/definitions/place-order/diagram")
    assert diagram.text == to_mermaid(order_saga())


async def test_actions_over_http_are_recorded_and_bad_ones_refused(kit, client):
    saga_id = await kit.start("place-order", Order(order_id="c"))
    missing = await client.get("/atoll/sagas/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert "has no saga 'nope'" in missing.json()["detail"]
    bad = await client.post(f"/atoll/sagas/{saga_id}/explode", json={})
    assert bad.status_code == 422
    conflict = await client.post(f"/atoll/sagas/{saga_id}/skip", json={"step": "ship"})
    assert conflict.status_code == 409
    assert "step 'ship' of saga" in conflict.json()["detail"]
    done = await client.post(
        f"/atoll/sagas/{saga_id}/abort", json={"reason": "test", "operator": "ann"}
    )
    assert done.status_code == 200
    assert done.json()["state"] == "ABORTED"
    assert done.json()["history"][-1]["detail"] == {"operator": "ann", "reason": "test"}
    again = await client.post(f"/atoll/sagas/{saga_id}/abort", json={})
    assert again.status_code == 409
    migrate = await client.post(f"/atoll/sagas/{saga_id}/migrate", json={"to_version": 2})
    assert migrate.status_code == 409
    assert (await client.get("/atoll/sagas/definitions/nope/diagram")).status_code == 404


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield


@pytest.fixture
async def served(tmp_path):
    kit = SagaTestKit(cli_app.engine, tmp_path)
    happy(kit)
    kit.participant("payments").on(ChargePayment, None)
    port = free_port()
    server = _Server(
        uvicorn.Config(cli_app.service.http, host="127.0.0.1", port=port, log_level="warning")
    )
    async with kit:
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        config = tmp_path / "atoll.toml"
        sagas_dir = Path(__file__).parent
        config.write_text(
            f'[system]\npython_path = ["{sagas_dir}"]\n'
            f'[services.cli-orders]\napp = "sagas_cli_app:service"\nport = {port}\n'
            f'[services.other]\napp = "sagas_cli_app:service"\nport = {free_port()}\n'
        )
        try:
            yield kit, config
        finally:
            server.should_exit = True
            await task


async def invoke(*args):
    runner = CliRunner(env={"COLUMNS": "250"})
    return await asyncio.to_thread(runner.invoke, sagas_cli, list(args))


async def test_the_cli_lists_shows_and_repairs_through_the_service(served):
    kit, config = served
    saga_id = await kit.start("place-order", Order(order_id="d"), saga_id="order-d")
    listed = await invoke("list", "--config", str(config), "--json")
    assert listed.exit_code == 0, listed.output
    [item] = json.loads(listed.stdout)
    assert item["saga_id"] == "order-d"
    assert item["service"] == "cli-orders"
    assert "not reachable: other" in listed.stderr
    table = await invoke("list", "--config", str(config), "--service", "cli-orders")
    assert "order-d" in table.stdout
    assert "RUNNING" in table.stdout
    shown = await invoke("show", saga_id, "--config", str(config), "-s", "cli-orders")
    assert shown.exit_code == 0, shown.output
    assert "charge-payment" in shown.stdout
    assert "sent t.ChargePayment to payments" in shown.stdout
    retried = await invoke(
        "retry",
        saga_id,
        "--config",
        str(config),
        "-s",
        "cli-orders",
        "--operator",
        "ann",
        "-r",
        "stuck",
    )
    assert retried.exit_code == 0, retried.output
    assert "is now RUNNING" in retried.stdout
    await kit.run()
    assert len(kit.held("payments")) == 2
    compensated = await invoke(
        "compensate", saga_id, "-c", str(config), "-s", "cli-orders", "-r", "x"
    )
    assert "is now COMPENSATING" in compensated.stdout
    await kit.run()
    view = await kit.instance(saga_id)
    assert view.state == "COMPENSATED"
    assert (
        next(h.detail.get("operator") for h in view.history if h.event.startswith("operator"))
        == "ann"
    )
    refused = await invoke("abort", saga_id, "-c", str(config), "-s", "cli-orders")
    assert refused.exit_code == 1
    assert "cannot abort saga 'order-d': it is COMPENSATED" in refused.stderr
    unknown = await invoke("show", "nope", "-c", str(config), "-s", "cli-orders")
    assert unknown.exit_code == 1
    assert "no saga 'nope' in any service" in unknown.stderr
    counted = await invoke("counts", "-c", str(config), "-s", "cli-orders", "--json")
    assert json.loads(counted.stdout) == [
        {"service": "cli-orders", "name": "place-order", "state": "COMPENSATED", "count": 1}
    ]


async def test_the_cli_prints_a_diagram_from_the_code_without_a_running_service(tmp_path):
    sagas_dir = Path(__file__).parent
    config = tmp_path / "atoll.toml"
    config.write_text(
        f'[system]\npython_path = ["{sagas_dir}"]\n'
        f'[services.cli-orders]\napp = "sagas_cli_app:service"\nport = {free_port()}\n'
    )
    result = await invoke("diagram", "place-order", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert result.stdout == to_mermaid(order_saga())
    missing = await invoke("diagram", "nope", "--config", str(config))
    assert missing.exit_code == 1
    assert "no saga or process 'nope' (known: place-order v1 (cli-orders))" in missing.stderr
    nothing = await invoke("list", "--config", str(config))
    assert nothing.exit_code == 1
    assert "no service with sagas answered" in nothing.stderr
