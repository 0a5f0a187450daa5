"""Lua the front sends as the code of its own runs (plugin and flow runs), kept as
``.lua`` files: every such run starts with ``module_prologue.lua``."""

from __future__ import annotations

from importlib import resources


def module_driver(name: str) -> str:
    """The code of a plugin or flow run: the shared prologue, then ``name``."""
    here = resources.files(__name__)
    return (here / "module_prologue.lua").read_text(encoding="utf-8") + (here / name).read_text(encoding="utf-8")
