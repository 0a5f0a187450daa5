"""Completions: values for an argument as a client types it.

Served over ZeroMQ by ``complete {context, partial}``. ``context`` names what is being
completed, either a kind directly (``script_hash``, ``job_id``, ``status``, ``tag``,
``example``, ``namespace``, ``prompt``, ``style``, ``operation``, ``uri``) or an
argument of something a client knows, as MCP's completion requests name it:

- ``prompt:<prompt>#<argument>`` (``prompt:debug-script#hash``),
- ``tool:<request>#<field>`` (``tool:job_status#job_id``),
- ``<uri template>#<variable>`` (``lua://jobs/{id}#id``).

An argument with nothing to suggest (free text such as a task) completes to no values;
an unknown prompt, request, template or kind is ``invalid_params``.  The reply is
``{values, total, has_more}``: at most :data:`MAX_VALUES` values starting with
``partial`` (case-insensitive), ``total`` how many matched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

import msgspec

from hooteproto import types as t
from hooteproto.results import CompletionResult
from luanette.apiref import Reference
from luanette.errors import RequestError
from luanette.jobs import Jobs
from luanette.prompts import OPERATIONS, PROMPTS, STYLES
from luanette.resources import STATIC, TEMPLATES, example_names
from luanette.scripts import Scripts
from luanette.tooldocs import TOOL_DOCS

MAX_VALUES: Final = 100
"""Values in one reply (MCP's limit too); ``has_more`` says when more matched."""
MAX_PARTIAL: Final = 256
MAX_CONTEXT: Final = 512
SCANNED_SCRIPTS: Final = 500
"""Newest indexed scripts whose hashes and tags are offered."""

COMMON_TAGS: Final = ("type:lua", "midi", "generation", "transition", "garden", "utility", "example")

KINDS: Final = ("script_hash", "job_id", "status", "tag", "example", "namespace", "prompt", "style", "operation", "uri")

_FIELD_KINDS: Final = {
    "script_hash": "script_hash",
    "hash": "script_hash",
    "job_id": "job_id",
    "job_ids": "job_id",
    "status": "status",
    "tag": "tag",
    "tags": "tag",
    "uri": "uri",
    "style": "style",
    "operation": "operation",
}
"""An argument's kind by its name, for prompts and requests."""

_TEMPLATE_KINDS: Final = {
    ("lua://scripts/{hash}", "hash"): "script_hash",
    ("lua://jobs/{id}", "id"): "job_id",
    ("lua://examples/{name}", "name"): "example",
    ("lua://namespaces/{name}", "name"): "namespace",
}


class CompletionError(RequestError):
    """A completion that cannot be answered."""


class Completions:
    """Suggests argument values from the daemon's state."""

    def __init__(self, *, jobs: Jobs, scripts: Scripts, reference: Callable[[], Reference]) -> None:
        self._jobs = jobs
        self._scripts = scripts
        self._reference = reference

    def complete(self, context: str, partial: str) -> dict[str, Any]:
        """``{values, total, has_more}`` for ``context`` (see the module). Raises
        CompletionError ``invalid_params``."""
        if len(context) > MAX_CONTEXT or len(partial) > MAX_PARTIAL:
            raise CompletionError(
                "invalid_params", f"context is at most {MAX_CONTEXT} characters and partial at most {MAX_PARTIAL}"
            )
        kind = kind_of(context)
        if kind is None:
            return msgspec.to_builtins(CompletionResult([], 0, False))
        wanted = partial.casefold()
        matched = [v for v in _unique(self._candidates(kind)) if v.casefold().startswith(wanted)]
        return msgspec.to_builtins(CompletionResult(matched[:MAX_VALUES], len(matched), len(matched) > MAX_VALUES))

    def _candidates(self, kind: str) -> Iterable[str]:
        if kind == "script_hash":
            return [r.hash for r in self._scripts.store.search(limit=SCANNED_SCRIPTS)]
        if kind == "job_id":
            return [job.job_id for job in self._jobs.list(None)]
        if kind == "status":
            return [s.value for s in t.JobStatus]
        if kind == "tag":
            return self._tags()
        if kind == "example":
            return example_names()
        if kind == "namespace":
            return self._reference().names()
        if kind == "prompt":
            return [p.name for p in PROMPTS]
        if kind == "style":
            return list(STYLES)
        if kind == "operation":
            return list(OPERATIONS)
        uris = [s.uri for s in STATIC if s.uri]
        uris += [f"lua://examples/{name}" for name in example_names()]
        uris += [f"lua://namespaces/{name}" for name in self._reference().names()]
        return uris

    def _tags(self) -> list[str]:
        tags = [tag for record in self._scripts.store.search(limit=SCANNED_SCRIPTS) for tag in record.tags]
        for job in self._jobs.list(None):
            job_tags = getattr(job, "tags", None)
            if isinstance(job_tags, list):
                tags += job_tags
        return sorted(set(tags) | set(COMMON_TAGS))


def kind_of(context: str) -> str | None:
    """What ``context`` completes: a kind, or None for an argument with nothing to
    suggest. Raises CompletionError for an unknown kind, prompt, request or template."""
    if "#" not in context:
        if context in KINDS:
            return context
        raise CompletionError(
            "invalid_params",
            f"cannot complete {context[:80]!r}: give a kind ({', '.join(KINDS)}) or "
            "'prompt:<name>#<argument>', 'tool:<request>#<field>', '<uri template>#<variable>'",
        )
    ref, _, argument = context.rpartition("#")
    if ref.startswith("prompt:"):
        prompt = next((p for p in PROMPTS if p.name == ref[7:]), None)
        if prompt is None:
            raise CompletionError("invalid_params", f"no prompt {ref[7:]!r}; the prompts: {_names(PROMPTS)}")
        if argument not in {a.name for a in prompt.arguments}:
            raise CompletionError("invalid_params", f"prompt {prompt.name} has no argument {argument!r}")
        return _FIELD_KINDS.get(argument)
    if ref.startswith("tool:"):
        if ref[5:] not in TOOL_DOCS:
            raise CompletionError("invalid_params", f"no request {ref[5:]!r}; see list_tools")
        if ref[5:] == "get_prompt" and argument == "name":
            return "prompt"
        return _FIELD_KINDS.get(argument)
    if any(spec.uri_template == ref for spec in TEMPLATES):
        kind = _TEMPLATE_KINDS.get((ref, argument))
        if kind is None:
            raise CompletionError("invalid_params", f"{ref} has no variable {argument!r}")
        return kind
    raise CompletionError(
        "invalid_params", f"no prompt, request or resource template {ref[:80]!r} to complete an argument of"
    )


def _names(prompts: Iterable[Any]) -> str:
    return ", ".join(p.name for p in prompts)


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))
