"""Simulators for tests, examples and the compose file (``luanette-sim``).

``luanette.sim.models``: the GPU model services (orpheus family, musicgen, llm) over
real HTTP on loopback. Names are imported lazily so ``luanette.sim.<other>`` does not
pull in aiohttp/mido.
"""

from __future__ import annotations

from typing import Any

_MODELS_EXPORTS = (
    "KINDS",
    "ORPHEUS_TASKS",
    "SimConfig",
    "SimStats",
    "RequestRecord",
    "SimServer",
    "run_models",
    "serve_in_thread",
    "build_app",
    "make_midi",
    "read_midi_notes",
    "make_wav",
)

__all__ = list(_MODELS_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _MODELS_EXPORTS:
        from luanette.sim import models

        return getattr(models, name)
    raise AttributeError(f"module 'luanette.sim' has no attribute {name!r}")
