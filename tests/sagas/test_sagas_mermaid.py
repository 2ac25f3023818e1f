"""`atoll sagas diagram`: a definition as a Mermaid flowchart."""

import re

from order_saga import order_saga

from atoll.sagas import to_mermaid


def edges(text):
    return set(re.findall(r"^\s+(\w+) (-->|-\.->)(?:\|\"([^\"]*)\"\|)? (\w+)$", text, re.MULTILINE))


def test_the_diagram_has_every_step_reply_compensation_and_end_state():
    text = to_mermaid(order_saga())
    assert text.startswith("flowchart TD\n")
    assert 'subgraph g2_fulfil ["parallel: fulfil"]' in text
    assert (
        '["ship<br/>send to shipping<br/>timeout 30s, 2 attempts<br/>when needs_shipping"]' in text
    )
    found = edges(text)
    forward = {
        ("start", "-->", "", "s0_reserve_stock"),
        ("s0_reserve_stock", "-->", "t.StockReserved", "s1_charge_payment"),
        ("s1_charge_payment", "-->", "t.PaymentCharged", "s2_ship"),
        ("s1_charge_payment", "-->", "t.PaymentCharged", "s3_confirm"),
        ("s2_ship", "-->", "t.ShipmentScheduled or skipped", "done"),
        ("s3_confirm", "-->", "returns", "done"),
    }
    backward = {
        ("c2_ship", "-.->", "", "c1_charge_payment"),
        ("c1_charge_payment", "-.->", "", "c0_reserve_stock"),
        ("c0_reserve_stock", "-.->", "", "compensated"),
        ("s0_reserve_stock", "-.->", "t.StockRejected", "compensated"),
        ("s1_charge_payment", "-.->", "t.PaymentDeclined / t.PaymentBusy", "c0_reserve_stock"),
        ("s1_charge_payment", "-.->", "timeout", "c1_charge_payment"),
        ("s3_confirm", "-.->", "raises", "c2_ship"),
        ("c1_charge_payment", "-.->", "keeps failing", "failed"),
    }
    assert forward <= found, forward - found
    assert backward <= found, backward - found
    node_ids = set(re.findall(r"^\s+(\w+)[\[(]", text, re.MULTILINE))
    assert {a for a, _, _, _ in found} | {b for _, _, _, b in found} <= node_ids, (
        "an edge to nowhere"
    )
    assert text.endswith("%% the whole saga times out after 600s\n")
