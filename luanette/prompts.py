"""Prompts: chat messages that set an AI client up to write, debug or explain a script.

Seed 000's four prompts, served over ZeroMQ by ``list_prompts`` and ``get_prompt``.
Each is filled in with live context: the Lua API from :mod:`luanette.apiref` (the
namespaces a run really gets), a stored script's source and ``describe()``, a job's
error, a bundled example.  The replies have MCP's shapes (``messages: [{role, content:
{type: "text", text}}]``) so an MCP server passes them on unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec

from hooteproto.results import PromptArgument as Argument
from hooteproto.results import PromptInfo as Prompt
from hooteproto.results import PromptList, PromptMessage, PromptResult, TextContent
from luanette.apiref import Reference
from luanette.errors import RequestError
from luanette.jobs import JobError, Jobs
from luanette.resources import example_source
from luanette.scripts import Scripts

MAX_ARGUMENTS: Final = 16
MAX_ARGUMENT_BYTES: Final = 16 * 2**10
"""The longest argument value (an error message or a task description fits)."""
MAX_PROMPT_BYTES: Final = 1 * 2**20
"""The largest prompt text; past it, ``too_large``."""

STYLES: Final = {
    "simple": "Keep it short: the least code that does the task, no more error handling than it needs.",
    "detailed": "Comment each step for a reader new to Luanette, and give describe() a description of every param.",
    "production": "Make it robust: check params, wrap model and garden calls in pcall and say what failed, "
    "report progress.update(...) at each stage, log with log.info/log.warn, and return a table that says what "
    "was produced (CAS hashes).",
}

OPERATIONS: Final = {
    "generate": "Generate new MIDI with orpheus.generate{...} (several variations at once with "
    "num_variations), and return the CAS hashes it gives.",
    "transpose": "Read a MIDI file from the CAS with midi.read(hash), shift it with midi.transpose(song, "
    "semitones), write it back with midi.write(song) and return the new hash.",
    "quantize": "Read a MIDI file with midi.read(hash), snap its notes to a grid with midi.quantize(song, "
    "ticks) (ticks = song.ticks_per_beat * grid in beats), write it with midi.write(song).",
    "continue": "Extend an existing MIDI file with orpheus.continue{midi = hash, ...} and return the "
    "continuation's hashes.",
    "bridge": "Write a transition between two MIDI sections with orpheus.bridge{from = hash, to = hash, ...} "
    "and return the bridge's hash.",
}


class PromptError(RequestError):
    """A prompt that cannot be given."""


PROMPTS: Final = (
    Prompt(
        "write-script",
        "Write a new Luanette Lua script for a task, with the Lua API and an example as context.",
        [
            Argument("task", "What the script should do, in plain words.", True),
            Argument("style", f"How to write it: {', '.join(STYLES)} (default simple)."),
        ],
    ),
    Prompt(
        "debug-script",
        "Find out why a stored script fails and fix it, with its source and the error as context.",
        [
            Argument("hash", "The stored script's hash.", True),
            Argument("error", "The error message it failed with, if known."),
            Argument("job_id", "A job of the script that failed: its error and state are included."),
        ],
    ),
    Prompt(
        "explain-script",
        "Explain what a stored script does: its purpose, inputs, outputs and the services it uses.",
        [Argument("hash", "The stored script's hash.", True)],
    ),
    Prompt(
        "midi-workflow",
        "Write a MIDI workflow script (generate, transpose, quantize, continue or bridge) with the midi and "
        "orpheus APIs as context.",
        [
            Argument("operation", f"The workflow: {', '.join(OPERATIONS)}.", True),
            Argument("details", "Anything more the workflow should do or respect (key, length, tempo, ...)."),
        ],
    ),
)
"""Seed 000's prompts."""

_BY_NAME: Final = {prompt.name: prompt for prompt in PROMPTS}

