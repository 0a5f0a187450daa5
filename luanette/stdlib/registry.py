"""Which globals each kind of run gets: the one place that decides it.

A worker process holds one :class:`Toolbox` (the namespaces that serve every run, over
that process's CAS and its proxies of the front's services) and asks
:func:`namespaces_for` for each run.  Kinds:

- ``eval`` (``lua_eval``): log, clock, json, otel, context, the model namespaces
  (orpheus, musicgen, llm, backend), garden, temp (a directory of its own, removed when
  the run ends), cas, midi, abc, audio, and the upstream bridge (hootenanny, chaosgarden): the job
  stdlib, as upstream's eval had it.
- ``job`` (``job_execute`` and timeline triggers): the eval set, plus progress and job.
- ``describe`` (``describe()`` of a script being stored): nothing but the sandbox.
- ``plugin`` (a plugin's init, one event delivered to a handler, cleanup; luanette.plugins):
  the eval set without ``hooks`` (a hook run's calls fire no hooks: no recursion).

Jobs and evals also get ``flow`` (the daemon's flows, luanette.flows; plugin runs, which
run flow handlers, do not: no recursion) and ``hooks`` (``hooks.emit``), and when some plugin subscribes to a
tool event (``RunInfo.tool_hooks``) their tool namespaces report it (stdlib.hooks).

Within its kind a run gets what its capabilities admit (``luanette.capabilities``: a
job's come from its script's ``describe().capabilities`` or the policy's default, an
eval's from the policy), and calls that need more than a namespace's presence are
gated per call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from luanette.capabilities import Grants
from luanette.capabilities import namespaces as gate
from luanette.cas import Cas
from luanette.engine.api import Namespace
from luanette.stdlib.abc import AbcNamespace
from luanette.stdlib.audio import AudioNamespace
from luanette.stdlib.cas import CasNamespace
from luanette.stdlib.clock import ClockNamespace
from luanette.stdlib.context import ContextNamespace
from luanette.stdlib.flow import FlowNamespace, FlowService
from luanette.stdlib.fs import FsNamespace
from luanette.stdlib.garden import GardenNamespace
from luanette.stdlib.hooks import HookService, HooksNamespace, hooked
from luanette.stdlib.job import JobNamespace
from luanette.stdlib.json import JsonNamespace
from luanette.stdlib.log import LogNamespace
from luanette.stdlib.midi import MidiNamespace
from luanette.stdlib.otel import OtelNamespace
from luanette.stdlib.pipeline import pipeline_namespaces
from luanette.stdlib.progress import ProgressNamespace
from luanette.stdlib.session import RunSession, SessionService
from luanette.stdlib.temp import TempNamespace
from luanette.stdlib.upstream import UpstreamNamespace

if TYPE_CHECKING:
    from luanette.engine.channel import RunInfo

KINDS: Final = ("eval", "job", "describe", "plugin")
UPSTREAM: Final = UpstreamNamespace()  # no state of its own: one serves every run


class Toolbox:
    """The namespaces of one process that hold no per-run state, shared by its runs."""

    def __init__(
        self,
        *,
        cas: Cas,
        temp_root: Path,
        models: Sequence[Namespace],
        garden: GardenNamespace,
        metrics: Any,
        fs_roots: Mapping[str, Path] | None = None,
        sessions: SessionService | None = None,
        hooks: HookService | None = None,
        flows: FlowService | None = None,
    ) -> None:
        self.cas = cas
        self.fs_roots = dict(fs_roots or {})  # [fs.roots]: what fs.* reaches
        self.temp_root = Path(temp_root).expanduser().absolute()
        self.base: tuple[Namespace, ...] = (LogNamespace(), ClockNamespace(), JsonNamespace())
        self.otel = OtelNamespace(metrics)
        self.models = tuple(models)
        self.pipelines = pipeline_namespaces(self.models)  # generation pipelines over them
        self.garden = garden
        self.sessions = sessions  # the front's commit and keep (luanette.sessions)
        self.hooks = hooks  # the front's plugin hooks (luanette.plugins)
        self.flows = flows  # the front's flows (luanette.flows)


class RunSet:
    """The namespaces of one run, and what to do when it ends."""

    def __init__(self, namespaces: list[Namespace], temp: TempNamespace | None = None) -> None:
        self.namespaces = namespaces
        self.temp = temp
        self.session: RunSession | None = None  # eval and job runs: overlay, on_error

    def close(self) -> None:
        """Remove the run's temporary directory, if it made one (never raises)."""
        if self.temp is not None:
            self.temp.close()


