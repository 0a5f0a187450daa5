"""The hooteproto message types, defined once as msgspec Structs.

These restate the Rust definitions of seed 001 ("Message Types"). Field order matters:
the compact MsgPack encoding writes structs as arrays in declaration order, exactly as
``rmp_serde::to_vec`` does. ``Option<T>`` fields default to ``None`` so that named
MsgPack and JSON peers may omit them, as serde allows.

Tagged unions use ``"type"`` as the tag and snake_case variant names
(``#[serde(tag = "type", rename_all = "snake_case")]``).
"""

from __future__ import annotations

import enum
import uuid
from typing import Annotated, Any

import msgspec

U64 = Annotated[int, msgspec.Meta(ge=0)]
U8 = Annotated[int, msgspec.Meta(ge=0, le=255)]


class Model(msgspec.Struct):
    """Base of every hooteproto struct. Classes with an optional field before a required
    one are ``kw_only`` (which keeps declaration order, unlike dataclasses)."""


class Variant(Model, tag_field="type"):
    """Base of every tagged-union member; subclasses set ``tag=``."""


# --- enums ---------------------------------------------------------------------------


class WorkerType(enum.Enum):
    LUANETTE = "luanette"
    CHAOSGARDEN = "chaosgarden"


class PollMode(enum.Enum):
    ANY = "any"
    ALL = "all"


class TimelineEventType(enum.Enum):
    SECTION_CHANGE = "section_change"
    BEAT_MARKER = "beat_marker"
    CUE_POINT = "cue_point"
    GENERATE_TRANSITION = "generate_transition"


class JobStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


# --- plain structs -------------------------------------------------------------------


class WorkerRegistration(Model):
    """A worker announcing itself (``Payload::Register`` carries these fields inline)."""

    worker_id: uuid.UUID
    worker_type: WorkerType
    worker_name: str
    capabilities: list[str]
    hostname: str
    version: str


class ToolInfo(Model):
    """One request type a worker serves, with a JSON Schema of its parameters."""

    name: str
    description: str
    input_schema: Any


class JobInfo(Model, kw_only=True):
    """A job as ``JobStatus``/``JobList``/``JobPoll`` report it. Times are Unix seconds."""

    job_id: str
    status: JobStatus
    source: str
    result: Any = None
    error: Any = None
    created_at: U64
    started_at: U64 | None = None
    completed_at: U64 | None = None
    progress: Any = None
    """Luanette's extension: ``{percent, message, script_percent}``, the job's progress
    (server milestones and the script's own reports; kept after it ends)."""
    tags: list[str] | msgspec.UnsetType = msgspec.UNSET
    """Luanette's extension: the job's tags (``job_execute``'s, then the script's
    ``describe().tags``); absent when there are none, so seed 001 peers see no change."""


class JobStoreStats(Model):
    """Counts of jobs by state."""

    total: U64 = 0
    pending: U64 = 0
    running: U64 = 0
    completed: U64 = 0
    failed: U64 = 0
    cancelled: U64 = 0


class ReadyPayload(Model):
    """Body of a HOOT01 ``Ready`` frame."""

    protocol: str
    tools: list[str]
    accepts_binary: bool


# --- Payload variants ----------------------------------------------------------------
# Worker management


class Register(WorkerRegistration, Variant, tag="register"):
    """``Register(WorkerRegistration)``: a newtype variant, its fields follow the tag."""


class Ping(Variant, tag="ping"):
    pass


class Pong(Variant, tag="pong"):
    worker_id: uuid.UUID
    uptime_secs: U64


class Shutdown(Variant, tag="shutdown"):
    reason: str


# Lua tools


class LuaEval(Variant, tag="lua_eval"):
    """Run a Lua chunk once and return its result."""

    code: str
    params: Any = None


class LuaDescribe(Variant, tag="lua_describe"):
    script_hash: str


class ScriptStore(Variant, tag="script_store"):
    content: str
    tags: list[str] | None = None
    creator: str | None = None


class ScriptSearch(Variant, tag="script_search"):
    tag: str | None = None
    creator: str | None = None
    vibe: str | None = None


# Job system


class JobExecute(Variant, tag="job_execute"):
    """Start a stored script as a job.

    ``priority`` is Luanette's extension (docs/protocol.md): an integer from -10 to
    10, higher served first; absent (or null) is normal, 0. Unset, it is left out of
    every encoding (the compact array is the seed's three elements), so seed 001 peers
    see no change."""

    __compact_trailing__ = ("priority",)

    script_hash: str
    params: Any
    tags: list[str] | None = None
    priority: int | None | msgspec.UnsetType = msgspec.UNSET


PRIORITY_MIN = -10
PRIORITY_MAX = 10
"""The range of ``JobExecute.priority`` (Luanette's extension); 0 is normal."""


class JobStatusRequest(Variant, tag="job_status"):
    job_id: str


class JobPoll(Variant, tag="job_poll"):
    job_ids: list[str]
    timeout_ms: U64
    mode: PollMode


