"""Generation pipelines (seed 004 section 3): definitions, their checks and bounds.

A :class:`PipelineDefinition` says how to assemble a context (system text and sources,
truncated by priority to ``max_tokens``) and how to generate with it: one ``single``
call, ``sequential`` steps, ``parallel`` branches merged (``concatenate``,
``pick_best``, ``summarize``), or a ``chain`` of steps that reference each other's
results (``${outline.result}``), wait for them (``depends_on``) and fan out over a list
one of them produced (``parallel_on``).  The Lua side (``luanette.stdlib.pipeline``)
runs a definition inside the job's run; this module is the part that needs no Lua:
parsing and checking a definition, the order of a chain, ``${}`` expansion, token
estimates, context truncation, and the front's lookups for ``script_search`` and
``job_result`` sources.

Every bound is a named error (:class:`PipelineError`, a Lua error ``<code>: ...``):
``pipeline_invalid`` (not a definition), ``pipeline_cycle`` (steps that wait for each
other), ``pipeline_limit`` (steps, branches, fan-out width, sources, ``${}`` nesting,
prompt size, token budget, registered pipelines).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

from luanette.engine.api import LuaCallError

__all__ = [
    "PipelineDefinition",
    "PipelineError",
    "PipelineSources",
    "assemble",
    "check_definition",
    "estimate_tokens",
    "expand",
    "lookup",
]

MAX_STEPS: Final = 32  # steps (or branches) of one pipeline
MAX_FANOUT: Final = 16  # items a parallel_on step fans out over
MAX_SOURCES: Final = 16  # context sources of one pipeline
MAX_EXPANSION_DEPTH: Final = 8  # ${} references inside substituted values
MAX_PROMPT_CHARS: Final = 256 * 1024  # an expanded prompt
MAX_CONTEXT_TOKENS: Final = 1_000_000  # the largest context.max_tokens
MAX_TOTAL_TOKENS: Final = 1_000_000  # the largest max_total_tokens a pipeline may ask for
MAX_REGISTERED: Final = 64  # pipelines registered in one run
MAX_BUFFER_SIZE: Final = 65_536  # streaming.buffer_size (characters per chunk)
MAX_SEARCH_LIMIT: Final = 20  # scripts a script_search source lists
MAX_SOURCE_CHARS: Final = 64 * 1024  # text one front source returns
# Rough size of a token in UTF-8 bytes (OpenAI's rule of thumb for English); see
# estimate_tokens for why there is no real tokenizer here.
BYTES_PER_TOKEN: Final = 4

STEP_KINDS: Final = ("llm", "orpheus", "musicgen")
ORPHEUS_TASKS: Final = ("generate", "generate_seeded", "continue", "bridge", "loops")


class PipelineError(LuaCallError):
    """A definition or a run that breaks a rule; the message starts with its code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# --- the definition (seed 004's Rust host types, as msgspec Structs) ----------------------


