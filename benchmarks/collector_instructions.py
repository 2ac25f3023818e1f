"""Instructions per span in the collector's decoder and store, counted by callgrind.

    .venv/bin/python benchmarks/collector_instructions.py [--quick]

CPU-time figures for the collector move by tens of percent with the host's state (see
``docs/benchmarks.md``, "tracing"); instruction counts do not. This script encodes the
tracing benchmark's spans (``benchmarks/collector_store.py``: consumer spans as atoll's
services make them, in requests of 512), then runs one child process under
``valgrind --tool=callgrind --dump-before=os_getppid*``, which does these steps one after
the other, calling ``os.getppid()`` between them so that callgrind writes each step's
counts to a file of its own:

* ``decode-python``: decode the requests with the Python decoder (upb and Python);
* ``decode-c``: decode them with the C walk (``_native.c``), the default;
* ``store``: decode (C) and store them: one transaction a request, 10,000-span segments,
  then the attribute index (a Bloom filter per chunk);
* ``store-no-index``: the same into another store, without the attribute index (and
  without the terms the decoder collects for it).

The store's own cost is ``store`` less ``decode-c``. Counts are of user-space
instructions in every thread; system calls and cache misses are not in them. 20,480
spans (2,048 with ``--quick``). Needs Debian's ``valgrind``. Last line, JSON: the case
``decode-c-vs-python`` (instructions a span; ratio = Python / C, higher is better), with
the store's figures beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = ("decode-python", "decode-c", "store", "store-no-index")


def child(bodies_path: str) -> None:
    from atoll.observability.collector._decode import OTLPDecoder  # noqa: PLC0415
    from atoll.observability.collector._store import Retention, SpanStore  # noqa: PLC0415

    bodies = pickle.loads(Path(bodies_path).read_bytes())

    async def run(tmp: Path) -> None:
        stores = {}
        for name, index in (("store", True), ("store-no-index", False)):
            store = SpanStore(
                tmp / f"{name}.db",
                retention=Retention(max_segment_spans=10_000),
                index_attributes=index,
            )
            await store.open()
            stores[name] = store
        decoders = {
            "decode-python": OTLPDecoder(Interner(), Interner(), native=False),
            "decode-c": OTLPDecoder(Interner(), Interner()),
            "store": OTLPDecoder(stores["store"].resources, stores["store"].scopes),
            "store-no-index": OTLPDecoder(
                stores["store-no-index"].resources,
                stores["store-no-index"].scopes,
                collect_terms=False,
            ),
        }
        for step in STEPS:
            os.getppid()  # the marker: callgrind dumps the counts so far
            decoder = decoders[step]
            store = stores.get(step)
            for body in bodies:
                batch = decoder.decode_protobuf(body)
                if store is not None:
                    await store.write(batch)
            if store is not None:
                await store.index_now()
        os.getppid()
        for store in stores.values():
            await store.close()

    from atoll.observability.collector._decode import Interner  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp)))


def instructions(bodies_path: str) -> dict[str, int]:
    """Each step's instruction count, from the files callgrind dumps at the markers."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--dump-before=os_getppid*",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                bodies_path,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        parts = []
        for number in range(1, len(STEPS) + 2):  # the setup, then one part a step
            text = Path(f"{out}.{number}").read_text(errors="replace")
            found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
            if found is None:
                raise RuntimeError(f"no count in callgrind's part {number}")
            parts.append(int(found.group(1)))
    return dict(zip(STEPS, parts[1:], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", metavar="BODIES")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import collector_store  # noqa: PLC0415 - only the parent encodes

    count = 2_048 if args.quick else 20_480
    bodies = collector_store.request_bodies(count)
    with tempfile.TemporaryDirectory() as tmp:
        bodies_path = str(Path(tmp) / "bodies.pickle")
        Path(bodies_path).write_bytes(pickle.dumps(bodies))
        counts = instructions(bodies_path)
    per_span = {step: counts[step] / count for step in STEPS}
    store = per_span["store"] - per_span["decode-c"]
    index = per_span["store"] - per_span["store-no-index"]
    print(f"{count:,} spans in {len(bodies)} requests; instructions a span:")
    print(f"  decode, Python (upb): {per_span['decode-python']:,.0f}")
    print(f"  decode, C:            {per_span['decode-c']:,.0f}")
    print(
        f"  store (with index):   {store:,.0f}, of which the attribute index {index:,.0f}"
        " (its terms, collected by the decoder, and the filters)"
    )
    cases = {
        "decode-c-vs-python": {
            "atoll": round(per_span["decode-c"]),
            "peer": round(per_span["decode-python"]),
            "unit": "instructions per span, the C walk vs the Python decoder",
            "ratio": round(per_span["decode-python"] / per_span["decode-c"], 2),
            "store_instructions_per_span": round(store),
            "attribute_index_instructions_per_span": round(index),
        }
    }
    print(json.dumps({"benchmark": "collector_instructions", "cases": cases}))


if __name__ == "__main__":
    main()
