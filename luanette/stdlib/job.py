"""The `job` namespace: what a job's script knows about its own job.

- ``job.id() -> string``: the job id, as ``job_execute`` answered it (e.g. to name the
  job in ``garden.latent_started(region, job.id())``).
- ``job.script_hash() -> string``: the hash of the running script.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from luanette.engine.api import RunContext


class JobNamespace:
    """Lua global `job`, bound to one job."""

    name = "job"

    def __init__(self, job_id: str, script_hash: str) -> None:
        self.job_id = job_id
        self.script_hash = script_hash

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        return {"id": lambda: self.job_id, "script_hash": lambda: self.script_hash}
