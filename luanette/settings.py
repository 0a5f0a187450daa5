"""The daemon's config file (``luanette serve --config luanette.toml``).

The file is TOML, read with the standard library's ``tomllib`` and validated with
msgspec Structs.  Every key has a default, so the file is optional and may hold only
what differs from the defaults; ``docs/configuration.md`` documents every key.  Only
the ``[backends]`` and ``[models]`` sections exist so far; later sections (``[server]``,
``[limits]``, ``[triggers]``) become new fields of :class:`Settings`.  Anything the
schema does not know is an error naming the key, so a typo never silently falls back
to a default::

    [backends.orpheus]                # a built-in backend: only the keys you change
    url = "http://gpu-box:2000"
    concurrency = 2

    [backends.my_tagger]              # a new backend: url is required
    url = "http://127.0.0.1:2042"
    timeout_s = 60

    [models.orpheus]                  # which backend serves each Lua function
    bridge = "orpheus_bridge"

A table for a built-in backend is merged over its defaults key by key.
:func:`load_settings` raises :class:`SettingsError` whose message names the file and the
dotted key, e.g. ``luanette.toml: backends.orpheus.concurrency: expected int, got str``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from luanette.capabilities import CapabilityError, Policy
from luanette.triggers import TriggerRule

__all__ = [
    "BackendSettings",
    "DEFAULT_BACKENDS",
    "LlmRoutes",
    "ModelRoutes",
    "MusicgenRoutes",
    "OrpheusRoutes",
    "Settings",
    "SettingsError",
    "load_settings",
    "parse_settings",
]

BackendKind = Literal["predict", "openai"]

_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class SettingsError(ValueError):
    """The config file cannot be used; the message names the file and the key."""


class BackendSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One HTTP model service (``[backends.<name>]``)."""

    url: str
    """Base URL, e.g. ``http://127.0.0.1:2000``; may carry a path prefix
    (``http://host:8000/orpheus``).  Request paths are appended to it."""
    kind: BackendKind = "predict"
    """``predict``: ``POST /predict``, JSON in and out (the hootenanny model services).
    ``openai``: an OpenAI-compatible API (``POST /v1/chat/completions``)."""
    concurrency: PositiveInt = 1
    """Requests in flight to this backend at once; more wait their turn in the daemon.
    The GPU services serve one request at a time, hence 1."""
    timeout_s: PositiveFloat = 300.0
    """Seconds one request may take (connect, send, model time, response).  A request
    never outlives the job's deadline either."""
    connect_timeout_s: PositiveFloat = 10.0
    """Seconds to establish the TCP connection (a host that drops packets)."""
    retries: NonNegativeInt = 5
    """Further attempts after a 429, a 5xx or a connection failure.  Retries stop early
    when the next one would start after the job's deadline."""
    retry_backoff_s: NonNegativeFloat = 0.5
    """Wait before the first retry; it doubles on each further retry (with jitter), and
    a ``Retry-After`` header asks for at least its value."""
    retry_max_backoff_s: NonNegativeFloat = 10.0
    """Cap of the doubling backoff (a longer ``Retry-After`` is still honoured)."""
    max_response_bytes: PositiveInt = 256 * 2**20
    """Largest response body accepted; a bigger one is a ``backend_unavailable`` error."""
    headers: dict[str, str] = {}
    """Extra request headers, e.g. ``{Authorization = "Bearer ..."}`` for a hosted LLM."""

    def __post_init__(self) -> None:
        url = self.url.strip()
        if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", url):
            raise ValueError(f"url: must be an http:// or https:// URL without a query, got {self.url!r}")
        msgspec.structs.force_setattr(self, "url", url.rstrip("/"))
        for name in self.headers:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"headers: {name!r} is not an HTTP header name")


def _local(port: int, kind: BackendKind = "predict") -> BackendSettings:
    return BackendSettings(url=f"http://127.0.0.1:{port}", kind=kind)


# The hootenanny stack's model services and their usual ports (2000-2099, one process
# per model; the port table of halfremembered-music-models).  The daemon never connects
# to a backend until a script uses it, so unused defaults cost nothing.
DEFAULT_BACKENDS: Final[Mapping[str, BackendSettings]] = {
    "orpheus": _local(2000),  # orpheus-base: generate, generate_seeded, continue
    "orpheus_classifier": _local(2001),  # human vs AI classification
    "orpheus_bridge": _local(2002),  # transitions between sections
    "orpheus_loops": _local(2003),  # loopable drum patterns
    "orpheus_children": _local(2004),  # the children's-music fine-tune
    "orpheus_mono": _local(2005),  # monophonic melodies
    "musicgen": _local(2006),  # text to audio (WAV)
    "clap": _local(2007),  # audio embeddings / analysis (backend.call)
    "yue": _local(2008),  # lyrics to song (backend.call)
    "anticipatory": _local(2011),  # anticipatory music transformer (backend.call)
    "beat_this": _local(2012),  # beat / downbeat detection (backend.call)
    "llm": _local(2020, "openai"),  # llmchat: OpenAI-compatible chat completions
}