class _Struct(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class StaticText(_Struct, tag="static_text", tag_field="type"):
    content: str
    name: str | None = None


class ScriptSearch(_Struct, tag="script_search", tag_field="type"):
    """Stored scripts whose name, description or tags share a word with ``query``."""

    query: str = ""
    tag: str | None = None
    limit: int = 5
    name: str | None = None


class CasSource(_Struct, tag="cas", tag_field="type"):
    """A CAS object: text as it is, MIDI summarised (``midi.info``)."""

    hash: str
    name: str | None = None


class JobResult(_Struct, tag="job_result", tag_field="type"):
    job_id: str
    name: str | None = None


class Custom(_Struct, tag="custom", tag_field="type"):
    """``handler`` (a Lua function of the defining script, or its name) returns text."""

    handler: str
    config: Any = None
    name: str | None = None


ContextSource = StaticText | ScriptSearch | CasSource | JobResult | Custom


class ContextConfig(_Struct):
    system: str | None = None
    sources: list[ContextSource] = []
    max_tokens: int = 8000
    priorities: dict[str, int] = {}


class GenerationStep(_Struct):
    id: str
    prompt: str = ""
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    kind: Literal["llm", "orpheus", "musicgen"] = "llm"
    task: str | None = None  # the orpheus function (generate, continue, ...)
    params: dict[str, Any] | None = None  # the music model's arguments (${} expanded)
    parse: str | None = None  # a Lua function: the step's text -> its data


class Concatenate(_Struct, tag="concatenate", tag_field="type"):
    separator: str = "\n\n"


class PickBest(_Struct, tag="pick_best", tag_field="type"):
    """``criteria``: ``classifier`` (or ``human``/``ai``: orpheus.classify's
    probability), ``longest``, ``shortest``, or any text an LLM judges by."""

    criteria: str
    model: str | None = None


class Summarize(_Struct, tag="summarize", tag_field="type"):
    prompt: str
    model: str | None = None
    max_tokens: int | None = None


MergeStrategy = Concatenate | PickBest | Summarize


class ChainStep(GenerationStep):
    parallel_on: str | None = None
    depends_on: list[str] = []
    merge: MergeStrategy | None = None  # Luanette's: a fan-out's results merged into one


class Single(GenerationStep, tag="single", tag_field="type"):
    id: str = "single"


class Sequential(_Struct, tag="sequential", tag_field="type"):
    steps: list[GenerationStep]


class Parallel(_Struct, tag="parallel", tag_field="type"):
    branches: list[GenerationStep]
    merge: MergeStrategy = msgspec.field(default_factory=Concatenate)


class Chain(_Struct, tag="chain", tag_field="type"):
    steps: list[ChainStep]


GenerationStrategy = Single | Sequential | Parallel | Chain


class StreamingConfig(_Struct):
    enabled: bool = False
    chunk_handler: str | None = None
    buffer_size: int = 100


class PipelineDefinition(_Struct):
    id: str
    strategy: GenerationStrategy
    context: ContextConfig = msgspec.field(default_factory=ContextConfig)
    streaming: StreamingConfig = msgspec.field(default_factory=StreamingConfig)
    max_total_tokens: int = 100_000  # Luanette's bound on what one run of it may use
    handlers: dict[str, str] = {}  # (Lua functions, by name; placeholders here)


# The seed's Lua sketch spells fields in camelCase; both spellings are accepted.
_CAMEL: Final = {
    "maxTokens": "max_tokens",
    "chunkHandler": "chunk_handler",
    "bufferSize": "buffer_size",
    "parallelOn": "parallel_on",
    "dependsOn": "depends_on",
    "maxTotalTokens": "max_total_tokens",
}
# An empty Lua table has no shape: these fields take it as [] or {}.
_LISTS: Final = frozenset({"sources", "steps", "branches", "depends_on"})
_MAPS: Final = frozenset({"priorities", "params", "handlers", "config"})
_REF: Final = re.compile(r"\$\{([^{}]*)\}")
_REF_OR_ESCAPE: Final = re.compile(r"(\$?)\$\{([^{}]*)\}")  # $${x} is a literal ${x}
_ID: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


def _normalise(value: Any, depth: int = 0) -> Any:
    if depth > 32:
        raise PipelineError("pipeline_invalid", "the definition is nested too deeply")
    if isinstance(value, dict):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            key = _CAMEL.get(key, key)
            if key in _LISTS and item == {}:
                item = []
            elif key in _MAPS and item == []:
                item = {}
            out[key] = item if key in ("params", "config") else _normalise(item, depth + 1)
        return out
    if isinstance(value, list):
        return [_normalise(item, depth + 1) for item in value]
    return value


def parse_definition(value: Any) -> PipelineDefinition:
    """A :class:`PipelineDefinition` from a Lua table (functions already replaced by
    placeholder strings); :class:`PipelineError` ``pipeline_invalid`` says what is wrong."""
    if not isinstance(value, dict):
        raise PipelineError("pipeline_invalid", "a pipeline definition is a table with id and strategy")
    try:
        return msgspec.convert(_normalise(value), PipelineDefinition, strict=False)
    except msgspec.ValidationError as exc:
        raise PipelineError("pipeline_invalid", str(exc)) from None


def steps_of(definition: PipelineDefinition) -> list[GenerationStep]:
    """The generation steps of a definition, in the order they are written."""
    strategy = definition.strategy
    if isinstance(strategy, Single):
        return [strategy]
    if isinstance(strategy, Parallel):
        return list(strategy.branches)
    return list(strategy.steps)


def _references(step: GenerationStep) -> set[str]:
    texts = [step.prompt, *_strings_in(step.params or {}, 0)]
    return {m.group(1).strip().split(".")[0] for text in texts for m in _REF.finditer(text)}


def _strings_in(value: Any, depth: int) -> list[str]:
    if depth > 16:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings_in(v, depth + 1)]
    if isinstance(value, list):
        return [s for v in value for s in _strings_in(v, depth + 1)]
    return []


