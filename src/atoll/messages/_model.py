"""Typed message declarations: commands, events and replies."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

MessageKind = Literal["command", "event", "reply"]


class Message(msgspec.Struct, kw_only=True):
    """Base of every message. Declare a message by subclassing :class:`Command`,
    :class:`Event` or :class:`Reply` and annotating its fields::

        class ReserveStock(Command):
            message_type = "inventory.ReserveStock"   # stable wire name
            message_version = 2                       # bump when the schema changes
            order_id: str
            items: list[LineItem]

    ``message_type`` defaults to the class name. Keep it stable once messages are on
    the wire: it is how consumers find the class.
    """

    message_type: ClassVar[str]
    message_version: ClassVar[int] = 1
    message_kind: ClassVar[MessageKind]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "message_type" not in cls.__dict__:
            cls.message_type = cls.__name__
        if not isinstance(cls.message_version, int) or cls.message_version < 1:
            raise TypeError(f"{cls.__qualname__}.message_version must be an int >= 1")


class Command(Message, kw_only=True):
    """A request to one service to do something. Sent point-to-point."""

    message_kind: ClassVar[MessageKind] = "command"


class Event(Message, kw_only=True):
    """A fact that happened. Published to every subscribing service."""

    message_kind: ClassVar[MessageKind] = "event"


class Reply(Message, kw_only=True):
    """The answer to a command, sent back to the command's source service."""

    message_kind: ClassVar[MessageKind] = "reply"