class JobCancel(Variant, tag="job_cancel"):
    job_id: str


class JobList(Variant, tag="job_list"):
    status: str | None = None


# Resources, prompts, completions


class ReadResource(Variant, tag="read_resource"):
    uri: str


class ListResources(Variant, tag="list_resources"):
    pass


class GetPrompt(Variant, tag="get_prompt"):
    name: str
    arguments: dict[str, str]


class ListPrompts(Variant, tag="list_prompts"):
    pass


class Complete(Variant, tag="complete"):
    context: str
    partial: str


# Chaosgarden events


class TimelineEvent(Variant, tag="timeline_event"):
    event_type: TimelineEventType
    position_beats: float
    tempo: float
    metadata: Any


# CAS tools


class CasStore(Variant, tag="cas_store"):
    """``data`` is ``Vec<u8>``: serde writes it as a sequence of integers, not bin."""

    data: list[U8]
    mime_type: str | None = None


class CasInspect(Variant, tag="cas_inspect"):
    hash: str


class CasGet(Variant, tag="cas_get"):
    hash: str


# Artifact tools


class ArtifactGet(Variant, tag="artifact_get"):
    id: str


class ArtifactList(Variant, tag="artifact_list"):
    tag: str | None = None
    creator: str | None = None


class ArtifactCreate(Variant, tag="artifact_create", kw_only=True):
    cas_hash: str
    tags: list[str]
    creator: str | None = None
    metadata: Any


# Graph tools


class GraphQuery(Variant, tag="graph_query"):
    query: str
    variables: Any


class GraphBind(Variant, tag="graph_bind"):
    identity: str
    hints: list[str]


# Transport tools


class TransportPlay(Variant, tag="transport_play"):
    pass


class TransportStop(Variant, tag="transport_stop"):
    pass


class TransportSeek(Variant, tag="transport_seek"):
    position_beats: float


class TransportStatus(Variant, tag="transport_status"):
    pass


# Timeline tools


class TimelineQuery(Variant, tag="timeline_query"):
    from_beats: float | None = None
    to_beats: float | None = None


class TimelineAddMarker(Variant, tag="timeline_add_marker"):
    position_beats: float
    marker_type: str
    metadata: Any


# Tool discovery


class ListTools(Variant, tag="list_tools"):
    pass


class ToolList(Variant, tag="tool_list"):
    tools: list[ToolInfo]


# Sessions: Luanette's additions (not in seed 001; docs/protocol.md#sessions)


class SessionList(Variant, tag="session_list"):
    """List the garden sessions pending review (all, or those of one job)."""

    job_id: str | None = None


class SessionShow(Variant, tag="session_show"):
    """Show one pending session with its operations."""

    session_id: str


class SessionCommit(Variant, tag="session_commit"):
    """Apply a pending session to the garden, all or nothing."""

    session_id: str


class SessionDiscard(Variant, tag="session_discard"):
    """Drop a pending session; nothing reaches the garden."""

    session_id: str


# Plugins: Luanette's additions (docs/plugins.md, docs/protocol.md#plugins)


class PluginList(Variant, tag="plugin_list"):
    """List the plugins the daemon knows: loaded ones with their subscriptions, and
    the ones that failed to load with their error."""


class PluginLoad(Variant, tag="plugin_load"):
    """Load a plugin: a stored script tagged ``plugin`` (its hash), or a file of the
    daemon's plugins directory (its name without ``.lua``)."""

    plugin: str


class PluginUnload(Variant, tag="plugin_unload"):
    """Unload a plugin by name; its ``cleanup(ctx)`` runs first."""

    name: str


class PluginReload(Variant, tag="plugin_reload"):
    """Unload a plugin and load it again from where it came from."""

    name: str


# Flows: Luanette's additions (docs/plugins.md#flows, docs/protocol.md#flows)


class FlowRegister(Variant, tag="flow_register"):
    """Register the flow a module's ``define()`` returns: a stored script (its hash) or
    a loaded plugin (its name)."""

    source: str


class FlowStart(Variant, tag="flow_start"):
    """Start an instance of a registered flow in its initial state."""

    definition: str
    context: Any = None
    subject: str = ""
    user: str | None = None


class FlowSend(Variant, tag="flow_send"):
    """Send an action to a flow instance; the answer is a TransitionResult."""

    instance: str
    action: str
    data: Any = None
    user: str | None = None


class FlowGet(Variant, tag="flow_get"):
    """One flow instance with its history."""

    instance: str


class FlowList(Variant, tag="flow_list"):
    """Flow instances by subject, state and definition; or, with ``definitions``, the
    registered definitions."""

    subject: str | None = None
    state: str | None = None
    definition: str | None = None
    limit: int = 100
    definitions: bool = False


LUANETTE_REQUESTS = (
    SessionList, SessionShow, SessionCommit, SessionDiscard, PluginList, PluginLoad, PluginUnload, PluginReload,
    FlowRegister, FlowStart, FlowSend, FlowGet, FlowList,
)  # fmt: skip
"""Payload variants Luanette adds to seed 001's (they have no golden vectors)."""


