"""The garbage collector's settings for the controller's processes (the Ray actors' hosts, and the
convergence benchmark, which runs the same controller side in one process).

A commit makes the reconciler rebuild its graph, its failover engine and every proxy's config:
hundreds of thousands of new objects that live until the next commit. Under CPython's default
thresholds (700, 10, 10) every 700 net allocations start a young collection, and the survivors
soon trigger full collections over the whole heap: measured in `benchmarks.convergence` at 100
and 1,000 proxies, 10 full collections of 180-270 ms (p50 183 ms) and 113 middle ones (785 ms in
all) in 40 rounds, and a round that meets a full collection is the p99. These objects hold no
reference cycles to collect (frozen dataclasses and tuples, freed by reference counting when the
next commit replaces them), so scanning them again and again buys nothing.

So the controller's processes collect less often: a young collection every 20,000 net
allocations instead of 700 (a render allocates far more than 700 objects between two yields
to the event loop anyway), and what exists when the process has finished starting (imported
modules, the actor itself) is moved out of every later pass (`gc.freeze()`: those objects live
as long as the process; a cycle among them that became garbage later would never be collected,
and nothing the hosts build at start is replaced later). Full collections still run, by
CPython's rules (after 20 x 10 young passes, and only when the objects that survived since the
last one are a quarter of the heap), so cyclic garbage is still found, later. The proxies keep
the interpreter's settings: their heap is small and their latency is per connection, not per
commit.
"""

from __future__ import annotations

import gc

CONTROLLER_GC_THRESHOLDS = (20_000, 20, 10)


def tune_collector(thresholds: tuple[int, int, int] = CONTROLLER_GC_THRESHOLDS) -> tuple[int, ...]:
    """Call once, when the process has finished starting and before it starts threads (see the
    module docstring). Returns the thresholds it replaced (the interpreter's)."""
    before = gc.get_threshold()
    gc.collect()       # what is garbage already goes now, not frozen with the rest
    gc.freeze()
    gc.set_threshold(*thresholds)
    return before
