"""Background jobs: run a stored script by hash, track it, cancel it, wait for it.

A job is pending in a bounded queue (higher ``priority`` first, FIFO within one: see
luanette.jobqueue), then running on one of ``max_jobs`` workers, then complete, failed
or cancelled. Every state change is written to the store first (so a
restart loses nothing that finished) and then published as ``job_state_changed``.

Cancel is real: a pending job is finished as cancelled at once and leaves the queue (a
worker that picks one up anyway sees it is no longer pending and skips it), a running job's cancel token
stops its script at the next hook, and the store refuses to overwrite a finished job,
so a late result can never relabel a cancelled one (the Rust version's bug).
"""

from __future__ import annotations

import builtins
import functools
import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from opentelemetry import context as otel_context

from hooteproto.types import (
    PRIORITY_MAX,
    PRIORITY_MIN,
    JobInfo,
    JobStateChanged,
    JobStatus,
    JobStoreStats,
    PollMode,
    Progress,
)
from luanette import params as params_mod
from luanette.broadcast import Publisher
from luanette.capabilities import CapabilityError, Grants, Policy
from luanette.cas import CasError, NotFound
from luanette.engine.api import CancelToken, Limits, Outcome, ScriptError
from luanette.engine.channel import RunInfo
from luanette.engine.pool import Engine, RunHooks
from luanette.errors import RequestError
from luanette.faults import STORAGE_FULL, StorageFault
from luanette.groupcommit import GroupCommit
from luanette.jobqueue import JobQueue, QueueFull
from luanette.plugins import Plugins
from luanette.scripts import ManifestError, ScriptProblem, Scripts
from luanette.stdlib.hooks import bounded
from luanette.stdlib.temp import TempNamespace
from luanette.store import FINISHED, ScriptRecord, Store
from luanette.telemetry import (
    StatusCode,
    Telemetry,
    observe_queue,
    script_attributes,
    span_ids,
    traceparent_of,
)

log = structlog.get_logger("luanette.jobs")

POLL_CAP_S = 30.0
CAS_TEMP_MAX_AGE_S = 3600.0
"""CAS temp files older than this are a crashed writer's leftovers (see Cas.clean_temp)."""
REWRITE_FIRST_S = 0.25
REWRITE_MAX_S = 5.0
"""How soon, and at most how long apart, a job's final state that could not be written
(a full disk, a locked database) is tried again."""
PROGRESS_STARTED = 10.0
PROGRESS_SCRIPT_END = 90.0
"""Server-side milestones of ``progress.percent`` (0-100): queued 0, started 10, the
script's own 0-100 scaled into 10-90, complete 100 (docs/jobs.md)."""
MAX_WARNED_PARAMS = 20
"""Undeclared param names listed in a job's warning."""


class JobError(RequestError):
    """A job request that cannot be honoured."""


def check_priority(priority: Any) -> int:
    """A job's queue priority: ``priority`` itself (an integer from PRIORITY_MIN to
    PRIORITY_MAX), 0 for None; JobError ``invalid_params`` naming the field otherwise."""
    if priority is None:
        return 0
    if isinstance(priority, int) and not isinstance(priority, bool) and PRIORITY_MIN <= priority <= PRIORITY_MAX:
        return priority
    raise JobError(
        "invalid_params",
        f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX} (0 is normal); got {priority!r}",
        {"field": "priority", "value": priority, "min": PRIORITY_MIN, "max": PRIORITY_MAX},
    )


class Submitted(msgspec.Struct):
    """A queued job and what its caller should know: ``warnings`` such as
    ``{code: "unknown_params", params, message}``."""

    info: JobInfo
    warnings: list[dict[str, Any]] = []


def _progress(percent: float, message: str | None = None, script_percent: float | None = None) -> dict[str, Any]:
    return {"percent": percent, "message": message, "script_percent": script_percent}


class PollResult(msgspec.Struct):
    completed: list[JobInfo]
    pending: list[str]
    timed_out: bool


