"""The chaosgarden shell protocol: the ``Message`` envelope and the ``ShellRequest`` /
``ShellReply`` contents, defined once as msgspec Structs.

These restate chaosgarden's ``ipc::messages`` as upstream hootenanny had them at commit
9971292, which is what ``tests/protocol-vectors/garden`` was generated from. The
conventions of :mod:`hooteproto.types` hold: field order is the compact (array) order,
``Option<T>`` fields default to ``None``, and both enums are internally tagged by
``"type"`` with snake_case variant names.

Two serde shapes need a word:

- ``Beat(f64)`` is a newtype struct, which serde writes as the bare number; here it is
  a plain ``float`` (:data:`Beat`).
- ``Behavior`` is an *externally* tagged enum (serde's default): ``{"latent": {...}}``,
  a one-key map in every encoding, compact MsgPack included (only the body becomes an
  array there). :class:`Behavior` is a struct with one optional field per variant,
  exactly one of them set, whose compact twin stays a map (``__compact_map__``).

Fields that are ``f32`` upstream are listed in :data:`FLOAT32_FIELDS`. MsgPack from Rust
carries them as float32; Python writes every float as float64, so those bytes differ,
although the values agree: such fields are rounded to the nearest float32 on
construction and on decoding, as Rust holds them.
"""

from __future__ import annotations

import datetime
import enum
import math
import struct
import uuid
from typing import Any

import msgspec

from hooteproto.codec import Codec
from hooteproto.types import Model, Variant

PROTOCOL_VERSION = "0.1.0"
SHELL_REQUEST = "shell_request"
SHELL_REPLY = "shell_reply"

Beat = float
"""Musical time in beats (upstream ``Beat(f64)``, which serde writes as a bare f64)."""


# --- enums ---------------------------------------------------------------------------


class ContentType(enum.Enum):
    """What kind of content an artifact holds."""

    AUDIO = "audio"
    MIDI = "midi"
    CONTROL = "control"


# --- envelope ------------------------------------------------------------------------


class MessageHeader(Model):
    """Present on every message. ``timestamp`` is RFC 3339 text, kept as a string so that
    it round-trips byte for byte (chrono writes 0, 3, 6 or 9 fraction digits)."""

    msg_id: uuid.UUID
    session: uuid.UUID
    msg_type: str
    version: str
    timestamp: str

    @classmethod
    def new(cls, session: uuid.UUID, msg_type: str) -> MessageHeader:
        """A fresh header: a new ``msg_id``, the protocol version, the time now."""
        return cls(uuid.uuid4(), session, msg_type, PROTOCOL_VERSION, rfc3339_now())


class Message(Model, kw_only=True):
    """The Jupyter-style envelope ``{header, parent_header, metadata, content}``.

    Upstream this is ``Message<T>``; a msgspec generic struct would not get a compact
    twin from :class:`~hooteproto.codec.Codec`, so each content type has its own
    subclass (:class:`ShellRequestMessage`, :class:`ShellReplyMessage`) adding
    ``content``. ``metadata`` is a string-keyed map of JSON values.
    """

    header: MessageHeader
    parent_header: MessageHeader | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


# --- nested structs ------------------------------------------------------------------


class PortRef(Model):
    """One port of an audio-graph node, for connections."""

    node_id: uuid.UUID
    port_name: str


class CurvePoint(Model):
    """One automation point: ``value`` at ``beat``."""

    beat: Beat
    value: float


class NodeDescriptor(Model):
    """An audio-graph node to add; ``config`` is any JSON value."""

    name: str
    node_type: str
    config: Any


class Participant(Model):
    """An agent or person taking part in a session, with what it may do (``approve``,
    ...)."""

    id: uuid.UUID
    name: str
    capabilities: list[str]


class ParticipantUpdate(Model):
    """Changes to a participant; ``None`` leaves a field as it is."""

    name: str | None = None
    capabilities: list[str] | None = None


