"""Timeline triggers: chaosgarden's ``timeline_event`` requests start jobs.

A rule (``[[triggers]]`` in the config file, see docs/garden.md) matches an event by
``event_type`` and metadata fields, names a script (a stored script's name or hash, or
a file the daemon stores at start-up) and a params template::

    [[triggers]]
    name = "transition"
    event_type = "generate_transition"
    match = { kind = "bridge" }               # metadata fields that must be equal
    script = "transition"                     # or script_file = "examples/transition.lua"
    [triggers.params]
    current_section = "$metadata.from"
    next_section = "$metadata.to"
    beats_available = "$metadata.beats"
    tempo = "$tempo"

Template strings: ``$position_beats``, ``$tempo``, ``$event_type`` and
``$metadata.<key>`` (dotted for nested keys).  A string that is exactly one placeholder
takes the value with its JSON type; placeholders inside longer text are replaced by
their text; ``$$`` is a literal ``$``.

The first rule that matches starts one job and the reply is ``{job_id, rule,
script_hash}``; an event no rule matches is acknowledged (``{job_id: null}``) and logged.
The job's script reads the event and the rule with ``context.trigger()`` (see
:func:`trigger_info`) and who sent it with ``context.user()``.

``when`` narrows a rule further with a condition over the event (luanette.when: a
small expression language, parsed when the config is loaded).  ``concurrency`` says
what a match does while a job the rule started is still queued or running: ``queue``
(the default) starts another, ``single`` ignores the match (the reply has ``job_id:
null``, ``ignored: true`` and ``running``), ``replace`` cancels the running job(s) and
starts a new one (the reply's ``replaced`` lists them).

A rule cannot fire itself in a loop.  At start-up, once the trigger scripts are stored,
:meth:`Triggers.check_cycles` refuses rules that could: a graph rule -> its script ->
the event types the script declares in ``describe().emits`` -> the rules listening to
them, whose strongly connected components (Tarjan) must be single nodes.  At run time,
as the safety net for what no script declared: a job a rule started carries the event's trace
(its span is a child of the event's), and everything it asks chaosgarden to do carries
that trace on.  While that job runs, an event of the same trace (by its traceparent) or
naming the job (metadata ``luanette_job_id``) that matches the same rule is refused
with ``invalid_state``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
import structlog
from opentelemetry import trace

from hooteproto import types as t
from hooteproto.types import PRIORITY_MAX, PRIORITY_MIN
from luanette import params as params_mod
from luanette.capabilities import GROUP_PATTERN, manifest_list
from luanette.cas import InvalidHash, parse_hash
from luanette.errors import RequestError
from luanette.when import Condition, WhenError
from luanette.when import parse as parse_condition

log = structlog.get_logger("luanette.triggers")

EVENT_TYPES: Final = tuple(e.value for e in t.TimelineEventType)
_PLACEHOLDER: Final = re.compile(r"\$(\$|position_beats|tempo|event_type|metadata((?:\.[A-Za-z0-9_\-]+)+))")
_ANY_DOLLAR_WORD: Final = re.compile(r"\$(?!\$)([A-Za-z_][A-Za-z0-9_.\-]*)")
JOB_ID_KEY: Final = "luanette_job_id"
CONCURRENCY: Final = ("queue", "single", "replace")


class TriggerError(RequestError):
    """An event a rule matched cannot start its job."""


class TriggerRule(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One ``[[triggers]]`` table."""

    event_type: str
    """One of section_change, beat_marker, cue_point, generate_transition, or "*"."""
    name: str = ""
    """Shown in replies and logs; defaults to ``trigger<N>`` (N from 1, in file order)."""
    match: dict[str, Any] = {}
    """Metadata fields (dotted paths) and the values they must have; an array value
    means any of its items."""
    script: str | None = None
    """A stored script: its name (the newest with that name) or its hash."""
    script_file: str | None = None
    """A Lua file (relative to the config file) stored when the daemon starts."""
    params: Any = None
    """The job's params; strings may hold placeholders (see the module docs)."""
    when: str | None = None
    """A condition over the event (see luanette.when) that must hold as well."""
    concurrency: str = "queue"
    """What a match does while a job of this rule is queued or running: start another
    (queue), do nothing (single), or cancel it and start anew (replace)."""
    group: str | None = None
    """The worker group the rule's jobs run on (say ``gpu-host``), in place of the
    script's own ``describe().group``; None: the script's."""
    priority: int | None = None
    """The queue priority of the rule's jobs (-10..10, as ``job_execute``'s); None: 0."""

    def __post_init__(self) -> None:
        if self.event_type != "*" and self.event_type not in EVENT_TYPES:
            raise ValueError(f"event_type: must be one of {', '.join(EVENT_TYPES)} or '*'")
        if (self.script is None) == (self.script_file is None):
            raise ValueError("script: give exactly one of script (a stored name or hash) and script_file")
        _check_template(self.params, "params")
        if self.priority is not None and (
            isinstance(self.priority, bool) or not PRIORITY_MIN <= self.priority <= PRIORITY_MAX
        ):
            raise ValueError(
                f"priority: must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}, got {self.priority!r}"
            )
        if self.group is not None and not GROUP_PATTERN.match(self.group):
            raise ValueError(f"group: must name a worker group (letters, digits, '_', '.', '-'), got {self.group!r}")
        if self.concurrency not in CONCURRENCY:
            raise ValueError(f"concurrency: must be one of {', '.join(CONCURRENCY)}, got {self.concurrency!r}")
        if self.when is not None:
            try:
                _condition(self.when)
            except WhenError as e:
                rule = f"rule {self.name!r}" if self.name else "the rule"
                raise ValueError(f"when: {e} (in the condition of {rule})") from None


