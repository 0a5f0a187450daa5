"""The `flow` namespace: a job's or eval's side of the daemon's flows (docs/plugins.md,
"Flows").  Every call goes to the front's :class:`luanette.flows.FlowManager`, which
keeps the instances in the job database; the run's user is the acting user (what the
flow's guards and handlers see as ``ctx:current_user()``).  Lua API::

    flow.start(definition, context?, subject?) -> instance {id, definition_id, current_state, context, ...}
    flow.send(instance_id, action, data?)      -> TransitionResult {type = "success"|"guard_failed"|...}
    flow.get(instance_id)                      -> instance with its history, or nil
    flow.list{subject, state, definition, limit} -> {instance, ...}

Errors are Lua errors ``flow.<function>: <code>: <message>`` (``not_found``,
``flow_handler_failed``, ``flow_history_full``, ...); catch them with pcall.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from luanette.engine.api import LuaCallError, RunContext


class FlowService(Protocol):
    """The front's flows as a worker reaches them."""

    async def call(self, op: str, arguments: dict[str, Any], user: str | None) -> dict[str, Any]:
        """``{ok, value}`` or ``{ok = false, code, message}``."""
        ...


class FlowNamespace:
    """Lua global `flow` (jobs and evals)."""

    name = "flow"

    def __init__(self, service: FlowService | None, user: str | None) -> None:
        self._service = service
        self._user = user

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        async def ask(op: str, arguments: dict[str, Any]) -> Any:
            if self._service is None:
                raise LuaCallError("unsupported: flows are not available to this run")
            answer = await self._service.call(op, arguments, self._user)
            if not answer.get("ok"):
                raise LuaCallError(f"{answer.get('code')}: {answer.get('message')}")
            return answer.get("value")

        async def start(definition: Any = None, context: Any = None, subject: Any = None) -> Any:
            """Start an instance of the registered flow ``definition``; the instance."""
            if not isinstance(definition, str):
                raise LuaCallError("invalid_params: the flow's id is a string")
            return await ask("start", {"definition": definition, "context": context, "subject": subject or ""})

        async def send(instance: Any = None, action: Any = None, data: Any = None) -> Any:
            """Send ``action`` to an instance; seed 004's TransitionResult."""
            if not isinstance(instance, str) or not isinstance(action, str):
                raise LuaCallError("invalid_params: flow.send(instance_id, action [, data])")
            return await ask("send", {"instance": instance, "action": action, "data": data})

        async def get(instance: Any = None) -> Any:
            """An instance with its history, or nil."""
            if not isinstance(instance, str):
                raise LuaCallError("invalid_params: flow.get(instance_id)")
            return await ask("get", {"instance": instance})

        async def list_(filters: Any = None) -> Any:
            """Instances matching ``{subject, state, definition, limit}``."""
            return await ask("list", dict(filters) if isinstance(filters, dict) else {})

        return {"start": start, "send": send, "get": get, "list": list_}