def namespaces_for(
    kind: str,
    toolbox: Toolbox,
    *,
    job_id: str | None = None,
    script_hash: str | None = None,
    progress: Callable[[float, str | None], None] | None = None,
    capabilities: Sequence[str] | None = None,
    info: RunInfo | None = None,  # the front's description of the run (context.*)
) -> RunSet:
    """The globals a run of ``kind`` gets: those of its kind that ``capabilities`` (the
    run's grants, see luanette.capabilities) admit, gated by them; all of its kind when
    None. Raises ValueError for an unknown kind."""
    runset = _of_kind(kind, toolbox, job_id=job_id, script_hash=script_hash, progress=progress, info=info)
    session = None
    if kind != "describe":
        session = runset.session = RunSession(info, toolbox.sessions)
        runset.namespaces = session.base(runset.namespaces)
    if capabilities is not None:
        grants = Grants.of(capabilities)
        runset.namespaces = gate(runset.namespaces, grants)
        if kind != "describe" and (grants.has("fs.read") or grants.has("fs.write")):
            # fs is only ever declared: its globs are the run's own
            runset.namespaces.append(FsNamespace.from_capabilities(toolbox.fs_roots, capabilities))
    if session is not None:
        runset.namespaces = session.wrap(runset.namespaces)
    if info is not None and info.tool_hooks and kind in ("eval", "job") and toolbox.hooks is not None:
        runset.namespaces = hooked(runset.namespaces, toolbox.hooks, info.tool_hooks)
    return runset


def _of_kind(
    kind: str,
    toolbox: Toolbox,
    *,
    job_id: str | None,
    script_hash: str | None,
    progress: Callable[[float, str | None], None] | None,
    info: RunInfo | None = None,
) -> RunSet:
    if kind == "describe":
        return RunSet([])
    temp = TempNamespace(toolbox.temp_root)
    user = info.user if info is not None else None
    if kind == "eval":
        return RunSet(
            [
                *_services(toolbox), *_files(toolbox, temp), toolbox.otel, ContextNamespace.of(info), UPSTREAM,
                HooksNamespace(toolbox.hooks, "eval"), FlowNamespace(toolbox.flows, user),
            ],
            temp,
        )  # fmt: skip
    if kind == "plugin":
        return RunSet([*_services(toolbox), *_files(toolbox, temp), toolbox.otel, ContextNamespace.of(info)], temp)
    if kind == "job":
        return RunSet(
            [
                *_services(toolbox), ProgressNamespace(progress or _no_progress), *_files(toolbox, temp),
                toolbox.otel, JobNamespace(job_id or "", script_hash or ""),
                ContextNamespace.of(info, job_id=job_id, script_hash=script_hash), UPSTREAM,
                HooksNamespace(toolbox.hooks, f"job:{job_id}"), FlowNamespace(toolbox.flows, user),
            ],
            temp,
        )  # fmt: skip
    raise ValueError(f"unknown kind of run {kind!r}; one of {', '.join(KINDS)}")


def _services(toolbox: Toolbox) -> list[Namespace]:
    """The namespaces over the daemon's services, the same for every kind but describe."""
    return [*toolbox.base, *toolbox.models, *toolbox.pipelines, toolbox.garden]


def _files(toolbox: Toolbox, temp: TempNamespace) -> list[Namespace]:
    """The run's temporary directory and the namespaces that read and write through it."""
    cas = toolbox.cas
    return [temp, CasNamespace(cas, temp=temp), MidiNamespace(cas, temp), AbcNamespace(cas, temp),
            AudioNamespace(cas, temp)]  # fmt: skip


def _no_progress(percent: float, message: str | None) -> None:
    return None