def check_definition(definition: PipelineDefinition) -> dict[str, Any]:
    """Check a definition's rules and bounds; for a chain, its plan: ``layers``, lists of
    step ids whose dependencies are all in earlier layers (each layer runs at once)."""
    d = definition
    if not _ID.match(d.id):
        raise PipelineError("pipeline_invalid", f"id must be a name (letters, digits, _ and -), got {d.id!r}")
    steps = steps_of(d)
    if not steps:
        raise PipelineError("pipeline_invalid", "the strategy has no steps")
    if len(steps) > MAX_STEPS:
        raise PipelineError("pipeline_limit", f"{len(steps)} steps, more than the limit of {MAX_STEPS}")
    if len(d.context.sources) > MAX_SOURCES:
        raise PipelineError(
            "pipeline_limit", f"{len(d.context.sources)} context sources, more than the limit of {MAX_SOURCES}"
        )
    if not 1 <= d.context.max_tokens <= MAX_CONTEXT_TOKENS:
        raise PipelineError("pipeline_limit", f"context.max_tokens must be 1..{MAX_CONTEXT_TOKENS}")
    if not 1 <= d.max_total_tokens <= MAX_TOTAL_TOKENS:
        raise PipelineError("pipeline_limit", f"max_total_tokens must be 1..{MAX_TOTAL_TOKENS}")
    if not 1 <= d.streaming.buffer_size <= MAX_BUFFER_SIZE:
        raise PipelineError("pipeline_limit", f"streaming.buffer_size must be 1..{MAX_BUFFER_SIZE}")
    for source in d.context.sources:
        if isinstance(source, ScriptSearch) and not 1 <= source.limit <= MAX_SEARCH_LIMIT:
            raise PipelineError("pipeline_limit", f"script_search limit must be 1..{MAX_SEARCH_LIMIT}")
    ids: set[str] = set()
    for step in steps:
        if not _ID.match(step.id) or step.id in ("vars", "item", "index", "context", "results", "merge"):
            raise PipelineError("pipeline_invalid", f"step id {step.id!r} is not a name a step may have")
        if step.id in ids:
            raise PipelineError("pipeline_invalid", f"two steps are called {step.id!r}")
        ids.add(step.id)
        if step.kind == "llm" and not step.prompt:
            raise PipelineError("pipeline_invalid", f"step {step.id!r} has no prompt")
        if step.kind == "orpheus" and (step.task or "generate") not in ORPHEUS_TASKS:
            raise PipelineError("pipeline_invalid", f"step {step.id!r}: task must be one of {', '.join(ORPHEUS_TASKS)}")
        if step.max_tokens is not None and step.max_tokens < 1:
            raise PipelineError("pipeline_invalid", f"step {step.id!r}: max_tokens must be at least 1")
    plan: dict[str, Any] = {}
    if isinstance(d.strategy, Chain):
        plan["layers"] = _layers(d.strategy.steps, ids)
    return plan


