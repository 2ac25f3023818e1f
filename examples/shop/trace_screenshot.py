"""Place one order in a running shop and photograph its trace for the README.

    make demo                                   # in one terminal
    .venv/bin/python examples/shop/trace_screenshot.py [docs/img/trace-view.png]

The order goes through the gateway with a token from ``atoll token``, exactly as the
README's tour does; the script waits for the saga to finish, finds the order's trace in
the embedded collector by its ``order.id`` attribute, opens the waterfall in Debian's
headless Chromium and saves it. Nothing here is synthetic: the picture is the trace the
shop recorded.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/shop/atoll.toml"
GATEWAY = "http://127.0.0.1:8080"
COLLECTOR = "http://127.0.0.1:4318"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def token() -> str:
    command = [str(ROOT / ".venv/bin/atoll"), "token", "--sub", "alice"]
    command += ["--scope", "orders:write", "--scope", "orders:read", "--config", str(CONFIG)]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


def place_order(client: httpx.Client) -> str:
    body = {"customer_id": "c1", "items": [{"sku": "apple", "qty": 2}, {"sku": "banana", "qty": 1}]}
    response = client.post(f"{GATEWAY}/orders", json=body)
    response.raise_for_status()
    order_id = str(response.json()["order_id"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = client.get(f"{GATEWAY}/orders/{order_id}").json().get("status")
        if status in {"CONFIRMED", "REJECTED"}:
            print(f"order {order_id}: {status}")
            return order_id
        time.sleep(0.2)
    raise SystemExit(f"order {order_id} did not finish in 30 s")


def find_trace(order_id: str) -> str:
    """The trace id of the order's trace, once the services' batches have landed."""
    deadline = time.monotonic() + 30
    trace_id = ""
    spans = 0
    while time.monotonic() < deadline:
        found = httpx.get(
            f"{COLLECTOR}/api/traces", params={"attr": f"order.id={order_id}"}, timeout=5
        )
        found.raise_for_status()
        traces = found.json()["traces"]
        if traces:
            trace_id = str(traces[0]["trace_id"])
            count = int(traces[0]["span_count"])
            if count == spans and count > 0:  # stable across two polls: every batch is in
                return trace_id
            spans = count
        time.sleep(2.0)
    if trace_id:
        return trace_id
    raise SystemExit(f"no trace with order.id={order_id} reached the collector")


def photograph(trace_id: str, path: Path) -> None:
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only this script needs it

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"{COLLECTOR}/traces/{trace_id}")
        page.wait_for_selector(".span-row")
        page.screenshot(path=str(path), full_page=True)
        browser.close()
    print(f"saved {path}")


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs/img/trace-view.png"
    headers = {"authorization": f"Bearer {token()}"}
    with httpx.Client(headers=headers, timeout=10) as client:
        order_id = place_order(client)
    photograph(find_trace(order_id), path)


if __name__ == "__main__":
    main()