@functools.lru_cache(maxsize=256)
def _condition(text: str) -> Condition:
    return parse_condition(text)


def _check_template(value: Any, where: str) -> None:
    if isinstance(value, str):
        for match in _ANY_DOLLAR_WORD.finditer(value):
            if not _PLACEHOLDER.match(value, match.start()):
                raise ValueError(
                    f"{where}: unknown placeholder ${match[1]} (known: $position_beats, $tempo, "
                    "$event_type, $metadata.<key>; $$ for a literal $)"
                )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_template(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value, 1):
            _check_template(item, f"{where}[{i}]")


_MISSING: Final = object()


def _lookup(metadata: Any, dotted: str) -> Any:
    value = metadata
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def expand(template: Any, event: t.TimelineEvent, where: str = "params") -> Any:
    """``template`` with the event's values in place of its placeholders.

    Raises :class:`TriggerError` (``invalid_params``) for a ``$metadata`` key the event
    does not have.
    """
    if isinstance(template, dict):
        return {k: expand(v, event, f"{where}.{k}") for k, v in template.items()}
    if isinstance(template, list):
        return [expand(v, event, f"{where}[{i}]") for i, v in enumerate(template, 1)]
    if not isinstance(template, str):
        return template

    def value(match: re.Match[str]) -> Any:
        name = match[1]
        if name == "$":
            return "$"
        if name == "position_beats":
            return event.position_beats
        if name == "tempo":
            return event.tempo
        if name == "event_type":
            return event.event_type.value
        found = _lookup(event.metadata, match[2][1:])
        if found is _MISSING:
            raise TriggerError("invalid_params", f"{where}: the event's metadata has no {match[2][1:]!r}")
        return found

    whole = _PLACEHOLDER.fullmatch(template)
    if whole and whole[1] != "$":
        return value(whole)
    return _PLACEHOLDER.sub(lambda m: _text(value(m)), template)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


def matches(rule: TriggerRule, event: t.TimelineEvent) -> bool:
    """Whether ``event`` has the rule's type and every ``match`` field."""
    if rule.event_type not in ("*", event.event_type.value):
        return False
    for key, wanted in rule.match.items():
        found = _lookup(event.metadata, key)
        if found is _MISSING:
            return False
        if found != wanted and not (isinstance(wanted, list) and found in wanted):
            return False
    return rule.when is None or _condition(rule.when).holds(event)


def declared_emits(described: Any) -> list[str] | None:
    """``describe().emits`` of a script: the timeline event types it may make
    chaosgarden send (``"*"``: any); None when it declares none.  ``ValueError`` for a
    declaration that is not a list of event types."""
    value = manifest_list(described, "emits")
    if value is None:
        return None
    for item in value:
        if item != "*" and item not in EVENT_TYPES:
            raise ValueError(f"describe().emits: {item!r} is not an event type (known: {', '.join(EVENT_TYPES)}, *)")
    return list(dict.fromkeys(value))


