"""Model namespaces: ``orpheus``, ``musicgen``, ``llm`` and the generic ``backend``.

Each function sends one HTTP request through the daemon's :class:`~luanette.backends.Backends`
(the script waits without holding a thread), stores generated MIDI / WAV in the CAS and
hands the script hashes, never base64.  MIDI inputs are CAS hashes (a hash string,
``cas:<hash>``, or any table with a ``hash`` field, e.g. an earlier result).

Lua API (every argument table is optional unless a field is marked required; unknown
fields are an error, so a typo never silently does nothing)::

    orpheus.generate{temperature, top_p, max_tokens, num_variations, random_seed, model, tags}
    orpheus.generate_seeded{seed = <hash> (required), ...same}
    orpheus.continue{midi = <hash> (required), ...same}
    orpheus.bridge{from = <hash> (required), to = <hash>, temperature, top_p, max_tokens,
                   num_variations, random_seed, tags}
    orpheus.loops{seed = <hash>, temperature, top_p, max_tokens, num_variations, random_seed, tags}
        -> {hash, variations = {{hash, mime_type = "audio/midi", size_bytes, num_tokens}, ...},
            task, metadata [, tags]}          hash = variations[1].hash
    orpheus.classify{midi = <hash> (required)}
        -> the service's answer: {classification = {is_human, confidence, probabilities},
                                  labels, scores, num_tokens, metadata, task}
    musicgen.generate{prompt, duration, temperature, top_k, top_p, guidance_scale,
                      do_sample, random_seed}          (or musicgen.generate("a prompt"))
        -> {hash, mime_type = "audio/wav", size_bytes, sample_rate, duration, channels, num_samples}
    llm.chat{messages = {{role, content}, ...} (required), model, temperature, top_p,
             max_tokens, stop, seed, response_format}  (or llm.chat("a question"))
        -> {content, role, finish_reason, model, usage, choices}
    backend.call(name, body [, path | {path, method, raw}]) -> the decoded JSON answer

``model`` picks an Orpheus variant service (``base``, ``children``, ``mono`` by
default; ``[models.orpheus.variants]`` in the config).  ``random_seed`` goes to the
service as its ``seed`` (``seed`` in these tables is the seed *MIDI*).  ``tags`` are
returned as given (a place for the seed scripts' labels).

``backend.call`` posts ``body`` to the backend's default path (``/predict``, or
``/v1/chat/completions`` for an ``openai`` backend) unless a path is given.  In the
body, a table ``{cas_base64 = <hash>}`` is replaced by the base64 of that CAS object.
In the answer, every string field ``<x>_base64`` holding valid base64 is stored in the CAS and replaced by
``<x> = {hash, mime_type, size_bytes}`` (``<x>_cas`` if ``<x>`` is taken), the MIME type
sniffed from the bytes; ``raw = true`` returns the answer untouched.

Errors are Lua errors (catch them with pcall) whose message, after the runtime's
``"<namespace>.<function>: "`` prefix, starts with a stable code:

- ``backend_unavailable``: connection refused, timeout, 429/5xx after the retries, a
  retry the job deadline leaves no time for, an answer that is not what the API promises;
- ``invalid_params``: a wrong argument, or the service refused the request (400/422);
- ``not_found``: a hash that is not in the CAS, a backend name that is not configured;
- ``cas_read_only``, ``storage_full``: the CAS could not store the result (read-only,
  full disk; see luanette/faults.py);
- ``internal``: the CAS failed otherwise.
"""

from __future__ import annotations

import base64
import binascii
import difflib
from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio
import anyio.to_thread

from luanette.backends import BackendError, Backends, UnknownBackend
from luanette.cas import Cas, CasError, InvalidHash, NotFound, TooLarge, parse_hash
from luanette.engine.api import LuaCallError, RunContext, charge_cas_write
from luanette.faults import StorageFault
from luanette.settings import ModelRoutes
from luanette.stdlib.cas import cas_failure
from luanette.stdlib.paths import lua_type

__all__ = [
    "BackendNamespace",
    "LlmNamespace",
    "Models",
    "MusicgenNamespace",
    "OrpheusNamespace",
    "model_namespaces",
]

