"""Events, aggregates and projections the event store tests share.

Declared at module level: aggregates and projections read their annotations with
``typing.get_type_hints``, which needs module globals.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from atoll.eventstore import Aggregate, EventRecord, Personal, Projection, Transaction, applies, on
from atoll.messages import Event, MessageRegistry


class AccountOpened(Event):
    message_type = "bank.AccountOpened"
    account_id: str
    owner: str


class Deposited(Event):
    """v3: amounts in cents, with a currency. v1 had `amount` in whole euros; v2 added
    `currency` (v1 -> v2 -> v3)."""

    message_type = "bank.Deposited"
    message_version = 3
    account_id: str
    amount_cents: int
    currency: str


class Withdrawn(Event):
    message_type = "bank.Withdrawn"
    account_id: str
    amount_cents: int


def bank_registry() -> MessageRegistry:
    registry = MessageRegistry([AccountOpened, Deposited, Withdrawn])

    @registry.upcaster("bank.Deposited", 1)
    def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "currency": "EUR"}

    @registry.upcaster("bank.Deposited", 2)
    def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
        amount = data.pop("amount")
        return {**data, "amount_cents": amount * 100}

    return registry


class Account(Aggregate):
    category = "account"
    snapshot_every = 3

    owner: str = ""
    balance_cents: int = 0
    history: list[int] = []  # noqa: RUF012 - copied per aggregate by its state struct

    def open(self, owner: str) -> None:
        if self.version >= 0 or self.pending_events:
            raise ValueError("already open")
        self.record(AccountOpened(account_id=self.id, owner=owner))

    def deposit(self, cents: int) -> None:
        if cents <= 0:
            raise ValueError("deposit a positive amount")
        self.record(Deposited(account_id=self.id, amount_cents=cents, currency="EUR"))

    def withdraw(self, cents: int) -> None:
        if cents > self.balance_cents:
            raise ValueError("insufficient funds")
        self.record(Withdrawn(account_id=self.id, amount_cents=cents))

    @applies
    def _opened(self, event: AccountOpened) -> None:
        self.owner = event.owner

    @applies
    def _changed(self, event: Deposited | Withdrawn) -> None:
        delta = event.amount_cents if isinstance(event, Deposited) else -event.amount_cents
        self.balance_cents += delta
        self.history.append(delta)


class Balances(Projection):
    name = "balances"
    fail_on: ClassVar[set[str]] = set()

    async def setup(self, tx: Transaction) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS balances (account_id TEXT PRIMARY KEY,"
            " owner TEXT NOT NULL, cents BIGINT NOT NULL, events BIGINT NOT NULL)"
        )

    async def reset(self, tx: Transaction) -> None:
        await tx.execute("DELETE FROM balances")

    @on
    async def opened(self, record: EventRecord[AccountOpened], tx: Transaction) -> None:
        await tx.execute(
            "INSERT INTO balances (account_id, owner, cents, events) VALUES (?, ?, 0, 1)",
            record.event.account_id,
            record.event.owner,
        )

    @on
    async def changed(self, record: EventRecord[Deposited | Withdrawn], tx: Transaction) -> None:
        event = record.event
        if event.account_id in self.fail_on:
            raise RuntimeError(f"refusing {event.account_id}")
        delta = event.amount_cents if isinstance(event, Deposited) else -event.amount_cents
        await tx.execute(
            "UPDATE balances SET cents = cents + ?, events = events + 1 WHERE account_id = ?",
            delta,
            event.account_id,
        )


# -- personal data ------------------------------------------------------------------------


class CustomerRegistered(Event):
    message_type = "crm.CustomerRegistered"
    data_subject: ClassVar[str] = "customer_id"
    customer_id: str
    email: Annotated[str, Personal]
    name: Annotated[str, Personal]
    country: str
    phone: Annotated[str | None, Personal] = None


class CustomerMoved(Event):
    message_type = "crm.CustomerMoved"
    data_subject: ClassVar[str] = "customer_id"
    customer_id: str
    address: Annotated[str, Personal]
    country: str


class Customer(Aggregate):
    category = "customer"
    snapshot_every = 2
    data_subject = "id"

    email: Annotated[str, Personal] = ""
    address: Annotated[str, Personal] = ""
    country: str = ""
    moves: int = 0

    def register(self, email: str, name: str, country: str) -> None:
        self.record(
            CustomerRegistered(customer_id=self.id, email=email, name=name, country=country)
        )

    def move(self, address: str, country: str) -> None:
        self.record(CustomerMoved(customer_id=self.id, address=address, country=country))

    @applies
    def _registered(self, event: CustomerRegistered) -> None:
        self.email = event.email
        self.country = event.country

    @applies
    def _moved(self, event: CustomerMoved) -> None:
        self.address = event.address
        self.country = event.country
        self.moves += 1


class Directory(Projection):
    name = "directory"

    async def setup(self, tx: Transaction) -> None:
        await tx.execute(
            "CREATE TABLE IF NOT EXISTS directory (customer_id TEXT PRIMARY KEY,"
            " email TEXT NOT NULL, country TEXT NOT NULL)"
        )

    async def reset(self, tx: Transaction) -> None:
        await tx.execute("DELETE FROM directory")

    @on
    async def registered(self, record: EventRecord[CustomerRegistered], tx: Transaction) -> None:
        await tx.execute(
            "INSERT INTO directory (customer_id, email, country) VALUES (?, ?, ?)",
            record.event.customer_id,
            record.event.email,
            record.event.country,
        )

    @on
    async def moved(self, record: EventRecord[CustomerMoved], tx: Transaction) -> None:
        await tx.execute(
            "UPDATE directory SET country = ? WHERE customer_id = ?",
            record.event.country,
            record.event.customer_id,
        )