_BASICS = """\
How Luanette scripts work:
- Scripts are Lua 5.4, run in a sandbox: there is no io, os or debug library; files, the \
content-addressed store (CAS), models and the timeline are reached through the namespaces below.
- A job runs `main(params)`; what main returns (a JSON-like value: table, string, number, boolean, nil) \
is the job's result. `error("message")` fails the job; `pcall` catches errors.
- Define `describe()` returning `{name, description, params = {<name> = {type, required, default, \
description}}, returns}`: job_execute checks params against it, and script_search finds the script by it.
- Store a script with the script_store request, run it with job_execute {script_hash, params}, wait with \
job_poll. lua_eval runs a snippet once, for trying things out.
- Functions marked async make the script wait without holding up other work; `core.all{...}` runs \
several at once.
"""


class Prompts:
    """Lists prompts and fills them in."""

    def __init__(self, *, jobs: Jobs, scripts: Scripts, reference: Callable[[], Reference]) -> None:
        self._jobs = jobs
        self._scripts = scripts
        self._reference = reference

    def list(self) -> dict[str, Any]:
        """``{prompts: [{name, description, arguments: [{name, description, required}]}]}``."""
        return msgspec.to_builtins(PromptList(list(PROMPTS)))

    async def get(self, name: str, arguments: Mapping[str, str]) -> dict[str, Any]:
        """``{description, messages}`` of prompt ``name``. Raises PromptError:
        ``not_found`` (no such prompt, script or job), ``invalid_params`` (a missing,
        unknown or too long argument, a bad value), ``too_large``."""
        prompt = _BY_NAME.get(name)
        if prompt is None:
            raise PromptError(
                "not_found", f"no prompt {name!r}; the prompts are {', '.join(_BY_NAME)}", {"prompts": list(_BY_NAME)}
            )
        args = _check_arguments(prompt, arguments)
        if name == "write-script":
            text = self._write(args)
        elif name == "debug-script":
            text = await self._debug(args)
        elif name == "explain-script":
            text = await self._explain(args)
        else:
            text = self._midi(args)
        size = len(text.encode())
        if size > MAX_PROMPT_BYTES:
            raise PromptError(
                "too_large",
                f"prompt {name} would be {size} bytes, more than the {MAX_PROMPT_BYTES} allowed",
                {"limit": MAX_PROMPT_BYTES, "size": size},
            )
        return msgspec.to_builtins(PromptResult(prompt.description, [PromptMessage("user", TextContent(text=text))]))

    # --- the prompts ---------------------------------------------------------------------

    def _write(self, args: dict[str, str]) -> str:
        style = _choice(args.get("style", "simple"), STYLES, "style")
        return (
            f"Write a Luanette Lua script for this task:\n\n{args['task']}\n\n"
            f"Style: {STYLES[style]}\n\n{_BASICS}\n{self._api_overview()}\n"
            f"{_example_block('hello')}"
            "Reply with the whole script in one ```lua block, then one line on how to run it (its params)."
        )

    async def _debug(self, args: dict[str, str]) -> str:
        script_hash, source, about = await self._script(args["hash"])
        parts = [f"A Luanette Lua script fails. Find the cause and give a fixed version.\n\nScript {script_hash}:"]
        parts.append(f"```lua\n{source}\n```")
        if about:
            parts.append(f"Its describe():\n```json\n{about}\n```")
        if "error" in args:
            parts.append(f"The error:\n```\n{args['error']}\n```")
        if "job_id" in args:
            try:
                job = self._jobs.status(args["job_id"])
            except JobError as e:
                raise PromptError(e.code, str(e)) from None
            parts.append(
                f"Job {job.job_id} ({job.status.value}) of script {job.source}; its error:\n"
                f"```json\n{_json(job.error)}\n```"
            )
        parts.append(
            "Errors name a kind (lua_syntax, lua_runtime, timeout, cancelled, memory_limit, "
            "result_not_serializable), a line and hints. " + _BASICS
        )
        parts.append(self._api_overview())
        parts.append("Explain the cause in a few sentences, then give the whole fixed script in one ```lua block.")
        return "\n\n".join(parts)

    async def _explain(self, args: dict[str, str]) -> str:
        script_hash, source, about = await self._script(args["hash"])
        parts = [f"Explain what this Luanette Lua script (stored as {script_hash}) does.", f"```lua\n{source}\n```"]
        if about:
            parts.append(f"Its describe():\n```json\n{about}\n```")
        parts += [
            _BASICS,
            self._api_overview(),
            "Cover: its purpose; its params (types, defaults, which are required); what it returns; which "
            "services it uses (models, the CAS, the garden timeline) and what it changes; anything that may fail.",
        ]
        return "\n\n".join(parts)

    def _midi(self, args: dict[str, str]) -> str:
        operation = _choice(args["operation"], OPERATIONS, "operation")
        reference = self._reference()
        docs = [
            f"### {name}\n{ns.doc}" for name in ("midi", "orpheus", "cas") if (ns := reference.get(name)) is not None
        ]
        details = f"\n\nMore: {args['details']}" if "details" in args else ""
        return (
            f"Write a Luanette Lua script for the MIDI workflow '{operation}': {OPERATIONS[operation]}{details}\n\n"
            f"{_BASICS}\nMIDI files live in the CAS and are passed around by hash.\n\n"
            + "\n\n".join(docs)
            + "\n\n"
            + _example_block("midi_process")
            + "Reply with the whole script in one ```lua block, with describe() declaring its params."
        )

    # --- helpers -------------------------------------------------------------------------

    def _api_overview(self) -> str:
        lines = ["The Lua namespaces (read lua://namespaces/<name> for the full documentation of one):"]
        for ns in self._reference().namespaces.values():
            functions = ", ".join(f.name + (" (async)" if f.kind == "async" else "") for f in ns.functions)
            lines.append(f"- {ns.name} [{'/'.join(ns.runs)}]: {ns.summary} Functions: {functions}.")
        return "\n".join(lines) + "\n"

    async def _script(self, text: str) -> tuple[str, str, str]:
        try:
            script_hash, source = await self._scripts.source_of(text)
        except RequestError as e:
            raise PromptError(e.code, f"hash: {e.message}") from None
        record = self._scripts.record(script_hash)
        about = ""
        if record is not None and (record.name or record.description or record.params_schema):
            about = _json({"name": record.name, "description": record.description, "params": record.params_schema})
        return script_hash, source, about