def _layers(steps: list[ChainStep], ids: set[str]) -> list[list[str]]:
    needs: dict[str, set[str]] = {}
    for step in steps:
        wanted = set(step.depends_on) | (_references(step) & ids)
        if step.parallel_on:
            wanted.add(step.parallel_on.split(".")[0])
        unknown = {w for w in step.depends_on if w not in ids}
        if unknown:
            raise PipelineError("pipeline_invalid", f"step {step.id!r} depends on unknown steps {sorted(unknown)}")
        if step.parallel_on and step.parallel_on.split(".")[0] not in ids | {"vars"}:
            raise PipelineError(
                "pipeline_invalid", f"step {step.id!r}: parallel_on {step.parallel_on!r} names no step (or vars.*)"
            )
        wanted.discard("vars")
        if step.id in wanted:
            raise PipelineError("pipeline_cycle", f"step {step.id!r} depends on itself")
        needs[step.id] = wanted
    layers: list[list[str]] = []
    done: set[str] = set()
    order = [s.id for s in steps]
    while len(done) < len(order):
        ready = [i for i in order if i not in done and needs[i] <= done]
        if not ready:
            stuck = sorted(i for i in order if i not in done)
            raise PipelineError("pipeline_cycle", f"steps {stuck} wait for each other (depends_on or ${{}} references)")
        layers.append(ready)
        done.update(ready)
    return layers


# --- ${} references -----------------------------------------------------------------------


def lookup(path: str, scope: Mapping[str, Any]) -> Any:
    """The value ``path`` (``a.b.c``) names in ``scope``: a step's record
    (``outline.result``, ``expand.results``, ``plan.data.sections``; ``plan.lines`` is its
    result's non-empty lines), ``item``/``index`` of a fan-out, or a variable
    (``vars.x`` or plain ``x``).  :class:`PipelineError` when nothing is there."""
    parts = [p for p in path.strip().split(".") if p]
    if not parts:
        raise PipelineError("pipeline_invalid", "an empty ${} reference")
    steps = scope.get("steps") or {}
    head, rest = parts[0], parts[1:]
    current: Any
    if head in steps:
        current = steps[head]
    elif head in ("item", "index", "results") and head in scope:
        current = scope[head]
    elif head == "vars":
        current = scope.get("vars") or {}
    else:
        variables = scope.get("vars") or {}
        if head not in variables:
            raise PipelineError("pipeline_invalid", f"${{{path}}}: no step or variable called {head!r}")
        current = variables[head]
    for i, part in enumerate(rest):
        if part == "lines" and isinstance(current, dict) and "result" in current and "lines" not in current:
            current = [line.strip() for line in str(current["result"]).splitlines() if line.strip()]
            continue
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, dict) and isinstance(current.get("data"), dict) and part in current["data"]:
            current = current["data"][part]  # plan.sections: a field of the step's data
        elif isinstance(current, list) and part.isdigit() and 1 <= int(part) <= len(current):
            current = current[int(part) - 1]
        else:
            where = ".".join(parts[: i + 1])
            raise PipelineError("pipeline_invalid", f"${{{path}}}: nothing at {where!r}")
    return current


def _render(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict) and isinstance(value.get("result"), str):
        return value["result"]  # ${outline} is ${outline.result}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n\n".join(value)
    if value is None:
        return ""
    return msgspec.json.encode(value).decode()


def expand(template: str, scope: Mapping[str, Any], depth: int = 0) -> str:
    """``template`` with every ``${path}`` replaced by what :func:`lookup` finds (lists
    of texts joined by blank lines, tables as JSON); references inside substituted
    text of a *variable* are expanded too (a variable may be written in terms of
    others), at most :data:`MAX_EXPANSION_DEPTH` deep; what steps generated is never
    expanded (a model's answer may well contain ``${``).  ``$${x}`` is a literal ``${x}``."""
    if depth > MAX_EXPANSION_DEPTH:
        raise PipelineError("pipeline_limit", f"${{}} references nested more than {MAX_EXPANSION_DEPTH} deep (a loop?)")
    steps = scope.get("steps") or {}

    def substitute(match: re.Match[str]) -> str:
        if match.group(1):
            return match.group(0)[1:]
        path = match.group(2)
        text = _render(lookup(path, scope))
        head = path.strip().split(".")[0]
        generated = head in steps or head in ("item", "index", "results")
        return expand(text, scope, depth + 1) if "${" in text and not generated else text

    out = _REF_OR_ESCAPE.sub(substitute, template)
    if len(out) > MAX_PROMPT_CHARS:
        raise PipelineError("pipeline_limit", f"an expanded prompt of {len(out)} characters (limit {MAX_PROMPT_CHARS})")
    return out