class RegionSummary(Model):
    """A region as ``GetRegions`` reports it."""

    region_id: uuid.UUID
    position: Beat
    duration: Beat
    is_latent: bool
    artifact_id: str | None = None


class PendingApproval(Model):
    """A resolved latent region waiting for a decision. ``resolved_at`` is RFC 3339."""

    region_id: uuid.UUID
    artifact_id: str
    content_hash: str
    content_type: ContentType
    resolved_at: str


# --- region behaviors ----------------------------------------------------------------


class PlayContent(Model):
    """Play an artifact."""

    artifact_id: str


class Latent(Model):
    """Hold a place for content that a job is still generating."""

    job_id: str


class ApplyProcessing(Model):
    """Automate ``parameter`` (e.g. ``gain``) along ``curve``."""

    parameter: str
    curve: list[CurvePoint]


class EmitTrigger(Model):
    """Emit a trigger event of ``event_type`` when playback reaches the region."""

    event_type: str


BehaviorValue = PlayContent | Latent | ApplyProcessing | EmitTrigger


class Behavior(Model, omit_defaults=True, forbid_unknown_fields=True):
    """What a region does: exactly one of the fields is set.

    Upstream ``enum Behavior`` is externally tagged, ``{"latent": {"job_id": ...}}``;
    with every field but one left at ``None`` (and omitted), this struct has that shape.
    Build one with ``Behavior(latent=Latent("job_1"))`` or ``Behavior.of(Latent(...))``.
    """

    # Keeps the compact twin a map; see hooteproto.codec.compact_twin.
    __compact_map__ = True

    play_content: PlayContent | None = None
    latent: Latent | None = None
    apply_processing: ApplyProcessing | None = None
    emit_trigger: EmitTrigger | None = None

    def __post_init__(self) -> None:
        # serde accepts exactly one variant key; a ValueError here becomes a DecodeError.
        chosen = [n for n in self.__struct_fields__ if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"a Behavior needs exactly one of {', '.join(self.__struct_fields__)}; "
                f"got {len(chosen)}"
            )

    @classmethod
    def of(cls, value: BehaviorValue) -> Behavior:
        """Wrap a variant body (:class:`PlayContent`, :class:`Latent`, ...)."""
        if isinstance(value, PlayContent):
            return cls(play_content=value)
        if isinstance(value, Latent):
            return cls(latent=value)
        if isinstance(value, ApplyProcessing):
            return cls(apply_processing=value)
        if isinstance(value, EmitTrigger):
            return cls(emit_trigger=value)
        raise TypeError(f"not a Behavior variant: {type(value).__name__}")

    @property
    def kind(self) -> str:
        """The variant name, e.g. ``"latent"``."""
        return next(n for n in self.__struct_fields__ if getattr(self, n) is not None)

    @property
    def value(self) -> BehaviorValue:
        """The variant body."""
        return getattr(self, self.kind)


# --- ShellRequest variants -----------------------------------------------------------
# Regions


class CreateRegion(Variant, tag="create_region"):
    """Create a region of ``duration`` beats at ``position`` on the timeline; answered
    with :class:`RegionCreated`."""

    position: Beat
    duration: Beat
    behavior: Behavior


class DeleteRegion(Variant, tag="delete_region"):
    """Remove a region from the timeline."""

    region_id: uuid.UUID


class MoveRegion(Variant, tag="move_region"):
    """Move a region to start at ``new_position`` beats."""

    region_id: uuid.UUID
    new_position: Beat


# Latent lifecycle (the job generating a latent region's content reports in)


class UpdateLatentStarted(Variant, tag="update_latent_started"):
    """The job generating a latent region's content has started."""

    region_id: uuid.UUID
    job_id: str


