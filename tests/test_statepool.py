"""The idle Lua states a process keeps between runs (luanette.engine.lua._StatePool).

A run holds its state while it waits, so a burst of concurrent runs needs a state
each; after a burst the pool keeps as many as were in use (up to its burst size) for a
while, so the next burst starts warm, then trims back to its base.  Time is the pool's
``keep_s``: 0 makes "a while" over at once, without waiting.
"""

from __future__ import annotations

from luanette.engine import lua
from luanette.engine.worker import IDLE_STATE_BYTES, MAX_BURST_STATES, burst_states


def _burst(pool: lua._StatePool, n: int) -> list[lua._State]:
    taken = [pool.take() for _ in range(n)]
    for state in taken:
        pool.give(state)
    return taken


def test_without_a_burst_size_the_pool_keeps_its_base() -> None:
    pool = lua._StatePool(2)
    _burst(pool, 5)
    assert len(pool) == 2


def test_after_a_burst_the_states_it_used_stay_idle_and_serve_the_next_burst() -> None:
    pool = lua._StatePool(2, burst=8, keep_s=3600)
    first = _burst(pool, 5)
    assert len(pool) == 5  # as many as the burst used, not the burst size
    assert pool.trim() == 0  # the burst is recent: nothing to trim
    second = [pool.take() for _ in range(5)]
    assert {id(s) for s in second} == {id(s) for s in first}  # warm: no new state


def test_the_burst_size_bounds_what_is_kept() -> None:
    pool = lua._StatePool(2, burst=3, keep_s=3600)
    _burst(pool, 6)
    assert len(pool) == 3


def test_once_the_burst_is_over_trim_frees_the_extra_states_a_batch_at_a_time() -> None:
    pool = lua._StatePool(2, burst=40, keep_s=3600)
    _burst(pool, 30)
    assert len(pool) == 30
    pool._keep_s = 0  # the burst is long over
    assert pool.trim() == lua.TRIM_BATCH
    assert pool.trim() == 30 - 2 - lua.TRIM_BATCH
    assert pool.trim() == 0 and len(pool) == 2


def test_a_state_that_is_not_given_back_is_no_longer_counted_in_use() -> None:
    pool = lua._StatePool(1, burst=4, keep_s=3600)
    pool.take()
    pool.drop()  # its run ended abnormally: the state is discarded
    pool.give(pool.take())
    assert len(pool) == 1  # one in use at a time: no burst was seen


def test_a_worker_keeps_a_sixteenth_of_its_memory_share_in_idle_states() -> None:
    assert burst_states(16 * IDLE_STATE_BYTES * 100) == 100
    assert burst_states(48 * 2**20) == 6  # (the pool never keeps fewer than its base)
    assert burst_states(0) == MAX_BURST_STATES  # no share: no recycling, the cap holds
    assert burst_states(2**40) == MAX_BURST_STATES
