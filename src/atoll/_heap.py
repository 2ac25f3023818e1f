"""Keeping the cyclic garbage collector off the hot path of a long-running atoll process.

Measured in one gateway worker under ``wrk -c64`` (a ``gc.callbacks`` timer around every
collection, 130,000 to 195,000 requests a run; ``benchmarks/gc_settings.py`` repeats it):

* CPython's default settings cost **9 µs of collector time a request**, about a sixth of
  the gateway's CPU. Two thirds of it were *full* collections: one every 7,000 requests,
  each walking every tracked object in the process (about 70,000 after importing
  FastAPI, OpenTelemetry and the rest) for **47 ms**, during which no request moved.
  The last third were young collections, one every 40 requests at about 100 µs each.
* Almost none of those objects ever become garbage: they are modules, classes, functions
  and configuration, alive until exit. ``gc.freeze()`` after start-up moves them to the
  permanent generation, so full collections walk only what was created since: 2.5 µs a
  request, full collections 0.3 ms.
* The young collections ran not because requests leave garbage (the collector freed
  696 cyclic objects over 48,827 requests) but because 64 requests in flight keep more
  than the default 700 young objects alive at once. With the first threshold at 10,000
  there were no collections left in a 10 s run: 0 µs a request. What that costs is
  bounded: at most 10,000 objects of cyclic garbage wait for a collection.

Only process entry points call :func:`freeze_startup_heap` (``atoll up``, the gateway's
workers, the collector's command): it changes the whole process, which a library must
not do to its host application.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "freeze_startup_heap"]

#: The first generation's threshold set by :func:`freeze_startup_heap` (CPython's is 700).
YOUNG_THRESHOLD = 10_000


def freeze_startup_heap() -> None:
    """Collect once, exempt every object alive now from future collections, and collect
    the young generation less often (see the module's docstring for the measurements).

    Call it after start-up (imports, configuration, connections) and before serving.
    Objects frozen here are never collected, even should they later become cyclic
    garbage; calling it again freezes what was created since. The older generations'
    thresholds are left as they are.
    """
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