MIDI_MIME: Final = "audio/midi"
WAV_MIME: Final = "audio/wav"
DEFAULT_MIME: Final = "application/octet-stream"
# A MIDI input bigger than this is a mistake (a long orchestral SMF is a few hundred KiB).
MAX_MIDI_INPUT_BYTES: Final = 16 * 2**20
# A {cas_base64 = hash} input of backend.call (audio for an analysis service).
MAX_BLOB_INPUT_BYTES: Final = 64 * 2**20
# Threads that may touch the CAS for model results at once (reads, fsynced writes).
CAS_THREADS: Final = 4
_NESTING_LIMIT: Final = 64

# --------------------------------------------------------------------- argument checks


def _fail(code: str, message: str) -> LuaCallError:
    return LuaCallError(f"{code}: {message}")


def _options(
    value: Any, allowed: Mapping[str, Callable[[Any, str], Any]], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The checked fields of an argument table (``nil`` is an empty table)."""
    if value is None:
        value = {}
    if isinstance(value, list) and not value:
        value = {}
    if not isinstance(value, dict):
        raise _fail("invalid_params", f"expected a table of named fields, got {lua_type(value)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        check = allowed.get(key)
        if check is None:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _fail("invalid_params", f"unknown field '{key}'{hint}; fields: {', '.join(sorted(allowed))}")
        if item is None:
            continue
        out[key] = check(item, key)
    for key in required:
        if key not in out:
            raise _fail("invalid_params", f"'{key}' is required")
    return out


def _number(value: Any, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail("invalid_params", f"{what} must be a number, got {lua_type(value)}")
    return value


def _integer(value: Any, what: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail("invalid_params", f"{what} must be an integer, got {_describe(value)}")
    return value


def _positive_integer(value: Any, what: str) -> int:
    n = _integer(value, what)
    if n < 1:
        raise _fail("invalid_params", f"{what} must be at least 1, got {n}")
    return n


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _fail("invalid_params", f"{what} must be a string, got {lua_type(value)}")
    return value


def _boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise _fail("invalid_params", f"{what} must be a boolean, got {lua_type(value)}")
    return value


def _strings(value: Any, what: str) -> list[str]:
    if isinstance(value, dict) and not value:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail("invalid_params", f"{what} must be an array of strings")
    return value


def _table(value: Any, what: str) -> Any:
    if not isinstance(value, (dict, list)):
        raise _fail("invalid_params", f"{what} must be a table, got {lua_type(value)}")
    return value


def _stop(value: Any, what: str) -> str | list[str]:
    return value if isinstance(value, str) else _strings(value, what)


def _hash(value: Any, what: str) -> str:
    """A CAS hash argument: a hash string, ``cas:<hash>``, or a table with ``hash``."""
    if isinstance(value, dict) and "hash" in value:
        value = value["hash"]
    if not isinstance(value, str):
        raise _fail(
            "invalid_params", f"{what} must be a CAS hash (or a table with a hash field), got {lua_type(value)}"
        )
    try:
        return parse_hash(value)
    except InvalidHash as exc:
        raise _fail("invalid_params", f"{what}: {exc}") from None


def _describe(value: Any) -> str:
    return f"{value!r}" if isinstance(value, (int, float)) and not isinstance(value, bool) else lua_type(value)


def _sniff_mime(data: bytes) -> str:
    if data[:4] == b"MThd":
        return MIDI_MIME
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return WAV_MIME
    if data[:4] == b"fLaC":
        return "audio/flac"
    if data[:4] == b"OggS":
        return "audio/ogg"
    if data[:3] == b"ID3" or data[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"):
        return "audio/mpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return DEFAULT_MIME


# ------------------------------------------------------------------------ shared core


class Models:
    """What the model namespaces share: backends, CAS, routes, the CAS thread limiter."""

    def __init__(
        self,
        backends: Backends,
        cas: Cas,
        routes: ModelRoutes | None = None,
        *,
        max_midi_input_bytes: int = MAX_MIDI_INPUT_BYTES,
        max_blob_input_bytes: int = MAX_BLOB_INPUT_BYTES,
    ) -> None:
        self.backends = backends
        self.cas = cas
        self.routes = routes if routes is not None else ModelRoutes()
        self.max_midi_input_bytes = max_midi_input_bytes
        self.max_blob_input_bytes = max_blob_input_bytes
        self._limiter = anyio.CapacityLimiter(CAS_THREADS)

    # -- HTTP ----------------------------------------------------------------------

    async def call(self, run: RunContext, backend: str, path: str | None, body: Any, *, method: str = "POST") -> Any:
        """One backend request within the run's deadline; errors as coded Lua errors."""
        try:
            if path is None:
                path = self.default_path(backend)
            return await self.backends.call(backend, path, body, deadline=run.deadline, method=method)
        except BackendError as exc:
            run.logger.info("backend.error", backend=backend, code=exc.code, reason=exc.reason)
            raise LuaCallError(str(exc)) from None
        except UnknownBackend as exc:
            raise LuaCallError(str(exc.args[0])) from None

    async def stream(
        self, run: RunContext, backend: str, body: Any, *, buffer_size: int, meta: dict[str, Any]
    ) -> dict[str, Any]:
        """A streamed chat completion (``Backends.stream``); errors as coded Lua errors.
        In a worker the front reads the stream and publishes its chunks."""
        try:
            result: dict[str, Any] = await self.backends.stream(
                backend,
                self.default_path(backend),
                body,
                deadline=run.deadline,
                buffer_size=buffer_size,
                meta=meta,
            )
            return result
        except BackendError as exc:
            run.logger.info("backend.error", backend=backend, code=exc.code, reason=exc.reason)
            raise LuaCallError(str(exc)) from None
        except UnknownBackend as exc:
            raise LuaCallError(str(exc.args[0])) from None

    def default_path(self, backend: str) -> str:
        settings = self.backends.settings(backend)
        if settings.kind == "openai":
            # a base URL that already ends in /v1 (as OpenAI client libraries take it)
            return "/chat/completions" if settings.url.endswith("/v1") else "/v1/chat/completions"
        return "/predict"

    # -- CAS -----------------------------------------------------------------------

    async def read(self, hash: str, what: str, limit: int) -> bytes:
        try:
            return await anyio.to_thread.run_sync(self._retrieve, hash, limit, limiter=self._limiter)
        except NotFound:
            raise _fail("not_found", f"{what}: no object {hash} in the CAS") from None
        except TooLarge as exc:
            raise _fail(
                "invalid_params", f"{what}: object {hash} is {exc.size} bytes, over the limit of {limit} bytes"
            ) from None
        except StorageFault as fault:
            raise LuaCallError(fault.lua_message()) from None
        except (CasError, OSError) as exc:
            raise _fail("internal", cas_failure(exc, what, hash).message) from None

    def _retrieve(self, hash: str, limit: int) -> bytes:
        return self.cas.retrieve(hash, max_bytes=limit)

    async def read_midi(self, hash: str, what: str) -> str:
        """The base64 of a MIDI file in the CAS."""
        data = await self.read(hash, what, self.max_midi_input_bytes)
        if data[:4] != b"MThd":
            raise _fail("invalid_params", f"{what}: object {hash} is not a Standard MIDI File")
        return base64.b64encode(data).decode("ascii")

    async def store(self, blobs: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
        """Store (data, mime type) pairs; their ``{hash, mime_type, size_bytes}``."""
        charge_cas_write(sum(len(data) for data, _ in blobs))  # the calling run's quota
        try:
            hashes = await anyio.to_thread.run_sync(self._store_all, blobs, limiter=self._limiter)
        except StorageFault as fault:  # cas_read_only, storage_full
            raise LuaCallError(fault.lua_message()) from None
        except (CasError, OSError) as exc:
            raise _fail("internal", f"cannot store the result: {cas_failure(exc, 'result').message}") from None
        return [
            {"hash": h, "mime_type": mime, "size_bytes": len(data)}
            for h, (data, mime) in zip(hashes, blobs, strict=True)
        ]

    def _store_all(self, blobs: list[tuple[bytes, str]]) -> list[str]:
        return [self.cas.store(data, mime) for data, mime in blobs]


def _unexpected(backend: str, models: Models, problem: str) -> LuaCallError:
    url = models.backends.settings(backend).url
    return _fail("backend_unavailable", f"{backend} at {url}: unexpected answer: {problem}")


def _b64decode(text: Any, backend: str, models: Models, what: str) -> bytes:
    if not isinstance(text, str):
        raise _unexpected(backend, models, f"{what} is not a string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _unexpected(backend, models, f"{what} is not valid base64") from None


# -------------------------------------------------------------------------- orpheus

_GENERATION: Final[dict[str, Callable[[Any, str], Any]]] = {
    "temperature": _number,
    "top_p": _number,
    "max_tokens": _positive_integer,
    "num_variations": _positive_integer,
    "random_seed": _integer,
    "tags": _strings,
}


class OrpheusNamespace:
    """Lua global ``orpheus``: the Orpheus MIDI model family."""

    name = "orpheus"

    def __init__(self, models: Models) -> None:
        self.models = models

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        routes = self.models.routes.orpheus

        async def generate(params: Any = None) -> dict[str, Any]:
            o = _options(params, {**_GENERATION, "model": _string})
            return await self._generate(run, "generate", self._variant(o, routes.generate), o, {})

        async def generate_seeded(params: Any = None) -> dict[str, Any]:
            o = _options(params, {**_GENERATION, "model": _string, "seed": _hash}, ("seed",))
            wire = {"midi_input": await self.models.read_midi(o["seed"], "seed")}
            return await self._generate(run, "generate_seeded", self._variant(o, routes.generate_seeded), o, wire)

        async def continue_(params: Any = None) -> dict[str, Any]:
            o = _options(params, {**_GENERATION, "model": _string, "midi": _hash}, ("midi",))
            wire = {"midi_input": await self.models.read_midi(o["midi"], "midi")}
            return await self._generate(run, "continue", self._variant(o, routes.continue_), o, wire)

        async def bridge(params: Any = None) -> dict[str, Any]:
            o = _options(params, {**_GENERATION, "from": _hash, "to": _hash}, ("from",))
            wire = {"section_a": await self.models.read_midi(o["from"], "from")}
            if "to" in o:
                wire["section_b"] = await self.models.read_midi(o["to"], "to")
            return await self._generate(run, "bridge", routes.bridge, o, wire)

        async def loops(params: Any = None) -> dict[str, Any]:
            o = _options(params, {**_GENERATION, "seed": _hash})
            wire = {"midi_input": await self.models.read_midi(o["seed"], "seed")} if "seed" in o else {}
            return await self._generate(run, "loops", routes.loops, o, wire)

        async def classify(params: Any = None) -> dict[str, Any]:
            o = _options(params, {"midi": _hash}, ("midi",))
            body = {"task": "classify", "midi_input": await self.models.read_midi(o["midi"], "midi")}
            answer = await self.models.call(run, routes.classify, None, body)
            if not isinstance(answer, dict):
                raise _unexpected(routes.classify, self.models, f"expected a JSON object, got {type(answer).__name__}")
            return answer

        return {
            "generate": generate,
            "generate_seeded": generate_seeded,
            "continue": continue_,
            "bridge": bridge,
            "loops": loops,
            "classify": classify,
        }

    def _variant(self, o: dict[str, Any], default: str) -> str:
        model = o.get("model")
        if model is None:
            return default
        variants = self.models.routes.orpheus.variants
        if model not in variants:
            known = ", ".join(sorted(variants))
            raise _fail("invalid_params", f"model: unknown Orpheus model {model!r} (known: {known})")
        return variants[model]

    async def _generate(
        self, run: RunContext, task: str, backend: str, o: dict[str, Any], wire: dict[str, Any]
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"task": task}
        for key in ("temperature", "top_p", "max_tokens", "num_variations"):
            if key in o:
                body[key] = o[key]
        if "random_seed" in o:
            body["seed"] = o["random_seed"]
        body.update(wire)
        answer = await self.models.call(run, backend, None, body)
        variations = answer.get("variations") if isinstance(answer, dict) else None
        if not isinstance(variations, list) or not variations:
            raise _unexpected(backend, self.models, "no variations in the answer")
        blobs, tokens = [], []
        for i, v in enumerate(variations, 1):
            if not isinstance(v, dict):
                raise _unexpected(backend, self.models, f"variation {i} is not an object")
            data = _b64decode(v.get("midi_base64"), backend, self.models, f"variations[{i}].midi_base64")
            if data[:4] != b"MThd":
                raise _unexpected(backend, self.models, f"variation {i} is not a Standard MIDI File")
            blobs.append((data, MIDI_MIME))
            tokens.append(v.get("num_tokens"))
        refs = await self.models.store(blobs)
        for ref, n in zip(refs, tokens, strict=True):
            if n is not None:
                ref["num_tokens"] = n
        result: dict[str, Any] = {
            "hash": refs[0]["hash"],
            "variations": refs,
            "task": answer.get("task", task),
            "metadata": answer.get("metadata") or {},
        }
        if "tags" in o:
            result["tags"] = o["tags"]
        return result


# ------------------------------------------------------------------------- musicgen

_MUSICGEN: Final[dict[str, Callable[[Any, str], Any]]] = {
    "prompt": _string,
    "duration": _number,
    "temperature": _number,
    "top_k": _integer,
    "top_p": _number,
    "guidance_scale": _number,
    "do_sample": _boolean,
    "random_seed": _integer,
}


class MusicgenNamespace:
    """Lua global ``musicgen``: text to audio."""

    name = "musicgen"

    def __init__(self, models: Models) -> None:
        self.models = models

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        backend = self.models.routes.musicgen.generate

        async def generate(params: Any = None) -> dict[str, Any]:
            if isinstance(params, str):
                params = {"prompt": params}
            o = _options(params, _MUSICGEN)
            body = {k: v for k, v in o.items() if k != "random_seed"}
            if "random_seed" in o:
                body["seed"] = o["random_seed"]
            answer = await self.models.call(run, backend, None, body)
            if not isinstance(answer, dict):
                raise _unexpected(backend, self.models, "expected a JSON object")
            data = _b64decode(answer.get("audio_base64"), backend, self.models, "audio_base64")
            mime = _sniff_mime(data)
            if mime != WAV_MIME:
                raise _unexpected(backend, self.models, "audio_base64 is not a WAV file")
            (ref,) = await self.models.store([(data, mime)])
            for key in ("sample_rate", "duration", "channels", "num_samples"):
                if key in answer:
                    ref[key] = answer[key]
            return ref

        return {"generate": generate}


# ------------------------------------------------------------------------------ llm


def _messages(value: Any, what: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _fail("invalid_params", f"{what} must be a non-empty array of {{role, content}} tables")
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _fail("invalid_params", f"{what}[{i}] must be a table with a string role")
        content = m.get("content")
        if not isinstance(content, (str, list)):
            raise _fail("invalid_params", f"{what}[{i}].content must be a string (or an array of parts)")
    return value


_CHAT: Final[dict[str, Callable[[Any, str], Any]]] = {
    "messages": _messages,
    "model": _string,
    "temperature": _number,
    "top_p": _number,
    "max_tokens": _positive_integer,
    "stop": _stop,
    "seed": _integer,
    "response_format": _table,
}


class LlmNamespace:
    """Lua global ``llm``: an OpenAI-compatible chat model."""

    name = "llm"

    def __init__(self, models: Models) -> None:
        self.models = models

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        routes = self.models.routes.llm

        async def chat(params: Any = None) -> dict[str, Any]:
            if isinstance(params, str):
                params = {"messages": [{"role": "user", "content": params}]}
            body = _options(params, _CHAT, ("messages",))
            if "model" not in body and routes.model:
                body["model"] = routes.model
            answer = await self.models.call(run, routes.chat, None, body)
            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
                raise _unexpected(routes.chat, self.models, "no choices in the answer")
            message = choices[0].get("message")
            if not isinstance(message, dict):
                raise _unexpected(routes.chat, self.models, "choices[1] has no message")
            return {
                "content": message.get("content") or "",
                "role": message.get("role", "assistant"),
                "finish_reason": choices[0].get("finish_reason"),
                "model": answer.get("model", body.get("model")),
                "usage": answer.get("usage") or {},
                "choices": choices,
            }

        return {"chat": chat}


# -------------------------------------------------------------------------- backend


class BackendNamespace:
    """Lua global ``backend``: any configured service, JSON in and out."""

    name = "backend"

    def __init__(self, models: Models) -> None:
        self.models = models

    def functions(self, run: RunContext) -> Mapping[str, Callable[..., Any]]:
        async def call(name: Any, body: Any = None, options: Any = None) -> Any:
            if not isinstance(name, str):
                raise _fail("invalid_params", f"name must be a backend name (a string), got {lua_type(name)}")
            if isinstance(options, str):
                options = {"path": options}
            o = _options(options, {"path": _path, "method": _method, "raw": _boolean})
            method = o.get("method", "POST")
            if body is None and method == "POST":
                raise _fail("invalid_params", "body must be a table (the JSON to send)")
            if body is not None and not isinstance(body, (dict, list)):
                raise _fail("invalid_params", f"body must be a table, got {lua_type(body)}")
            try:
                self.models.backends.settings(name)
            except UnknownBackend as exc:
                raise LuaCallError(str(exc.args[0])) from None
            if body is not None:
                body = await self._inline(body, 0)
            answer = await self.models.call(run, name, o.get("path"), body, method=method)
            if o.get("raw"):
                return answer
            blobs: list[tuple[bytes, str]] = []
            places: list[tuple[dict[str, Any], str, str]] = []
            self._find_blobs(answer, blobs, places, 0)
            if blobs:
                refs = await self.models.store(blobs)
                for (parent, old, new), ref in zip(places, refs, strict=True):
                    del parent[old]
                    parent[new] = ref
            return answer

        return {"call": call}

    async def _inline(self, value: Any, depth: int) -> Any:
        """Replace every ``{cas_base64 = hash}`` table with the object's base64."""
        if depth > _NESTING_LIMIT:
            raise _fail("invalid_params", "body is nested too deeply")
        if isinstance(value, dict):
            if set(value) == {"cas_base64"}:
                h = _hash(value["cas_base64"], "cas_base64")
                data = await self.models.read(h, "cas_base64", self.models.max_blob_input_bytes)
                return base64.b64encode(data).decode("ascii")
            return {k: await self._inline(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list):
            return [await self._inline(v, depth + 1) for v in value]
        return value

    def _find_blobs(
        self, value: Any, blobs: list[tuple[bytes, str]], places: list[tuple[dict[str, Any], str, str]], depth: int
    ) -> None:
        if depth > _NESTING_LIMIT:
            return
        if isinstance(value, dict):
            for key, item in list(value.items()):
                if isinstance(key, str) and key.endswith("_base64") and isinstance(item, str) and len(key) > 7:
                    try:
                        data = base64.b64decode(item, validate=True)
                    except (binascii.Error, ValueError):
                        continue  # not base64 after all: left as it is
                    stem = key[: -len("_base64")]
                    new = stem if stem not in value else f"{stem}_cas"
                    blobs.append((data, _sniff_mime(data)))
                    places.append((value, key, new))
                else:
                    self._find_blobs(item, blobs, places, depth + 1)
        elif isinstance(value, list):
            for item in value:
                self._find_blobs(item, blobs, places, depth + 1)


def _path(value: Any, what: str) -> str:
    path = _string(value, what)
    if (
        not path.startswith("/")
        or path.startswith("//")
        or len(path) > 1024
        or any(c.isspace() or ord(c) < 32 for c in path)
        or "#" in path
        or ".." in path.split("?", 1)[0].split("/")
    ):
        raise _fail("invalid_params", f"{what} must be an absolute path like '/predict', got {path[:80]!r}")
    return path


def _method(value: Any, what: str) -> str:
    method = _string(value, what).upper()
    if method not in ("GET", "POST"):
        raise _fail("invalid_params", f"{what} must be 'GET' or 'POST', got {value!r}")
    return method


# ------------------------------------------------------------------------- assembly


def model_namespaces(
    backends: Backends,
    cas: Cas,
    routes: ModelRoutes | None = None,
) -> list[Any]:
    """The four namespaces (orpheus, musicgen, llm, backend) over one shared :class:`Models`.

    They hold no per-run state, so one list may serve every job.
    """
    models = Models(backends, cas, routes)
    return [OrpheusNamespace(models), MusicgenNamespace(models), LlmNamespace(models), BackendNamespace(models)]