class OrpheusRoutes(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``[models.orpheus]``: the backend serving each ``orpheus.*`` function."""

    generate: str = "orpheus"
    generate_seeded: str = "orpheus"
    continue_: str = msgspec.field(default="orpheus", name="continue")
    bridge: str = "orpheus_bridge"
    loops: str = "orpheus_loops"
    classify: str = "orpheus_classifier"
    variants: dict[str, str] = msgspec.field(
        default_factory=lambda: {"base": "orpheus", "children": "orpheus_children", "mono": "orpheus_mono"}
    )
    """``model = "<variant>"`` in generate / generate_seeded / continue picks this backend
    instead (the Orpheus fine-tunes are separate services)."""


class MusicgenRoutes(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``[models.musicgen]``."""

    generate: str = "musicgen"


class LlmRoutes(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``[models.llm]``."""

    chat: str = "llm"
    model: str = ""
    """Model name sent when the script names none; empty sends no ``model`` field (a
    single-model server such as llmchat or the simulator picks its own)."""


class ModelRoutes(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``[models]``: which backend each model namespace calls."""

    orpheus: OrpheusRoutes = OrpheusRoutes()
    musicgen: MusicgenRoutes = MusicgenRoutes()
    llm: LlmRoutes = LlmRoutes()

    def references(self) -> list[tuple[str, str, BackendKind]]:
        """(dotted key, backend name, kind the namespace needs) of every route."""
        o = self.orpheus
        refs: list[tuple[str, str, BackendKind]] = [
            ("models.orpheus.generate", o.generate, "predict"),
            ("models.orpheus.generate_seeded", o.generate_seeded, "predict"),
            ("models.orpheus.continue", o.continue_, "predict"),
            ("models.orpheus.bridge", o.bridge, "predict"),
            ("models.orpheus.loops", o.loops, "predict"),
            ("models.orpheus.classify", o.classify, "predict"),
            ("models.musicgen.generate", self.musicgen.generate, "predict"),
            ("models.llm.chat", self.llm.chat, "openai"),
        ]
        refs += [(f"models.orpheus.variants.{v}", b, "predict") for v, b in sorted(o.variants.items())]
        return refs


class GardenSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``[garden]``: the chaosgarden shell endpoint ``garden.*`` talks to."""

    endpoint: str | None = None
    """ZMQ endpoint of chaosgarden's shell ROUTER, e.g. ``tcp://127.0.0.1:5581``; none
    configured makes every ``garden.*`` call a ``garden_unavailable`` error."""
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    """Seconds to wait for a reply (and at most the job's deadline)."""


_ROOT_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def _root_problem(name: str, path: str) -> str | None:
    """What is wrong with the root ``name = path`` of ``[fs.roots]``, or None."""
    if not _ROOT_NAME.fullmatch(name):
        return "a root name is an identifier: 1-64 letters, digits or '_', not starting with a digit"
    if not path:
        return "must be a directory path, got an empty string"
    if "\x00" in path:
        return "must not contain a NUL character"
    return None


class FsSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """``[fs]``: the directories ``fs.*`` may reach, by name (``[fs.roots]``)."""

    roots: dict[str, str] = {}
    """Root name -> directory: a script names ``samples:drums/kick.wav`` for
    ``samples = "/srv/samples"``.  A relative directory is relative to the config file's
    directory (as ``script_file`` is); ``~`` is the daemon user's home."""

    def __post_init__(self) -> None:
        for name, path in self.roots.items():
            problem = _root_problem(name, path)
            if problem is not None:
                raise ValueError(f"roots: {name}: {problem}")

    def resolved(self, base_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
        """The roots as absolute paths, relative ones taken from ``base_dir`` (default:
        the working directory).  Symlinks are not resolved here: ``fs`` does that per call."""
        base = Path(base_dir) if base_dir else Path.cwd()
        return {name: (base / os.path.expanduser(path)).absolute() for name, path in self.roots.items()}


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """The whole config file.  ``Settings()`` is the configuration without a file."""

    backends: dict[str, BackendSettings] = msgspec.field(default_factory=lambda: dict(DEFAULT_BACKENDS))
    models: ModelRoutes = ModelRoutes()
    garden: GardenSettings = GardenSettings()
    fs: FsSettings = FsSettings()
    triggers: list[TriggerRule] = []
    policy: Policy = Policy()
    """``[policy]``: which capabilities scripts may declare and get (luanette.capabilities)."""
    config_dir: str = ""
    """Directory of the file the settings came from (not a key of the file): relative
    paths in it, such as ``script_file``, are relative to it."""

    def fs_roots(self) -> dict[str, Path]:
        """``[fs.roots]`` as absolute paths (relative ones from :attr:`config_dir`)."""
        return self.fs.resolved(self.config_dir or None)


# ------------------------------------------------------------------------- loading

_TOP_LEVEL: Final = ("backends", "models", "garden", "triggers", "policy", "fs")


def load_settings(path: str | os.PathLike[str] | None) -> Settings:
    """The settings from the TOML file at ``path``; the defaults when ``path`` is None."""
    if path is None:
        return Settings()
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{name}: no such config file") from None
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{name}: not valid TOML: {exc}") from None
    settings = parse_settings(raw, source=name)
    return msgspec.structs.replace(settings, config_dir=os.path.dirname(os.path.abspath(name)))


def parse_settings(raw: Mapping[str, Any], *, source: str = "config") -> Settings:
    """Validate an already-parsed TOML document (a dict) into :class:`Settings`."""
    try:
        return _parse(raw)
    except _KeyError as exc:
        raise SettingsError(f"{source}: {exc.key}: {exc.problem}" if exc.key else f"{source}: {exc.problem}") from None


class _KeyError(Exception):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _parse(raw: Mapping[str, Any]) -> Settings:
    for key in raw:
        if key not in _TOP_LEVEL:
            raise _KeyError(key, f"unknown section (known: {', '.join(_TOP_LEVEL)})")
    backends = dict(DEFAULT_BACKENDS)
    raw_backends = raw.get("backends", {})
    if not isinstance(raw_backends, dict):
        raise _KeyError("backends", "must be a table of [backends.<name>] tables")
    for name, table in raw_backends.items():
        key = f"backends.{name}"
        if not _NAME.fullmatch(name):
            raise _KeyError(key, "a backend name is 1-64 letters, digits, '_' or '-'")
        if not isinstance(table, dict):
            raise _KeyError(key, f"must be a table, got {_toml_type(table)}")
        if name in DEFAULT_BACKENDS:
            table = msgspec.structs.asdict(DEFAULT_BACKENDS[name]) | table
        elif "url" not in table:
            raise _KeyError(f"{key}.url", f"required: {name!r} is not a built-in backend")
        backends[name] = _convert(table, BackendSettings, key)
    models = _convert(raw.get("models", {}), ModelRoutes, "models")
    for key, name, kind in models.references():
        backend = backends.get(name)
        if backend is None:
            raise _KeyError(key, f"no backend named {name!r} (known: {', '.join(sorted(backends))})")
        if backend.kind != kind:
            raise _KeyError(key, f"backend {name!r} has kind {backend.kind!r}; this function needs kind {kind!r}")
    garden = _convert(raw.get("garden", {}), GardenSettings, "garden")
    triggers = _convert(raw.get("triggers", []), list[TriggerRule], "triggers")
    names = [rule.name for rule in triggers if rule.name]
    for name in names:
        if names.count(name) > 1:
            raise _KeyError("triggers", f"two rules are named {name!r}")
    policy = _convert(raw.get("policy", {}), Policy, "policy")
    try:
        policy.check()
    except CapabilityError as exc:
        raise _KeyError("policy", str(exc)) from None
    fs = _parse_fs(raw.get("fs", {}))
    return Settings(backends=backends, models=models, garden=garden, triggers=triggers, policy=policy, fs=fs)


def _parse_fs(raw: Any) -> FsSettings:
    roots = raw.get("roots") if isinstance(raw, dict) else None
    if isinstance(roots, dict):  # checked here first, to name the exact key
        for name, path in roots.items():
            problem = _root_problem(name, path) if isinstance(path, str) else None
            if problem is not None:
                raise _KeyError(f"fs.roots.{name}", problem)
    return _convert(raw, FsSettings, "fs")


_AT: Final = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)


def _convert(value: Any, type_: type, key: str) -> Any:
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        m = _AT.match(str(exc))
        assert m is not None
        message, path = m["message"], (m["path"] or "")
        full = key + path.replace("[...]", "")
        field = re.fullmatch(r"Object contains unknown field `(.+)`", message)
        if field:
            raise _KeyError(f"{full}.{field[1]}", f"unknown key{_known_keys(type_, path)}") from None
        field = re.fullmatch(r"Object missing required field `(.+)`", message)
        if field:
            raise _KeyError(f"{full}.{field[1]}", "required") from None
        field = re.fullmatch(r"([a-z_]+): (.+)", message, re.S)  # from a __post_init__
        if field and _is_struct(type_) and field[1] in {f.name for f in msgspec.structs.fields(type_)}:
            raise _KeyError(f"{full}.{field[1]}", field[2]) from None
        if message.startswith("Expected `object`"):
            message = message.replace("`object`", "a table")
        message = message.replace("`", "")
        raise _KeyError(full, message[:1].lower() + message[1:]) from None


def _known_keys(type_: type, path: str) -> str:
    """" (known: a, b)" for the struct at ``path`` below ``type_``, when it is a struct."""
    target: Any = type_
    for part in filter(None, path.split(".")):
        fields = {f.encode_name: f.type for f in msgspec.structs.fields(target)} if _is_struct(target) else {}
        target = fields.get(part)
    if not _is_struct(target):
        return ""
    return f" (known: {', '.join(f.encode_name for f in msgspec.structs.fields(target))})"


def _is_struct(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, msgspec.Struct)


def _toml_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array"}.get(
        type(value), type(value).__name__
    )
