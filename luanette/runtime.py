"""The Lua engine as the rest of the daemon (and its tests) have always imported it.

A thin re-export: the contract lives in ``luanette.engine.api``, the in-process engine
in ``luanette.engine.lua``.
"""

from luanette.engine.api import (
    SANDBOX_GLOBALS,
    CancelToken,
    ErrorDetail,
    Limits,
    LuaCallError,
    Namespace,
    Outcome,
    RunContext,
    ScriptError,
    StackFrame,
)
from luanette.engine.lua import (
    ABANDON_GRACE_S,
    RuntimeStats,
    _ThreadPool,
    check_syntax,
    release_idle_states,
    run_script,
    stats,
)

__all__ = [
    "ABANDON_GRACE_S",
    "SANDBOX_GLOBALS",
    "CancelToken",
    "ErrorDetail",
    "Limits",
    "LuaCallError",
    "Namespace",
    "Outcome",
    "RunContext",
    "RuntimeStats",
    "ScriptError",
    "StackFrame",
    "_ThreadPool",
    "check_syntax",
    "release_idle_states",
    "run_script",
    "stats",
]