class _Live:
    """A job this process has queued or is running."""

    __slots__ = (
        "job_id", "script_hash", "params", "cancel", "progress", "trace_context", "capabilities",
        "user", "creator", "trigger", "shutdown_timeout", "session", "group", "retry", "priority",
    )  # fmt: skip

    def __init__(self, job_id: str, script_hash: str, params: Any, capabilities: list[str] | None = None) -> None:
        self.job_id = job_id
        self.script_hash = script_hash
        self.params = params
        self.capabilities = capabilities  # what the run is granted
        self.cancel = CancelToken()
        self.progress: dict[str, Any] = _progress(0.0)  # queued
        # the context of the request that queued the job: its span is the job's parent
        self.trace_context = otel_context.get_current()
        # for context.* (see Jobs.submit)
        self.user: str | None = None
        self.creator: str | None = None
        self.trigger: dict[str, Any] | None = None
        self.shutdown_timeout: float | None = None  # describe().shutdown_timeout
        # describe()'s execution_mode, review, on_error (None: the defaults)
        self.session: tuple[str | None, bool | None, str | None] = (None, None, None)
        self.group: str | None = None  # the worker group it must run on (describe() or its trigger)
        self.retry: str | None = None  # describe().retry: "on_worker_loss" re-queues it once
        self.priority = 0  # its place in the queue (luanette.jobqueue)


_job_counter = itertools.count(1)
_PID = f"{os.getpid():x}"  # the front never forks (workers come from the launcher)


def _new_job_id() -> str:
    # Sortable, unique across restarts (time) and within one (counter, pid).
    return f"job_{int(time.time() * 1000):x}_{_PID}_{next(_job_counter):x}"


