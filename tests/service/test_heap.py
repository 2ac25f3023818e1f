"""freeze_startup_heap: start-up objects leave the collector's reach; later garbage does not."""

import subprocess
import sys
import textwrap

# In a child process: the helper changes the whole interpreter, this one included.
_CHILD = textwrap.dedent(
    """
    import gc
    import weakref

    import atoll.gateway._gateway  # a real start-up's worth of modules
    from atoll.service import freeze_startup_heap
    from atoll._heap import YOUNG_THRESHOLD

    default = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    freeze_startup_heap()
    frozen = gc.get_freeze_count()
    assert frozen > 10_000, frozen
    assert gc.get_threshold() == (YOUNG_THRESHOLD, default[1], default[2]), gc.get_threshold()
    assert gc.collect() == 0  # nothing left to walk but what came after

    class Node:
        pass

    # Cyclic garbage made after start-up is still collected.
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None
    gc.collect()
    assert gone() is None

    # A higher threshold set on purpose is kept: the helper only ever raises it.
    gc.set_threshold(50_000, 5, 5)
    freeze_startup_heap()
    assert gc.get_threshold() == (50_000, 5, 5)
    assert gc.get_freeze_count() >= frozen
    print("ok")
    """
)


def test_freeze_startup_heap_freezes_start_up_objects_and_keeps_collecting_later_cycles():
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
