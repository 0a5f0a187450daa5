"""The messages between the front and its worker processes, and their codec.

The front binds a ROUTER: ipc in a private directory for its own worker processes,
and the pool endpoint (seed 001's ``:5571``, tcp) that remote workers join
(``luanette worker --connect``); each worker connects a DEALER whose identity is its
name.  Every message is one frame of MessagePack: a tagged msgspec Struct.

Front -> worker: ``Run`` (start a script), ``Cancel``, ``Answer`` (the result of a
service call), ``Stop`` (finish what runs, then exit), ``Pulse`` (the front's
heartbeat), ``Unknown`` (the front does not know the sender: register again),
``Invalidate`` (scripts stored again or removed: drop their cached chunks).
Worker -> front: ``Register`` (seed 001's ``Register(WorkerRegistration)`` and what
the pool needs: how many runs it takes, its group), ``Done`` (a run ended), ``Call``
(a service only the front holds: a model backend, the garden), ``Note``
(fire-and-forget: a script's log line, progress, span events), ``Retiring`` (the
worker grew past its memory share and leaves once its runs are done), ``Beat``.

Credit, not a blind push: a worker says in ``Register`` how many runs it takes at once
and the front never has more than that outstanding on it; every ``Done`` returns one
credit.  Both sides beat every second (Paranoid Pirate): a remote worker the front has
not heard for 3 beats is lost (its runs end ``worker_lost``); a remote worker that has
not heard its front for 3 beats drops its runs and registers again on a new socket.

Runs are numbered by the front (``run``: unique per front process); a message about a
run the receiver no longer knows is dropped and counted, never an error.

Depth: every value a message carries is at most ``hooteproto.depth.MAX_DEPTH`` (128)
levels deep, checked where it is made, so a message is at most a few levels deeper and
both sides decode it: ``Run.params`` by the front before it sends (deeper params fail
the run with ``invalid_params``), results and call arguments by the Lua codec (deeper
tables are refused, naming the path), backend answers and garden replies by their
decoders.  A frame that does not decode anyway (even by ``RecursionError``) is logged
as a bad message and dropped.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from luanette.engine.api import ErrorDetail, Limits

FLUSH_AT: Final = 8
"""Messages one side queues for the other go as one multipart message at the end of
its loop's turn, or as soon as this many are queued: a turn may start dozens of runs
(or end them), and holding them all back left the other side idle while this one
finished its turn (measured: +10-15% LuaEvals at 64 in flight)."""


class Message(msgspec.Struct, tag_field="t", array_like=True, omit_defaults=True):
    """Base of the channel's messages."""


class RunInfo(msgspec.Struct, array_like=True, omit_defaults=True):
    """What a run's namespaces need to know about it."""

    kind: str  # "eval", "job", "describe": the registry decides the globals from it
    job_id: str | None = None
    script_hash: str | None = None
    traceparent: str | None = None  # of the run's span in the front
    sampled: bool = False  # whether that span is recorded (otel.* events are worth sending)
    # what the run is granted (luanette.capabilities); None: everything its kind offers
    capabilities: list[str] | None = None
    # for ``context.*`` (luanette.stdlib.context); appended last, so older messages decode
    user: str | None = None  # who asked for the run: the client's CURVE key, "local" without CURVE
    creator: str | None = None  # the stored script's creator (jobs)
    trigger: dict[str, Any] | None = None  # the timeline event that started the job, and its rule
    # describe()'s session fields (luanette.stdlib.session), appended last like the above
    execution_mode: str = "session"  # "session" (garden edits go to an overlay) or "autoCommit"
    review: bool = False  # keep the overlay as a pending session at the end of main
    on_error: str = "abort"  # "skip": a failing namespace call returns nil and is recorded
    # the tool:* events some plugin subscribes to (luanette.plugins): the run's async
    # namespace calls report them; empty (the usual case) costs nothing
    tool_hooks: list[str] = []
    # the worker group the run must go to (describe().group); None: any that can serve it
    group: str | None = None


class Run(Message, tag="run"):
    """Start a script."""

    run: int
    code: str
    params: Any
    chunk_name: str
    limits: Limits
    info: RunInfo


class Cancel(Message, tag="cancel"):
    """Stop a run (its cancel token is set; it answers ``Done`` with kind cancelled)."""

    run: int
    reason: str


class Answer(Message, tag="answer"):
    """The front's answer to a ``Call``: ``ok`` and the value, or the error."""

    call: int
    ok: bool
    value: Any = None
    error: dict[str, Any] | None = None  # {"type": ..., "message": ..., more by type}


class Stop(Message, tag="stop"):
    """Take no more runs, finish the ones running, then exit."""


class Register(Message, tag="register"):
    """A worker joins (or joins again): ready for ``capacity`` runs at once."""

    # seed 001's Payload::Register(WorkerRegistration) as hooteproto encodes it (the
    # wire vectors' compact MessagePack): worker id, type, name, capabilities, host,
    # version.  Capabilities are seed 003's (``model:*``, ``garden.write``); ``*``:
    # every one.
    registration: bytes
    pid: int
    capacity: int  # runs it takes at once: its credit
    group: str = "local"
    remote: bool = False


class Pulse(Message, tag="pulse"):
    """The front's heartbeat."""


class Unknown(Message, tag="unknown"):
    """The front does not know the sender (it restarted, or gave the worker up)."""


class Invalidate(Message, tag="invalidate"):
    """Scripts stored again or removed: compiled chunks of these texts' hashes go."""

    hashes: list[str]


class Done(Message, tag="done"):
    """A run ended: ``result`` or ``error``."""

    run: int
    result: Any = None
    error: ErrorDetail | None = None
    duration_ms: float = 0.0


class Call(Message, tag="call"):
    """A run needs a service the front holds (``backend.call``, ``garden.request``)."""

    call: int
    run: int
    service: str
    args: list[Any]


class Note(Message, tag="note"):
    """Fire-and-forget news of a run: ``log``, ``progress``, ``event``, ``attribute``,
    ``metric``."""

    run: int
    kind: str
    data: list[Any]


class Retiring(Message, tag="retiring"):
    """The worker takes no more runs (it grew past its memory share)."""

    rss_bytes: int


class Beat(Message, tag="beat"):
    """A worker's heartbeat, with its size."""

    rss_bytes: int
    runs: int
    inline_steps: int = 0  # first steps run on the worker's event loop, so far


ToWorker = Run | Cancel | Answer | Stop | Pulse | Unknown | Invalidate
ToFront = Register | Done | Call | Note | Retiring | Beat

encoder = msgspec.msgpack.Encoder()
to_worker = msgspec.msgpack.Decoder(ToWorker)
to_front = msgspec.msgpack.Decoder(ToFront)