def expand_value(value: Any, scope: Mapping[str, Any], depth: int = 0) -> Any:
    """:func:`expand` applied to every string in a table (a music step's params); a
    string that is a single reference keeps the referenced value's type."""
    if depth > 16:
        raise PipelineError("pipeline_invalid", "params are nested too deeply")
    if isinstance(value, str):
        whole = _REF.fullmatch(value)
        if whole:
            return lookup(whole.group(1), scope)
        return expand(value, scope)
    if isinstance(value, dict):
        return {k: expand_value(v, scope, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_value(v, scope, depth + 1) for v in value]
    return value


# --- tokens and context -------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """An estimate of ``text``'s token count: its UTF-8 bytes over four.

    Why no real tokenizer: tiktoken's wheel ships no encodings (it downloads its BPE
    files from the network on first use, which a daemon here cannot do), and the
    configured models are arbitrary OpenAI-compatible servers whose tokenizer we do not
    know.  Counts a model reports itself (``usage`` of a chat answer, ``num_tokens``
    of an Orpheus variation) are used as they are; estimates are marked as such."""
    if not text:
        return 0
    return math.ceil(len(text.encode("utf-8", "replace")) / BYTES_PER_TOKEN)


def _cut(text: str, tokens: int) -> str:
    data = text.encode("utf-8", "replace")[: tokens * BYTES_PER_TOKEN]
    return data.decode("utf-8", "ignore")


def assemble(parts: list[Mapping[str, Any]], max_tokens: int, priorities: Mapping[str, int]) -> dict[str, Any]:
    """The seed's ``AssembledContext`` of ``parts`` (``{name, text}``, the system text
    first): the parts that fit in ``max_tokens``, highest priority first (``system``
    100 and the others 50 unless ``priorities`` says otherwise; ties keep their order),
    the first that does not fit cut to what is left and the rest dropped; joined in
    their original order by blank lines."""
    ranked = sorted(
        range(len(parts)),
        key=lambda i: (-priorities.get(str(parts[i]["name"]), 100 if parts[i]["name"] == "system" else 50), i),
    )
    left = max_tokens
    kept: dict[int, str] = {}
    truncated = False
    for i in ranked:
        text = _render(parts[i].get("text"))
        need = estimate_tokens(text)
        if need <= left:
            kept[i] = text
            left -= need
        elif left > 0:
            kept[i] = _cut(text, left)
            left = 0
            truncated = True
        else:
            truncated = True
    texts = [kept[i] for i in sorted(kept) if kept[i]]
    system = "\n\n".join(texts)
    return {
        "system_prompt": system,
        "total_tokens": estimate_tokens(system),
        "sources_used": [str(parts[i]["name"]) for i in sorted(kept) if kept[i] and parts[i]["name"] != "system"],
        "truncated": truncated,
        "tokens_estimated": True,
    }


# --- the front's sources ------------------------------------------------------------------


class PipelineSources:
    """What only the front can read for a pipeline's context: its script index
    (``script_search``) and its jobs (``job_result``).  Set as ``Engine.pipeline_sources``."""

    def __init__(self, store: Any) -> None:
        self._store = store

    async def fetch(self, kind: str, args: Mapping[str, Any]) -> str:
        """The text of one source, at most :data:`MAX_SOURCE_CHARS` characters."""
        if kind == "script_search":
            limit = max(1, min(int(args.get("limit") or 5), MAX_SEARCH_LIMIT))
            found = self._store.search(tag=args.get("tag"), vibe=args.get("query") or None, limit=limit)
            lines = [
                f"- {r.name or r.hash}: {r.description or ''} (tags: {', '.join(r.tags)}; hash {r.hash})".strip()
                for r in found
            ]
            text = "\n".join(lines) if lines else "(no stored scripts match)"
        elif kind == "job_result":
            info = self._store.get(str(args.get("job_id")))
            if info is None:
                raise LuaCallError(f"not_found: no job {args.get('job_id')!r}")
            if info.status.value != "complete":
                raise LuaCallError(f"invalid_params: job {info.job_id} is {info.status.value}, not complete")
            text = _render(info.result)
        else:
            raise LuaCallError(f"invalid_params: unknown pipeline source {kind!r}")
        return text[:MAX_SOURCE_CHARS]