class Jobs:
    """The job system. Call :meth:`run` in a task group; use the other methods from
    request handlers on the same event loop."""

    def __init__(
        self,
        *,
        store: Store,
        scripts: Scripts,
        publisher: Publisher,
        limits: Limits,
        engine: Engine,
        max_jobs: int,
        queue_size: int,
        temp_root: Path,
        telemetry: Telemetry | None = None,
        pub_results: int = 64 * 2**10,
        policy: Policy | None = None,
    ) -> None:
        self._telemetry = telemetry or Telemetry()
        self._engine = engine
        self._temp_root = temp_root
        self.store = store
        self.scripts = scripts
        self.max_jobs = max_jobs
        self._publisher = publisher
        self._limits = limits
        self._live: dict[str, _Live] = {}
        # pending jobs, higher priority first (luanette.jobqueue); a job handed to an
        # idle worker is never counted as queued
        self._queue: JobQueue[_Live] = JobQueue(queue_size)
        self._parked = 0  # queued jobs waiting apart for a worker that can serve them (see _park)
        self._tg: Any = None
        # its gauges (luanette.jobs.queue_depth, .oldest_pending_age), read at each collection
        observe_queue(self._telemetry, self.queue_stats)
        self._queue_size = queue_size
        self._reserved = 0  # submissions waiting for their row's commit
        self._pub_results = pub_results
        self._policy = policy or Policy()
        self._commits = GroupCommit(store)
        self._changed = anyio.Event()
        self._pollers = 0  # polls waiting on _changed
        # jobs that ended but whose final state the store refused (full disk, locked):
        # (status, result, error) to write once it takes writes again; live until then
        self._unwritten: dict[str, tuple[JobStatus, Any, Any]] = {}
        self._deferred = anyio.Event()
        self.finals_deferred = 0  # final states the store refused at first (a statistic)
        self.plugins: Plugins | None = None  # hooks on jobs (luanette.plugins), set by the server

    # --- lifecycle -------------------------------------------------------------------

    def recover(self, lost_front: str | None = None) -> list[str]:
        """At start-up: jobs a previous process left pending or running are failed as
        ``interrupted`` (as ``worker_lost`` when ``lost_front`` names the front, sharing
        a PostgreSQL store, that held them and was lost: luanette.lease); the job temp
        directories and the CAS temp files (older than an hour: another process may
        share the CAS) a crash left behind are removed."""
        TempNamespace.clean_root(self._temp_root, older_than_s=0)  # left by a crash
        self._clean_cas_temp()
        try:
            ids = self.store.recover_interrupted(time.time(), lost_front=lost_front)
        except StorageFault as fault:  # start anyway: reads work, the next start retries
            log.error("jobs.recover_failed", code=fault.code, error=str(fault))
            return []
        if ids and lost_front is not None:
            log.warning("jobs.worker_lost", count=len(ids), job_ids=ids[:20], lost_front=lost_front)
        elif ids:
            log.warning("jobs.interrupted", count=len(ids), job_ids=ids[:20])
        return ids

    def _clean_cas_temp(self) -> None:
        cas = self.scripts.cas
        if cas.read_only:
            return
        try:
            removed = cas.clean_temp(CAS_TEMP_MAX_AGE_S)
        except (CasError, StorageFault, OSError) as e:  # never a reason not to start
            log.warning("cas.temp_clean_failed", cas=str(cas.root), error=str(e))
            return
        if removed:
            log.info("cas.temp_cleaned", cas=str(cas.root), removed=removed)

    async def run(self) -> None:
        """Run the workers until cancelled; a cancelled run cancels running scripts."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for _ in range(self.max_jobs):
                    tg.start_soon(self._worker)
                tg.start_soon(self._rewrite_finals)
        finally:
            for live in list(self._live.values()):
                live.cancel.cancel("the daemon is shutting down")

    def prune(self, max_age_s: float | None, max_count: int | None) -> int:
        """Delete old finished jobs (see Store.prune); a store that refuses (a full disk,
        a locked database) is logged and tried again next time, never raised."""
        try:
            return self.store.prune(max_age_s, max_count, time.time())
        except StorageFault as fault:
            log.warning("jobs.prune_failed", code=fault.code, error=str(fault))
            return 0

    def is_live(self, job_id: str) -> bool:
        """Whether ``job_id`` is queued or running in this process."""
        return job_id in self._live

    @property
    def active(self) -> int:
        """Jobs queued or running in this process."""
        return len(self._live)

    def cancel_all(self, reason: str) -> None:
        """Cancel every queued and running job (shutdown past its drain deadline)."""
        for live in list(self._live.values()):
            self._cancel_live(live, reason)

    # --- requests --------------------------------------------------------------------

    async def submit(
        self,
        script_hash: str,
        params: Any,
        tags: list[str] | None,
        *,
        user: str | None = None,
        trigger: dict[str, Any] | None = None,
        group: str | None = None,
        priority: int | None = None,
    ) -> JobInfo:
        """Queue a job for a stored script; returns its pending JobInfo at once.

        ``priority`` (-10..10, None: normal, 0) orders the queue: higher first, FIFO
        within one priority; it never interrupts a running job.

        ``user`` (who asked: the client's CURVE key, or "local") and ``trigger`` (the
        timeline event that started it, see luanette.triggers) are what the script's
        ``context.user()`` and ``context.trigger()`` give; ``context.creator()`` is the
        stored script's creator.

        Raises :class:`JobError` ``not_found`` (no such script), ``invalid_params``
        (params a script cannot be given, naming the place, or params that do not fit
        its describe(), with ``details.problems``), ``lua_error`` (a script in the CAS
        that script_store would refuse) or ``busy`` (the queue is full); and
        ``invalid_params`` with ``details.field = "priority"`` for a priority out of range.
        """
        return (
            await self.submit_checked(
                script_hash, params, tags, user=user, trigger=trigger, group=group, priority=priority
            )
        ).info

    async def submit_checked(
        self,
        script_hash: str,
        params: Any,
        tags: list[str] | None,
        *,
        user: str | None = None,
        trigger: dict[str, Any] | None = None,
        group: str | None = None,
        priority: int | None = None,
    ) -> Submitted:
        """:meth:`submit`, with the warnings for its caller (params the script does not
        declare, accepted)."""
        priority = check_priority(priority)
        try:
            params_mod.check_representable(params, json_keys=True)
        except params_mod.InvalidParams as e:
            raise JobError("invalid_params", str(e), e.details()) from None
        record, new = await self._resolve(script_hash)
        try:
            checked = params_mod.validate(
                record.params_schema, params, additional=record.additional_params is not False
            )
        except params_mod.InvalidParams as e:
            raise JobError(
                "invalid_params", f"params do not fit {record.name or script_hash}: {e}", e.details()
            ) from None
        params = checked.params
        grants = self._grants(record, script_hash)  # before the job exists: a refusal costs nothing
        if self.plugins is not None and self.plugins.wants("job:before_execute"):
            params = await self._before_execute(record, script_hash, params, user)
        # The queue itself is the limit (live jobs also count the ones running, and a
        # worker between two jobs would let one more in than the queue can hold).
        if len(self._queue) + self._reserved >= self._queue_size:
            raise JobError(
                "busy", f"{self.max_jobs} jobs are running and {self._queue_size} are queued; try again shortly"
            )
        if new:
            record = self.scripts.adopt(record)
        tags = list(dict.fromkeys([*(tags or []), *(record.declared_tags or [])])) or tags
        job_id = _new_job_id()
        write = self.store.create_job_op(job_id, script_hash, params, tags, time.time())
        self._reserved += 1
        try:
            info = await self._commits.write(write)  # the reply waits for the commit
        finally:
            self._reserved -= 1
        live = _Live(job_id, script_hash, params, grants.texts())
        live.user, live.trigger = user, trigger
        live.creator = record.creator
        live.shutdown_timeout = record.shutdown_timeout
        live.session = (record.execution_mode, record.review, record.on_error)
        live.group = group if group is not None else record.group
        live.retry = record.retry
        self._live[job_id] = live
        live.priority = priority
        self._queue.put(live, priority)  # (room was checked above and reserved since)
        self._announce(job_id, JobStatus.PENDING)
        warnings = []
        if checked.unknown:
            names = checked.unknown[:MAX_WARNED_PARAMS]
            more = len(checked.unknown) - len(names)
            listed = ", ".join(names) + (f" and {more} more" if more else "")
            message = (
                f"params the script does not declare were accepted: {listed} "
                "(describe().additional_params = false refuses them)"
            )
            warnings.append({"code": "unknown_params", "params": names, "message": message})
            log.warning("job.unknown_params", job_id=job_id, script_hash=script_hash, params=names)
        return Submitted(info, warnings)

    async def _before_execute(self, record: ScriptRecord, script_hash: str, params: Any, user: str | None) -> Any:
        """The ``job:before_execute`` handlers' verdict: the params to run with (checked
        again when a handler changed them); JobError ``cancelled_by_hook`` for a veto."""
        assert self.plugins is not None
        about = {"script_hash": script_hash, "script": record.name, "user": user}
        outcome = await self.plugins.before("job:before_execute", record.name or script_hash, params, about)
        if outcome.cancelled:
            raise JobError(
                "cancelled_by_hook",
                f"plugin {outcome.plugin} cancelled the job: {outcome.reason}",
                {"plugin": outcome.plugin, "reason": outcome.reason},
            )
        if not outcome.modified:
            return params
        try:
            params_mod.check_representable(outcome.payload, json_keys=True)
            return params_mod.validate(
                record.params_schema, outcome.payload, additional=record.additional_params is not False
            ).params
        except params_mod.InvalidParams as e:
            raise JobError(
                "invalid_params", f"params as plugin hooks changed them do not fit: {e}", e.details()
            ) from None

    def _hook(self, live: _Live, status: JobStatus, outcome: Any = None) -> None:
        """Tell the plugins a job started or ended (``job:<state>``), without waiting."""
        if self.plugins is None:
            return
        event = _JOB_EVENTS.get(status)
        if event is None or not self.plugins.wants(event):
            return
        record = self.scripts.record(live.script_hash)
        name = record.name if record is not None else None
        about: dict[str, Any] = {"job_id": live.job_id, "script_hash": live.script_hash, "script": name}
        if status is JobStatus.COMPLETE:
            about["result"] = bounded(outcome)
        elif status is not JobStatus.RUNNING:
            about["error"] = outcome
        self.plugins.notify(event, name or live.script_hash, {**about, "params": bounded(live.params)}, about)

    async def _resolve(self, script_hash: str) -> tuple[ScriptRecord, bool]:
        """The script's index entry (see Scripts.resolve), its refusals as JobError."""
        try:
            return await self.scripts.resolve(script_hash)
        except NotFound:
            raise JobError("not_found", f"no stored script {script_hash}") from None
        except ScriptProblem as e:
            where = f" (line {e.detail.line})" if e.detail.line is not None else ""
            message = f"{script_hash} cannot run: {e.detail.kind}: {e.detail.message}{where}"
            raise JobError("lua_error", message, msgspec.to_builtins(e.detail)) from None
        except CapabilityError as e:
            raise JobError("invalid_params", f"describe().capabilities: {e}", {"reason": "capabilities"}) from None
        except ManifestError as e:
            raise JobError("invalid_params", f"{script_hash}: {e}", e.details()) from None
        except CasError as e:  # (an InvalidHash never gets here: the hash was parsed)
            message = f"{script_hash} is not a script Luanette can run: {e}"
            raise JobError("invalid_params", message, {"reason": "not_a_script"}) from None

    def _grants(self, record: ScriptRecord | None, script_hash: str) -> Grants:
        """What a job of this script is granted; JobError ``permission_denied`` when it
        declares a capability the policy does not let it have."""
        declared = record.capabilities if record is not None else None
        creator, tags = (record.creator, record.tags) if record is not None else (None, [])
        refused = self._policy.refused(declared or [], creator, tags)
        if refused:
            name = (record.name if record else None) or script_hash
            raise JobError(
                "permission_denied",
                f"{name} declares capabilities the daemon's [policy] does not allow it: {', '.join(refused)}",
            )
        return self._policy.grants_for(declared)

    def status(self, job_id: str) -> JobInfo:
        info = self.store.get(job_id)
        if info is None:
            raise JobError("not_found", f"no job {job_id!r}")
        live = self._live.get(job_id)
        if live is not None:
            info.progress = live.progress
        return info

    def list(self, status: str | None) -> list[JobInfo]:
        try:
            return self.store.list(status)
        except ValueError as e:
            raise JobError("invalid_params", str(e)) from None

    def stats(self) -> JobStoreStats:
        return self.store.stats()

    def queue_stats(self) -> dict[str, Any]:
        """The queue's autoscaling signals, cheap to read (no store access):
        ``queue_depth`` (jobs waiting for a worker), ``oldest_pending_s`` (how long the
        longest-waiting one has waited, None when none waits) and ``by_priority``
        (``{"<priority>": count}`` of the waiting ones)."""
        return {
            "queue_depth": len(self._queue),
            "waiting_for_worker": self._parked,
            "oldest_pending_s": self._queue.oldest_age(),
            "by_priority": {str(p): n for p, n in sorted(self._queue.by_priority().items(), reverse=True)},
        }

    def cancel(self, job_id: str) -> JobInfo:
        """Cancel a queued or running job. Raises ``not_found`` for an unknown id and
        ``invalid_state`` for a job that has already finished."""
        live = self._live.get(job_id)
        if live is None:
            info = self.status(job_id)
            raise JobError("invalid_state", f"job {job_id} already finished ({info.status.value}); nothing to cancel")
        self._cancel_live(live, "cancelled by request")
        return self.status(job_id)

    async def poll(self, job_ids: builtins.list[str], timeout_s: float, mode: PollMode) -> PollResult:
        """Wait up to ``timeout_s`` (capped at 30 s) until any/all of ``job_ids`` finish."""
        deadline = anyio.current_time() + min(max(timeout_s, 0.0), POLL_CAP_S)
        done: dict[str, JobInfo] = {}
        waiting: builtins.list[str] = []
        for job_id in dict.fromkeys(job_ids):  # unknown ids are an error, not "pending forever"
            info = self.status(job_id)
            if info.status in FINISHED:
                done[job_id] = info
            else:
                waiting.append(job_id)
        while True:
            changed = self._changed
            # Only jobs that were waiting can have finished, and a finished job has left
            # the live set: re-read just those (reading every id on every change made a
            # poll of N jobs cost N^2 queries).
            for job_id in [j for j in waiting if j not in self._live]:
                done[job_id] = self.status(job_id)
            waiting = [j for j in waiting if j in self._live]
            if (not waiting) if mode is PollMode.ALL else (bool(done) or not job_ids):
                break
            with anyio.move_on_after(deadline - anyio.current_time()):
                self._pollers += 1
                try:
                    await changed.wait()
                finally:
                    self._pollers -= 1
                continue
            return PollResult(list(done.values()), waiting, True)
        return PollResult(list(done.values()), waiting, False)

    # --- running ---------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            live = await self._queue.get()
            if not live.cancel.cancelled and not self._engine.eligible(live.group, live.capabilities):
                # No worker can serve it yet: it waits apart, not in one of the
                # max_jobs slots (a flood of gpu-host jobs must not stall the others).
                assert self._tg is not None
                self._parked += 1
                self._tg.start_soon(self._park, live)
                continue
            try:
                await self._execute(live)
            except Exception:
                log.exception("jobs.worker_failed", job_id=live.job_id)
                try:
                    await self._finish(
                        live,
                        JobStatus.FAILED,
                        error={"kind": "internal", "message": "internal error; see the daemon log"},
                    )
                except Exception:  # the store itself is failing: keep the other workers going
                    log.exception("jobs.finish_failed", job_id=live.job_id)

    async def _park(self, live: _Live) -> None:
        """A job no worker can serve yet: wait for one (pending, with the reason), then
        take its place in the queue again (or fail ``no_worker``)."""
        try:
            if not await self._placed(live):
                return
            try:
                self._queue.put(live, live.priority)
                return
            except QueueFull:  # it was admitted already: it runs, past the queue's bound
                pass
            await self._execute(live)
        except Exception:
            log.exception("jobs.park_failed", job_id=live.job_id)
        finally:
            self._parked -= 1

    async def _placed(self, live: _Live) -> bool:
        """Wait (pending) until some worker can serve the job: its group, its
        capabilities.  False: it was cancelled, or it failed ``no_worker``."""
        engine = self._engine
        if engine.eligible(live.group, live.capabilities):
            return True
        why = engine.why_no_worker(live.group, live.capabilities)
        live.progress = _progress(0.0, f"waiting for a worker: {why}")
        log.info("job.waiting_for_worker", job_id=live.job_id, reason=why)
        timeout = engine.config.no_worker_timeout_s
        if await engine.wait_eligible(live.group, live.capabilities, timeout, live.cancel):
            live.progress = _progress(0.0)
            return True
        if live.cancel.cancelled:
            return live.job_id in self._live  # its cancel finishes it (see _execute)
        why = engine.why_no_worker(live.group, live.capabilities)
        error = {
            "kind": "no_worker",
            "message": f"no worker could run the job within {timeout:g} s: {why}",
            "hints": ["start a worker of its group with its capabilities (luanette worker --connect ...), "
                      "or raise --no-worker-timeout"],
        }
        await self._finish(live, JobStatus.FAILED, error=error)
        return False

    async def _execute(self, live: _Live) -> None:
        if not live.cancel.cancelled and not await self._placed(live):
            return
        try:
            started = not live.cancel.cancelled and await self._commits.write(
                self.store.mark_running_op(live.job_id, time.time())
            )
        except StorageFault as fault:  # (a full disk, a locked database)
            await self._finish(
                live, JobStatus.FAILED, error={"kind": fault.code, "message": f"the job could not start: {fault}"}
            )
            return
        if not started:
            # Cancelled while queued: the cancel finished the job itself (it read it
            # pending). A cancel after the write found it running and only set the
            # token, which the run below honours at once.
            if live.cancel.cancelled and live.job_id not in self._live:
                return
            if live.cancel.cancelled:  # the cancel could not write it (see _cancel_live)
                error = {"kind": "cancelled", "message": f"{live.cancel.reason} before it started"}
                await self._finish(live, JobStatus.CANCELLED, error=error)
            else:
                self._live.pop(live.job_id, None)
            return
        live.progress = _progress(PROGRESS_STARTED)
        self._announce(live.job_id, JobStatus.RUNNING)
        self._hook(live, JobStatus.RUNNING)
        record = self.scripts.record(live.script_hash)
        name = record.name if record and record.name else None
        with self._telemetry.span(
            "luanette.script.execute",
            parent=live.trace_context,
            attributes=script_attributes(
                live.script_hash,
                name,
                live.job_id,
                creator=live.creator,
                # without the script's manifest no param is known not to be secret
                params=live.params if record is not None else None,
                schema=record.params_schema if record is not None else None,
            ),
        ) as span:
            # bound on first use: most jobs never log, and binding costs more than a
            # trivial job's other bookkeeping in the front
            jlog = _lazy_logger(live.job_id, live.script_hash, span)
            status = await self._run(live, name, jlog, span)
            span.set_attribute("job.status", status.value)
            if status is JobStatus.FAILED:
                span.set_status(StatusCode.ERROR, "the script failed")

    async def _run(self, live: _Live, name: str | None, jlog: Callable[[], Any], span: Any) -> JobStatus:
        try:
            code = await self.scripts.source(live.script_hash)
        except CasError as e:
            await self._finish(live, JobStatus.FAILED, error={"kind": "script_missing", "message": str(e)})
            return JobStatus.FAILED
        for attempt in (1, 2):
            try:
                outcome = await self._attempt(live, code, name, jlog, span)
                break
            except ScriptError as e:
                if e.detail.kind == "worker_lost" and live.retry == "on_worker_loss" and attempt == 1:
                    # the script says it is safe to run again: once
                    jlog().warning("job.retried_after_worker_loss", error=e.detail.message)
                    span.add_event("job.retry", {"reason": e.detail.message})
                    continue
                status = JobStatus.CANCELLED if e.detail.kind == "cancelled" else JobStatus.FAILED
                await self._finish(live, status, error=msgspec.to_builtins(e.detail))
                return status
        await self._finish(live, JobStatus.COMPLETE, result=outcome.result)
        return JobStatus.COMPLETE

    async def _attempt(self, live: _Live, code: str, name: str | None, jlog: Callable[[], Any], span: Any) -> Outcome:
        """One run of the job's script in the engine (ScriptError when it fails)."""
        return await self._engine.run(
            code,
            live.params,
            limits=self._limits
            if live.shutdown_timeout is None
            else msgspec.structs.replace(self._limits, shutdown_timeout_s=live.shutdown_timeout),
            info=RunInfo(
                "job",
                job_id=live.job_id,
                script_hash=live.script_hash,
                traceparent=traceparent_of(span),
                sampled=span.is_recording(),
                capabilities=live.capabilities,
                user=live.user,
                creator=live.creator,
                trigger=live.trigger,
                execution_mode=live.session[0] or "session",
                review=bool(live.session[1]),
                on_error=live.session[2] or "abort",
                tool_hooks=self.plugins.tool_events() if self.plugins is not None else [],
                group=live.group,
            ),
            cancel=live.cancel,
            hooks=RunHooks(jlog, span=span, progress=self._progress_reporter(live)),
            chunk_name=name or "script",
        )

    def _broadcast_result(self, job_id: str, result: Any) -> Any:
        """The result as broadcast: itself up to ``--pub-results`` bytes of JSON, else
        where to fetch it (a broadcast goes to every subscriber; a big result is read
        by the one who wants it)."""
        limit = self._pub_results
        size = len(msgspec.json.encode(result)) if limit else None
        if size is not None and size <= limit:
            return result
        return {
            "omitted": True,
            "size_bytes": size,
            "reason": f"results over {limit} bytes are not broadcast (--pub-results)",
            "fetch": {"type": "job_status", "job_id": job_id},
        }

    def _progress_reporter(self, live: _Live) -> Callable[[float, str | None], None]:
        span = PROGRESS_SCRIPT_END - PROGRESS_STARTED

        def report(percent: float, message: str | None) -> None:
            # on the loop: the engine hands over its workers' progress notes there
            overall = round(PROGRESS_STARTED + span * percent / 100, 4)
            live.progress = _progress(overall, message, percent)
            self._publisher.publish(
                Progress(job_id=live.job_id, percent=overall, message=message, script_percent=percent)
            )

        return report

    def _cancel_live(self, live: _Live, reason: str) -> None:
        live.cancel.cancel(reason)
        if live.job_id in self._unwritten:
            return  # it has ended; only its final state waits to be written
        try:
            info = self.store.get(live.job_id)
            if info is not None and info.status is JobStatus.PENDING:
                # Not started: finish it now (a write of its own, as a cancel is rare and
                # its reply reads the result); the worker will skip it.
                error = {"kind": "cancelled", "message": f"{reason} before it started"}
                self._live.pop(live.job_id, None)
                if self.store.finish(
                    live.job_id, JobStatus.CANCELLED, at=time.time(), error=error, progress=live.progress
                ):
                    self._queue.remove(live)  # (no worker will take it now; its place is free)
                    self._announce(live.job_id, JobStatus.CANCELLED, error)
                    self._hook(live, JobStatus.CANCELLED, error)
        except StorageFault as fault:
            # The token is set: a running job stops; a pending one is skipped by its
            # worker, which writes its end (or defers it) like any other.
            self._live[live.job_id] = live
            log.warning("jobs.cancel_not_written", job_id=live.job_id, code=fault.code, error=str(fault))

    async def _finish(self, live: _Live, status: JobStatus, *, result: Any = None, error: Any = None) -> None:
        write = self.store.finish_op(
            live.job_id, status, at=time.time(), result=result, error=error, progress=_final_progress(live, status)
        )
        try:
            changed = await self._commits.write(write)
        except StorageFault as fault:
            self._defer_final(live, status, result, error, fault)
            return
        except BaseException:
            self._live.pop(live.job_id, None)
            raise
        # only now: a poller reads a job that has left the live set from the store
        self._live.pop(live.job_id, None)
        if changed:
            self._announce(live.job_id, status, result if status is JobStatus.COMPLETE else error)
            self._hook(live, status, result if status is JobStatus.COMPLETE else error)

    def _defer_final(
        self, live: _Live, status: JobStatus, result: Any, error: Any, fault: StorageFault
    ) -> None:
        """The store refused a job's final state.  The job stays live (pollers wait; a
        restart would fail it as ``interrupted``) and :meth:`_rewrite_finals` writes its
        end once the store takes writes again: as it was when the database was only
        unavailable (locked, an I/O error); as failed with kind ``storage_full`` when the
        disk is full (its result, which may be what filled it, is not kept)."""
        if fault.code != STORAGE_FULL or (isinstance(error, dict) and error.get("kind") == STORAGE_FULL):
            final = (status, result, error)
        else:
            ended = {JobStatus.COMPLETE: "completed", JobStatus.CANCELLED: "was cancelled"}.get(status, "failed")
            message = f"the job {ended} but its end could not be recorded: {fault}"
            final = (JobStatus.FAILED, None, {"kind": fault.code, "message": message})
        self._unwritten[live.job_id] = final
        self.finals_deferred += 1
        self._deferred.set()
        log.warning(
            "jobs.final_state_deferred", job_id=live.job_id, status=status.value, code=fault.code, error=str(fault)
        )

    async def _rewrite_finals(self) -> None:
        """Write the final states the store refused (see :meth:`_defer_final`), trying
        again with a growing pause while it still refuses."""
        delay = REWRITE_FIRST_S
        while True:
            if not self._unwritten:
                await self._deferred.wait()
                self._deferred = anyio.Event()
                delay = REWRITE_FIRST_S
                continue
            await anyio.sleep(delay)
            for job_id, (status, result, error) in list(self._unwritten.items()):
                live = self._live.get(job_id)
                progress = _final_progress(live, status) if live is not None else None
                write = self.store.finish_op(
                    job_id, status, at=time.time(), result=result, error=error, progress=progress
                )
                try:
                    changed = await self._commits.write(write)
                except StorageFault as fault:
                    if fault.code == STORAGE_FULL and status is JobStatus.COMPLETE:  # now the disk is full
                        message = f"the job completed but its end could not be recorded: {fault}"
                        self._unwritten[job_id] = (JobStatus.FAILED, None, {"kind": fault.code, "message": message})
                    delay = min(delay * 2, REWRITE_MAX_S)
                    break  # still refused: wait longer
                except Exception:
                    log.exception("jobs.final_state_lost", job_id=job_id)
                    changed = False
                del self._unwritten[job_id]
                self._live.pop(job_id, None)
                log.info("jobs.final_state_written", job_id=job_id, status=status.value)
                if changed:
                    self._announce(job_id, status, result if status is JobStatus.COMPLETE else error)
            else:
                delay = REWRITE_FIRST_S

    def _announce(self, job_id: str, status: JobStatus, result: Any = None) -> None:
        if result is not None and self._publisher.bound:
            result = self._broadcast_result(job_id, result)
        self._publisher.publish(JobStateChanged(job_id=job_id, state=status.value, result=result))
        if status in FINISHED:
            if self._pollers:  # a fresh event per finished job only when someone waits
                self._changed.set()
                self._changed = anyio.Event()


_JOB_EVENTS: dict[JobStatus, str] = {
    JobStatus.RUNNING: "job:started",
    JobStatus.COMPLETE: "job:completed",
    JobStatus.FAILED: "job:failed",
    JobStatus.CANCELLED: "job:cancelled",
}


def _final_progress(live: _Live, status: JobStatus) -> dict[str, Any]:
    """The progress a job keeps after it ends: 100 when it completed; where it got to
    when it failed or was cancelled (100 would say its work was done)."""
    if status is JobStatus.COMPLETE:
        return {**live.progress, "percent": 100.0}
    return live.progress


def _lazy_logger(job_id: str, script_hash: str, span: Any) -> Callable[[], Any]:
    """A job's logger, bound with its ids and trace when first asked for."""

    @functools.cache
    def bound() -> Any:
        return log.bind(job_id=job_id, script_hash=script_hash, **span_ids(span))

    return bound
