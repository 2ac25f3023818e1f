"""Attribute terms and the attribute index's Bloom filters.

The attribute index answers one question for a chunk of spans: might a span in it have
attribute ``key`` with value ``value``? Each chunk keeps a Bloom filter of its terms, one
term per distinct scalar attribute, so indexing a chunk costs one row however many
attributes it has (a table of (key, value, chunk) rows cost the collector about as much
CPU as storing the spans themselves: ``docs/benchmarks.md``, "tracing"). A false positive
costs a look at the chunk's spans, which the search does anyway for every candidate; a
false negative would lose results, so the terms of stored values and of searched values
must agree, as the search's JSON check (SQLite's ``json_each``) compares them:

* text is text, compared by its bytes; booleans are the texts ``'true'`` and
  ``'false'``;
* numbers compare by value: an integer and a float with the same value are one term, so
  a float that is integral (and fits in 64 bits) is the integer; other floats are their
  ``repr``;
* text and numbers never match each other.

A term is ``crc32(t) << 32 | crc32(t, TERM_SEED)`` of ``key, NUL, tag, value`` in UTF-8
(tag ``s`` for text, ``n`` for an integer, ``f`` for another float): the C decoder
(``_native.c``) computes the same for the spans it reads.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Final

__all__ = [
    "BLOOM_HASHES",
    "TERM_SEED",
    "Term",
    "bloom_bits",
    "make_bloom",
    "might_contain",
    "term_hash",
]

#: A term: the 64-bit hash of one attribute's key and value.
Term = int

TERM_SEED: Final = 0x9E3779B9
#: Bit positions a term sets (7 with 10 bits a term: about 1% false positives).
BLOOM_HASHES: Final = 7
BITS_PER_TERM: Final = 10
MIN_BLOOM_BITS: Final = 512
_INT64: Final = 1 << 63


def term_hash(key: str, value: str | int | float) -> Term:  # noqa: PYI041 - bool is text here, int is not float
    """The term of attribute ``key`` with scalar ``value`` (booleans count as text)."""
    if value.__class__ is bool:
        value = "true" if value else "false"
    if isinstance(value, str):
        tagged = b"s" + value.encode("utf-8", "surrogatepass")
    elif isinstance(value, float) and not (value.is_integer() and -_INT64 <= value < _INT64):
        tagged = b"f" + repr(value).encode()
    else:
        tagged = b"n%d" % int(value)
    data = key.encode("utf-8", "surrogatepass") + b"\x00" + tagged
    return zlib.crc32(data) << 32 | zlib.crc32(data, TERM_SEED)


def bloom_bits(terms: int) -> int:
    """The size in bits of a filter for ``terms`` terms: a power of two."""
    bits = MIN_BLOOM_BITS
    while bits < terms * BITS_PER_TERM:
        bits *= 2
    return bits


def _make_bloom_python(terms: Iterable[Term], bits: int) -> bytes:
    if bits < 8 or bits & (bits - 1):
        raise ValueError("bits must be a power of two, at least 8")
    bloom = bytearray(bits // 8)
    mask = bits - 1
    for term in terms:
        first, step = term >> 32, (term & 0xFFFFFFFF) | 1
        for i in range(BLOOM_HASHES):
            bit = (first + i * step) & mask
            bloom[bit >> 3] |= 1 << (bit & 7)
    return bytes(bloom)


def might_contain(bloom: bytes, term: Term) -> bool:
    """Whether ``bloom`` may hold ``term`` (``False``: certainly not)."""
    mask = len(bloom) * 8 - 1
    first, step = term >> 32, (term & 0xFFFFFFFF) | 1
    for i in range(BLOOM_HASHES):
        bit = (first + i * step) & mask
        if not bloom[bit >> 3] & (1 << (bit & 7)):
            return False
    return True


try:
    from atoll.observability.collector._native import make_bloom
except ImportError:  # built without a C compiler (hatch_build.py)
    make_bloom = _make_bloom_python