class UpdateLatentProgress(Variant, tag="update_latent_progress"):
    """How far the job of a latent region has got, from 0.0 to 1.0.

    ``progress`` is an ``f32`` upstream (see :data:`FLOAT32_FIELDS`)."""

    region_id: uuid.UUID
    progress: float

    def __post_init__(self) -> None:
        self.progress = _f32(self.progress)


class UpdateLatentResolved(Variant, tag="update_latent_resolved"):
    """The job of a latent region finished: its artifact (``content_hash`` in the CAS)
    now waits for approval."""

    region_id: uuid.UUID
    artifact_id: str
    content_hash: str
    content_type: ContentType


class UpdateLatentFailed(Variant, tag="update_latent_failed"):
    """The job of a latent region failed with ``error``."""

    region_id: uuid.UUID
    error: str


# Approvals (human in the loop)


class ApproveLatent(Variant, tag="approve_latent"):
    """Approve a resolved latent region for playback; ``decided_by`` is the UUID of the
    agent or person deciding."""

    region_id: uuid.UUID
    decided_by: uuid.UUID


class RejectLatent(Variant, tag="reject_latent"):
    """Reject a resolved latent region, optionally saying why."""

    region_id: uuid.UUID
    decided_by: uuid.UUID
    reason: str | None = None


# Transport


class Play(Variant, tag="play"):
    """Start playback."""


class Pause(Variant, tag="pause"):
    """Pause playback, keeping the position."""


class Stop(Variant, tag="stop"):
    """Stop playback."""


class Seek(Variant, tag="seek"):
    """Move the playhead to ``beat``."""

    beat: Beat


class SetTempo(Variant, tag="set_tempo"):
    """Set the tempo in beats per minute."""

    bpm: float


# Audio graph


class AddNode(Variant, tag="add_node"):
    """Add a node to the audio graph; answered with :class:`NodeAdded`."""

    node: NodeDescriptor


class RemoveNode(Variant, tag="remove_node"):
    """Remove a node from the audio graph."""

    node_id: uuid.UUID


class Connect(Variant, tag="connect"):
    """Connect an output port to an input port."""

    source: PortRef
    dest: PortRef


class Disconnect(Variant, tag="disconnect"):
    """Remove the connection between two ports."""

    source: PortRef
    dest: PortRef


# Participants


class RegisterParticipant(Variant, tag="register_participant"):
    """Announce an agent or person taking part in the session."""

    participant: Participant


class UpdateParticipant(Variant, tag="update_participant"):
    """Change a participant's name or capabilities."""

    participant_id: uuid.UUID
    updates: ParticipantUpdate


# Queries


class GetTransportState(Variant, tag="get_transport_state"):
    """Ask whether the garden is playing, where, and at what tempo; answered with
    :class:`TransportState`."""


class GetRegions(Variant, tag="get_regions"):
    """List regions, all of them or those in ``range`` = (start, end) beats (start
    inclusive, end exclusive); answered with :class:`Regions`."""

    range: tuple[Beat, Beat] | None = None


class GetPendingApprovals(Variant, tag="get_pending_approvals"):
    """List resolved latent regions awaiting a decision; answered with
    :class:`PendingApprovals`."""


ShellRequest = (
    CreateRegion | DeleteRegion | MoveRegion
    | UpdateLatentStarted | UpdateLatentProgress | UpdateLatentResolved | UpdateLatentFailed
    | ApproveLatent | RejectLatent
    | Play | Pause | Stop | Seek | SetTempo
    | AddNode | RemoveNode | Connect | Disconnect
    | RegisterParticipant | UpdateParticipant
    | GetTransportState | GetRegions | GetPendingApprovals
)  # fmt: skip
"""Every request the garden's shell socket takes; the tag is ``"type"``."""


# --- ShellReply variants -------------------------------------------------------------


class Ok(Variant, tag="ok"):
    """Success; ``result`` is any JSON value (``#[serde(default)]``: may be absent)."""

    result: Any = None


class Error(Variant, tag="error"):
    """Failure, with an optional traceback."""

    error: str
    traceback: str | None = None