def _check_arguments(prompt: Prompt, arguments: Mapping[str, str]) -> dict[str, str]:
    known = {a.name for a in prompt.arguments}
    if len(arguments) > MAX_ARGUMENTS:
        raise PromptError("invalid_params", f"at most {MAX_ARGUMENTS} arguments")
    args: dict[str, str] = {}
    for key, value in arguments.items():
        if key not in known:
            raise PromptError(
                "invalid_params",
                f"prompt {prompt.name} has no argument {key!r}; its arguments are {', '.join(sorted(known))}",
            )
        if len(value.encode()) > MAX_ARGUMENT_BYTES:
            raise PromptError("invalid_params", f"argument {key} is longer than {MAX_ARGUMENT_BYTES} bytes")
        if value.strip():  # an empty optional argument is as good as none
            args[key] = value
    missing = [a.name for a in prompt.arguments if a.required and a.name not in args]
    if missing:
        raise PromptError("invalid_params", f"prompt {prompt.name} needs the argument {', '.join(missing)}")
    return args


def _choice(value: str, choices: Mapping[str, str], what: str) -> str:
    value = value.strip().lower()
    if value not in choices:
        raise PromptError("invalid_params", f"{what} must be one of {', '.join(choices)}, got {value[:40]!r}")
    return value


def _example_block(name: str) -> str:
    source = example_source(name)
    if source is None:  # (a package built without its examples)
        return ""
    return f"An example (lua://examples/{name}):\n```lua\n{source}```\n\n"


def _json(value: Any) -> str:
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