def _strongly_connected(graph: Mapping[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (node -> successors), with
    an explicit stack (no recursion limit to hit with many rules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            successors = graph.get(node, [])
            if i < len(successors):
                work.append((node, i + 1))
                succ = successors[i]
                if succ not in index:
                    work.append((succ, 0))
                elif succ in on_stack:
                    low[node] = min(low[node], index[succ])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                components.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def find_cycle(graph: Mapping[str, list[str]], start_kind: str = "rule ") -> list[str] | None:
    """A cycle of ``graph`` as a node list that ends where it begins, starting at a
    node whose name begins with ``start_kind`` where one lies on it; None when the
    graph has none."""
    for component in _strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and component[0] not in graph.get(component[0], []):
            continue
        start = min((n for n in component if n.startswith(start_kind)), default=min(component))
        # breadth first inside the component: the shortest way back to start
        came_from: dict[str, str] = {}
        frontier = [start]
        while frontier:
            following = []
            for node in frontier:
                for succ in graph.get(node, []):
                    if succ not in members:
                        continue
                    if succ == start:
                        path = [start]
                        while node != start:
                            path.append(node)
                            node = came_from[node]
                        return [start, *reversed(path[1:]), start]
                    if succ not in came_from:
                        came_from[succ] = node
                        following.append(succ)
            frontier = following
    return None


def trigger_info(event: t.TimelineEvent, rule: str) -> dict[str, Any]:
    """What ``context.trigger()`` gives a job the event started: ``{event_type,
    position_beats, tempo, metadata, rule}``.  ``metadata`` is left out (nil in Lua)
    when Lua cannot hold it (nested too deep with the table around it, a MessagePack
    extension, a nil key, ...): the event still starts its job."""
    info = {
        "event_type": event.event_type.value,
        "position_beats": event.position_beats,
        "tempo": event.tempo,
        "metadata": event.metadata,
        "rule": rule,
    }
    try:
        params_mod.check_representable(info, root="trigger")
    except params_mod.InvalidParams as e:
        log.warning("trigger.metadata_dropped", rule=rule, reason=str(e))
        del info["metadata"]
    return info


class Triggers:
    """The rules of the config file and the jobs they have started.

    ``submit(script_hash, params, *, user, trigger)`` queues a job (``Jobs.submit``:
    ``user`` is who sent the event, ``trigger`` what ``context.trigger()`` gives the
    job's script, see :func:`trigger_info`); ``find_script(name)``
    gives the hash of the newest stored script called ``name`` (or None);
    ``store_file(text)`` stores a script and returns its hash; ``is_live(job_id)`` tells
    whether a job is queued or running.
    """

    def __init__(
        self,
        rules: list[TriggerRule],
        *,
        submit: Callable[..., Any],
        find_script: Callable[[str], str | None],
        is_live: Callable[[str], bool],
        base_dir: Path | None = None,
        cancel: Callable[[str], Any] | None = None,
    ) -> None:
        self.rules = [
            rule if rule.name else msgspec.structs.replace(rule, name=f"trigger{i}") for i, rule in enumerate(rules, 1)
        ]
        self._submit = submit
        self._find_script = find_script
        self._is_live = is_live
        self._cancel = cancel
        self._lock: anyio.Lock | None = None  # made in the event loop, on first use
        self._base_dir = base_dir or Path.cwd()
        self._file_hashes: dict[str, str] = {}
        # job id -> (rule name, trace id) of the jobs rules started
        self._started: dict[str, tuple[str, int]] = {}

    async def load_files(self, store_file: Callable[[str], Any]) -> None:
        """Store every ``script_file`` (at start-up; once); a missing file is an error."""
        for rule in self.rules:
            if rule.script_file is None or rule.name in self._file_hashes:
                continue
            path = (self._base_dir / rule.script_file).resolve()
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise TriggerError("not_found", f"trigger {rule.name!r}: cannot read {path}: {e}") from None
            self._file_hashes[rule.name] = await store_file(text)
            log.info("trigger.script_stored", rule=rule.name, path=str(path), hash=self._file_hashes[rule.name])

    def check_cycles(self, record: Callable[[str], Any]) -> None:
        """Refuse rules that could fire each other in a circle (after :meth:`load_files`).

        ``record(hash)`` gives a stored script's index entry (its ``emits`` and
        ``name``) or None.  The graph: each rule -> its script (a rule whose named
        script is not stored yet has none), each script -> the event types of its
        ``describe().emits`` (``"*"``: all), each event type -> the rules listening to
        it (``event_type = "*"``: all).  ``match``, ``when`` and rule order are not
        considered: a rule that could fire is taken to fire.  Raises
        :class:`TriggerError` (``trigger_cycle``) naming a cycle, e.g. ``rule a ->
        script x -> event cue_point -> rule a``."""
        graph: dict[str, list[str]] = {}
        labels: dict[str, str] = {}
        for rule in self.rules:
            node = f"rule {rule.name}"
            graph.setdefault(node, [])
            try:
                script_hash = self._script_hash(rule)
            except TriggerError:
                continue  # not stored yet: nothing known of it (the run-time guard stays)
            entry = record(script_hash)
            script_node = f"script {script_hash}"
            labels[script_node] = f"script {getattr(entry, 'name', None) or script_hash[:12]}"
            graph[node].append(script_node)
            emits = getattr(entry, "emits", None) or []
            graph[script_node] = [f"event {e}" for e in (EVENT_TYPES if "*" in emits else emits)]
        for event_type in EVENT_TYPES:
            graph[f"event {event_type}"] = [
                f"rule {rule.name}" for rule in self.rules if rule.event_type in ("*", event_type)
            ]
        cycle = find_cycle(graph)
        if cycle is not None:
            raise TriggerError(
                "trigger_cycle",
                f"trigger rules form a cycle: {' -> '.join(labels.get(n, n) for n in cycle)} (a script's "
                "describe().emits names the events it may cause; change the rules or the scripts so that no "
                "rule can start itself again)",
            )

    def _script_hash(self, rule: TriggerRule) -> str:
        if rule.script_file is not None:
            found = self._file_hashes.get(rule.name)
            if found is None:
                raise TriggerError("not_found", f"trigger {rule.name!r}: {rule.script_file} was not stored at start-up")
            return found
        assert rule.script is not None
        try:
            return parse_hash(rule.script)
        except InvalidHash:
            pass
        found = self._find_script(rule.script)
        if found is None:
            raise TriggerError("not_found", f"trigger {rule.name!r}: no stored script named {rule.script!r}")
        return found

    def _loop(self, rule: TriggerRule, event: t.TimelineEvent, trace_id: int) -> str | None:
        """The running job of ``rule`` that this event comes from, if any."""
        named = event.metadata.get(JOB_ID_KEY) if isinstance(event.metadata, Mapping) else None
        for job_id, (rule_name, job_trace) in list(self._started.items()):
            if not self._is_live(job_id):
                del self._started[job_id]
                continue
            if rule_name == rule.name and (job_id == named or (trace_id and job_trace == trace_id)):
                return job_id
        return None

    def running(self, rule_name: str) -> list[str]:
        """The queued or running jobs ``rule_name`` started, oldest first."""
        live = []
        for job_id, (name, _) in list(self._started.items()):
            if not self._is_live(job_id):
                del self._started[job_id]
            elif name == rule_name:
                live.append(job_id)
        return live

    async def handle(self, event: t.TimelineEvent, *, user: str | None = None) -> dict[str, Any]:
        """Start the job of the first rule matching ``event``; the reply's result.
        ``user``: who sent it (``context.user()`` of the job).

        Raises :class:`TriggerError` when the matched rule cannot start it.
        """
        rule = next((r for r in self.rules if matches(r, event)), None)
        if rule is None:
            log.info("trigger.unmatched", event_type=event.event_type.value, position_beats=event.position_beats)
            return {"job_id": None, "rule": None, "matched": False}
        trace_id = trace.get_current_span().get_span_context().trace_id
        looping = self._loop(rule, event, trace_id)
        if looping is not None:
            raise TriggerError(
                "invalid_state",
                f"trigger {rule.name!r} did not fire: this event comes from its own job {looping}, "
                "which is still running (a trigger cannot fire itself in a loop)",
            )
        script_hash = self._script_hash(rule)
        params = expand(rule.params, event)
        if rule.concurrency == "queue":
            return await self._start(rule, event, script_hash, params, user, trace_id)
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:  # look and start as one step: two events cannot both start one
            running = self.running(rule.name)
            if running and rule.concurrency == "single":
                log.info("trigger.ignored", rule=rule.name, running=running, event_type=event.event_type.value)
                return {"job_id": None, "rule": rule.name, "matched": True, "ignored": True, "running": running[0]}
            replaced = []
            for job_id in running:  # "replace"
                try:
                    if self._cancel is not None:
                        self._cancel(job_id)
                        replaced.append(job_id)
                except Exception as e:  # it finished meanwhile: nothing to replace
                    log.info("trigger.replace_skipped", rule=rule.name, job_id=job_id, reason=str(e))
                self._started.pop(job_id, None)
            reply = await self._start(rule, event, script_hash, params, user, trace_id)
            if rule.concurrency == "replace":
                reply["replaced"] = replaced
            return reply

    async def _start(
        self, rule: TriggerRule, event: t.TimelineEvent, script_hash: str, params: Any, user: str | None, trace_id: int
    ) -> dict[str, Any]:
        about: dict[str, Any] = {k: v for k, v in (("group", rule.group), ("priority", rule.priority)) if v is not None}
        info = await self._submit(script_hash, params, user=user, trigger=trigger_info(event, rule.name), **about)
        self._started[info.job_id] = (rule.name, trace_id)
        log.info("trigger.fired", rule=rule.name, job_id=info.job_id, script_hash=script_hash,
                 event_type=event.event_type.value)
        return {"job_id": info.job_id, "rule": rule.name, "script_hash": script_hash, "matched": True}