class RegionCreated(Variant, tag="region_created"):
    """The id of the region :class:`CreateRegion` made."""

    region_id: uuid.UUID


class NodeAdded(Variant, tag="node_added"):
    """The id of the node :class:`AddNode` made."""

    node_id: uuid.UUID


class TransportState(Variant, tag="transport_state"):
    """Whether the garden is playing, the playhead in beats, and the tempo in BPM."""

    playing: bool
    position: Beat
    tempo: float


class Regions(Variant, tag="regions"):
    """The regions :class:`GetRegions` asked for."""

    regions: list[RegionSummary]


class PendingApprovals(Variant, tag="pending_approvals"):
    """The resolved latent regions awaiting a decision."""

    approvals: list[PendingApproval]


ShellReply = (
    Ok | Error | RegionCreated | NodeAdded | TransportState | Regions | PendingApprovals
)  # fmt: skip
"""Every reply on the shell socket; the tag is ``"type"``."""


# --- messages ------------------------------------------------------------------------


class ShellRequestMessage(Message, kw_only=True):
    """``Message<ShellRequest>``: what a client sends to the shell socket."""

    content: ShellRequest

    @classmethod
    def new(cls, content: ShellRequest, *, session: uuid.UUID) -> ShellRequestMessage:
        """A request with a fresh ``shell_request`` header."""
        return cls(header=MessageHeader.new(session, SHELL_REQUEST), content=content)


class ShellReplyMessage(Message, kw_only=True):
    """``Message<ShellReply>``: the garden's answer, whose ``parent_header`` is the
    request's header."""

    content: ShellReply

    @classmethod
    def reply(cls, parent: MessageHeader, content: ShellReply) -> ShellReplyMessage:
        """A reply to the request with header ``parent``, in the same session."""
        return cls(
            header=MessageHeader.new(parent.session, SHELL_REPLY),
            parent_header=parent,
            content=content,
        )


FLOAT32_FIELDS: frozenset[tuple[type[msgspec.Struct], str]] = frozenset(
    {(UpdateLatentProgress, "progress")}
)
"""(class, field) of every ``f32`` field: Rust writes these as MsgPack float32, Python
as float64. The only fields whose re-encoded MsgPack bytes differ from Rust's."""


# --- codecs --------------------------------------------------------------------------

shell_request_codec: Codec[ShellRequestMessage] = Codec(ShellRequestMessage)
shell_reply_codec: Codec[ShellReplyMessage] = Codec(ShellReplyMessage)
shell_request_content_codec: Codec[ShellRequest] = Codec(ShellRequest)
shell_reply_content_codec: Codec[ShellReply] = Codec(ShellReply)


# --- helpers -------------------------------------------------------------------------


def _f32(x: float) -> float:
    """``x`` as Rust's ``f32`` holds it: rounded to the nearest float32 (overflowing to
    infinity, as ``as f32`` does), then written with the fewest digits that give back
    that float32 -- what serde_json prints for it, so JSON text matches Rust's."""
    if not math.isfinite(x):
        return x
    single = _round_f32(x)
    if math.isinf(single):
        return single
    for digits in range(1, 10):  # 9 significant digits always identify a float32
        shortest = float(f"{single:.{digits}g}")
        if _round_f32(shortest) == single:
            return shortest
    return single


def _round_f32(x: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # beyond the largest float32
        return math.copysign(math.inf, x)


def rfc3339_now() -> str:
    """The current UTC time as chrono serializes a ``DateTime<Utc>``: a fraction of 0,
    3 or 6 digits (the fewest that are exact) and a ``Z``."""
    now = datetime.datetime.now(datetime.UTC)
    text = now.strftime("%Y-%m-%dT%H:%M:%S")
    if now.microsecond % 1000:
        text += f".{now.microsecond:06d}"
    elif now.microsecond:
        text += f".{now.microsecond // 1000:03d}"
    return text + "Z"
