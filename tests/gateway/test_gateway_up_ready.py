"""`atoll up` waits for the gateway's admin /readyz. It must probe where the admin
endpoints listen (the gateway file's admin.host, 127.0.0.1 by default), not the
public host of `[gateway] host`."""

import contextlib
import io
import textwrap

import httpx
import yaml
from rich.console import Console

from atoll.cli._up import Supervisor
from atoll.config import load_config
from support import free_port


async def test_atoll_up_sees_a_gateway_on_another_public_address_ready(tmp_path):
    gw_port, admin_port = free_port(), free_port()
    (tmp_path / "gateway.yaml").write_text(
        yaml.safe_dump(
            {
                "upstreams": {"a": {"targets": ["127.0.0.1:9"]}},
                "routes": [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
            }
        )
    )
    (tmp_path / "atoll.toml").write_text(
        textwrap.dedent(
            f"""
            [system]
            name = "t"
            transport = "sqlite:///bus.db"
            collector = {{ enabled = false }}

            [gateway]
            config = "gateway.yaml"
            host = "127.0.0.2"   # the public listener on one address of this host
            port = {gw_port}
            admin_port = {admin_port}
            """
        )
    )
    loaded = load_config(tmp_path / "atoll.toml")
    supervisor = Supervisor(loaded, [], console=Console(file=io.StringIO()), ready_timeout=8)
    child = supervisor.gateway
    assert child is not None
    await supervisor._spawn(child)
    try:
        async with httpx.AsyncClient() as client:
            # The gateway itself is up: its admin port answers on 127.0.0.1.
            ready = await supervisor._await_ready(client, child)
            direct = None
            with contextlib.suppress(httpx.HTTPError):
                direct = (await client.get(f"http://127.0.0.1:{admin_port}/readyz")).status_code
        assert direct == 200
        assert ready, f"atoll up probed {child.url}/readyz and never saw the gateway ready"
    finally:
        supervisor._stopping = True
        await supervisor._stop([child])
