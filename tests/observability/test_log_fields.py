"""JSON log lines keep what the code put in a record: stdlib ``extra=`` fields, and a
structlog event's %-style arguments."""

import json
import logging

import structlog

from atoll.observability import configure_logging


def lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]


def test_extra_fields_of_a_stdlib_record_are_in_its_json_line(capsys):
    configure_logging(service="payments", fmt="json", level="INFO")
    try:
        logging.getLogger("payments").info("charged", extra={"order_id": "o-1", "cents": 999})
    finally:
        logging.getLogger().handlers.clear()
    [record] = lines(capsys)
    assert record["event"] == "charged"
    assert record.get("order_id") == "o-1", record
    assert record.get("cents") == 999


def test_a_structlog_events_arguments_are_formatted(capsys):
    configure_logging(service="payments", fmt="json", level="INFO")
    try:
        structlog.get_logger("payments").info("charged %s cents", 999)
    finally:
        logging.getLogger().handlers.clear()
    [record] = lines(capsys)
    assert record["event"] == "charged 999 cents", record
