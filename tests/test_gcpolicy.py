"""luanette.gcpolicy: what the daemon's processes do to Python's cyclic collector."""

from __future__ import annotations

import subprocess
import sys

from luanette.gcpolicy import YOUNG_THRESHOLD

PROBE = """
import gc
from luanette import gcpolicy
held = [[i] for i in range(1000)]  # objects alive at start-up, as a server's are
before = gc.get_freeze_count()
gcpolicy.settle()
after = gc.get_freeze_count()
cycle = []
cycle.append(cycle)  # made after settle: still collectable
import weakref
class Node: pass
node = Node(); node.me = node; ref = weakref.ref(node); del node
gc.collect()
print(before, after, gc.get_threshold()[0], ref() is None)
"""


def test_settle_freezes_what_the_process_holds_and_still_collects_new_cycles() -> None:
    # in a process of its own: freezing is for the life of the interpreter
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    before, after, threshold, collected = int(out[0]), int(out[1]), int(out[2]), out[3]
    assert before == 0 and after >= 1000
    assert threshold == YOUNG_THRESHOLD
    assert collected == "True"