# Responses


class Success(Variant, tag="success"):
    result: Any


class Error(Variant, tag="error"):
    code: str
    message: str
    details: Any = None


Payload = (
    Register | Ping | Pong | Shutdown
    | LuaEval | LuaDescribe | ScriptStore | ScriptSearch
    | JobExecute | JobStatusRequest | JobPoll | JobCancel | JobList
    | ReadResource | ListResources | GetPrompt | ListPrompts | Complete
    | TimelineEvent
    | CasStore | CasInspect | CasGet
    | ArtifactGet | ArtifactList | ArtifactCreate
    | GraphQuery | GraphBind
    | TransportPlay | TransportStop | TransportSeek | TransportStatus
    | TimelineQuery | TimelineAddMarker
    | ListTools | ToolList
    | Success | Error
    | SessionList | SessionShow | SessionCommit | SessionDiscard
    | PluginList | PluginLoad | PluginUnload | PluginReload
    | FlowRegister | FlowStart | FlowSend | FlowGet | FlowList
)  # fmt: skip
"""Every message a peer may send; the tag is ``"type"``."""


class Envelope(Model, kw_only=True):
    """The legacy single-frame message: a Payload with a request id and traceparent."""

    id: uuid.UUID
    traceparent: str | None = None
    payload: Payload


# --- Broadcasts (PUB socket) ---------------------------------------------------------


class ConfigUpdate(Variant, tag="config_update"):
    key: str
    value: Any


class ShutdownNotice(Variant, tag="shutdown", omit_defaults=True):
    """``Broadcast::Shutdown``: the daemon is going away.

    ``phase`` and ``deadline`` are Luanette's extensions, absent when unset so the
    seed's form is unchanged: ``"draining"`` at the start of a drain with ``deadline``
    (Unix seconds: running jobs are cancelled then), ``"stopped"`` when it is done.
    The compact form (an array, positional) carries only the seed's ``reason``."""

    __compact_fields__ = ("reason",)

    reason: str
    phase: str | None = None
    deadline: float | None = None


class ScriptInvalidate(Variant, tag="script_invalidate"):
    hash: str


# Luanette's additions (not in seed 001; documented in docs/protocol.md).


class JobStateChanged(Variant, tag="job_state_changed"):
    """A job moved to ``state`` (a JobStatus value); ``result`` is set when it completed
    and the error detail when it failed."""

    job_id: str
    state: str
    result: Any = None


class Progress(Variant, tag="progress"):
    """A running job reported progress: ``percent`` 0..100 is the job's (the script's
    own ``script_percent`` scaled into 10..90, docs/jobs.md)."""

    job_id: str
    percent: float
    message: str | None = None
    script_percent: float | None = None


class LogLine(Variant, tag="log"):
    """A log line worth showing to watchers (e.g. a script's ``log.warn``)."""

    level: str
    message: str
    source: str


class SessionChanged(Variant, tag="session_changed"):
    """A garden session was kept for review (``pending``), ``committed`` or
    ``discarded``; ``operations`` is how many it holds."""

    session_id: str
    job_id: str | None
    state: str
    operations: int


class GenerationChunk(Variant, tag="generation_chunk"):
    """A piece of a streamed LLM answer of a generation pipeline step (docs/plugins.md,
    "Pipelines"): chunks of one step come in ``index`` order, the last with
    ``is_final`` (its ``content`` may be empty)."""

    job_id: str | None
    pipeline_id: str | None
    step_id: str
    index: int
    content: str
    is_final: bool


class CustomEvent(Variant, tag="custom_event"):
    """A plugin's ``ctx:emit`` or a script's ``hooks.emit`` (docs/plugins.md): ``name``
    starts with ``custom:``; ``subject`` is who emitted it (a plugin's name,
    ``job:<id>`` or ``eval``)."""

    name: str
    subject: str
    payload: Any


class FlowTransition(Variant, tag="flow_transition"):
    """A flow instance moved from ``from_state`` to ``to_state`` by ``action``
    (docs/plugins.md#flows); a start has ``from_state`` null and action ``start``.
    ``timestamp`` is Unix milliseconds."""

    instance_id: str
    definition_id: str
    subject: str
    from_state: str | None
    to_state: str
    action: str
    user: str
    timestamp: int


Broadcast = (
    ConfigUpdate
    | ShutdownNotice
    | ScriptInvalidate
    | JobStateChanged
    | Progress
    | LogLine
    | SessionChanged
    | GenerationChunk
    | CustomEvent
    | FlowTransition
)
"""Messages published on the PUB socket, one JSON frame each with ``"type"`` first."""


def tag_of(cls: type[Variant]) -> str:
    """The wire tag (``"type"`` value) of a tagged-union member class."""
    return cls.__struct_config__.tag  # type: ignore[return-value]


def variants(union: Any) -> tuple[type[Variant], ...]:
    """The member classes of a tagged union such as :data:`Payload`."""
    return union.__args__
