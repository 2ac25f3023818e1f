# The C span decoder (_native.c); see OTLPDecoder._decode_native.

from collections.abc import Callable, Iterable
from typing import Any

def decode_spans(
    body: bytes,
    rows: list[Any],
    operations: set[tuple[str, str]],
    terms: set[int] | None,
    resource: Callable[[bytes], tuple[int, str]],
    scope: Callable[[bytes], int],
    slow_span: Callable[[bytes, int, int, str], None],
    /,
) -> bool: ...
def make_bloom(terms: Iterable[int], bits: int, /) -> bytes: ...
