"""Why a run failed (``ErrorDetail.cause``) and what to do about it (hints, troubleshooting).

A hint is followed by the model that reads it, so a wrong one is worse than none.  The
rules, in docs/lua.md#causes-and-hints:

- a name is suggested only from the table that was indexed: the global table (plus the
  failing frame's locals and upvalues) for a global, the keys of the local, upvalue or
  global table named before ``.name``/``:name`` on the failing line for a field or
  method, and nothing when that table cannot be told;
- within a small edit distance (or the same name but for case and underscores, or a
  known synonym such as ``parse`` for ``decode``, or a unique prefix of at least three
  letters), and never the name itself;
- a function the sandbox removed (``os.execute``, ``io.*``, ``debug.*``...) is named as
  such, with what to use instead; what Lua 5.4 no longer has (``unpack``,
  ``table.getn``) or never had (``string.split``) gets its Lua 5.4 idiom;
- other hints are facts read from the message, the failing line and the frame's
  values (``s.upper()`` on a string: use ``s:upper()``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


MISSING_MAIN: Final = "the script defines describe() but no global function main(params)"

# Globals the stdlib may bind; one absent from a run was not granted to it (it is not a
# typo).  docs/lua-api.md lists them; luanette.stdlib.registry decides who gets which.
NAMESPACES: Final = frozenset(
    "log clock json otel garden context progress job temp cas midi fs orpheus musicgen llm backend".split()
)
_EVAL_NAMESPACES: Final = (
    "log, clock, json, otel, context and, as [policy] eval grants them, garden, cas, temp, midi and the models"
)

_FILES: Final = "temp.* for the job's scratch files, cas.* for stored content, fs.* for configured roots"
_NO_PROGRAMS: Final = (
    "scripts cannot run programs; call the daemon's services instead (orpheus.*, musicgen.*, "
    "llm.*, backend.call, garden.*)"
)
# Standard functions the sandbox leaves out, and what a script uses instead.
REMOVED: Final[Mapping[str, str]] = {
    "os.execute": _NO_PROGRAMS,
    "io.popen": _NO_PROGRAMS,
    "os.exit": "end the run with return <result>, or fail it with error(message)",
    "os.getenv": "pass configuration in params; context.* describes the run (job id, user, deadline)",
    "os.remove": "use temp.remove for the job's scratch files",
    "os.rename": f"write the file anew where it belongs: {_FILES}",
    "os.tmpname": "use temp.path(name) for a scratch file of the job",
    "os.difftime": "subtract the two os.time() values (seconds)",
    "os.setlocale": "format numbers and dates with string.format and os.date",
    "io.write": "use print(...) or log.info(message) for output",
    "io.read": "input comes in params",
    "io.lines": f"read files through {_FILES}",
    "io.open": f"read and write files through {_FILES}",
    "io": f"files: {_FILES}; output: print or log.info",
    "loadfile": "load code with require (modules) or load(text)",
    "dofile": "load code with require (modules) or load(text)",
    "debug": "every error comes with the script's stack; use log.debug(...) to trace values, pcall/xpcall to catch",
    "string.dump": "functions cannot be serialised; serialise data with json.encode",
    "package": "modules are loaded with require; package.* is not available",
}
# What Lua 5.4 (or Lua at all) spells differently, and the idiom to use.
IDIOMS: Final[Mapping[str, str]] = {
    "unpack": "unpack is Lua 5.1; in Lua 5.4 use table.unpack(t)",
    "loadstring": "loadstring is Lua 5.1; in Lua 5.4 use load(text)",
    "setfenv": "setfenv is Lua 5.1; give load an environment instead: load(text, name, 't', env)",
    "getfenv": "getfenv is Lua 5.1; use _ENV",
    "math.pow": "math.pow is gone in Lua 5.4: use the ^ operator (2 ^ 3)",
    "math.mod": "math.mod is gone in Lua 5.4: use the % operator or math.fmod",
    "math.ldexp": "math.ldexp is gone in Lua 5.4: use x * 2 ^ e",
    "table.getn": "table.getn is gone in Lua 5.4: the length of t is #t",
    "table.maxn": "table.maxn is gone in Lua 5.4: the length of an array t is #t",
    "string.gfind": "string.gfind is Lua 5.0: use string.gmatch",
    "string.split": "Lua has no string.split: iterate with string.gmatch(s, '[^,]+') (a pattern for one field)",
    "string.trim": "Lua has no string.trim: use s:match('^%s*(.-)%s*$')",
    "string.strip": "Lua has no string.strip: use s:match('^%s*(.-)%s*$')",
    "string.startswith": "Lua has no string.startswith: use s:sub(1, #prefix) == prefix",
    "string.endswith": "Lua has no string.endswith: use suffix == '' or s:sub(-#suffix) == suffix",
    "string.contains": "Lua has no string.contains: use s:find(part, 1, true) ~= nil",
    "table.length": "the length of a table t is #t",
    "table.len": "the length of a table t is #t",
    "table.size": "the length of an array t is #t (count the keys of other tables with pairs)",
    "table.count": "the length of an array t is #t (count the keys of other tables with pairs)",
    "table.join": "join strings with table.concat(t, sep)",
    "table.keys": "collect the keys with: for k in pairs(t) do keys[#keys + 1] = k end",
    "table.contains": "Lua has no table.contains: loop over the table with ipairs",
    "table.indexOf": "Lua has no table.indexOf: loop over the table with ipairs",
    "bit32": "bit32 is gone in Lua 5.4: use the operators & | ~ << >>",
}
# C modules a script may try to require, and what the sandbox offers instead.
C_MODULES: Final[Mapping[str, str]] = {
    "socket": "scripts have no network access; call the daemon's services (backend.call, the model namespaces)",
    "ssl": "scripts have no network access; call the daemon's services (backend.call, the model namespaces)",
    "http": "scripts have no network access; call the daemon's services (backend.call, the model namespaces)",
    "lfs": f"use {_FILES}",
    "posix": f"use {_FILES}; clock.* for time",
    "cjson": "use the json namespace: json.encode, json.decode",
    "dkjson": "use the json namespace: json.encode, json.decode",
    "rapidjson": "use the json namespace: json.encode, json.decode",
    "lpeg": "use Lua patterns: string.match, string.gmatch, string.gsub",
    "ffi": "no foreign code runs in the sandbox",
}
# Names authors reach for, and the name a table may have instead.
SYNONYMS: Final[Mapping[str, tuple[str, ...]]] = {
    "parse": ("decode",),
    "loads": ("decode",),
    "stringify": ("encode",),
    "dumps": ("encode",),
    "serialize": ("encode",),
    "time": ("now",),
    "read": ("get",),
    "fetch": ("get",),
    "load": ("get",),
    "put": ("store",),
    "save": ("store",),
    "print": ("info",),
    "warning": ("warn",),
    "length": ("len",),
    "size": ("len",),
}

TROUBLESHOOTING: Final[Mapping[str, tuple[str, ...]]] = {
    "nil_call": (
        "the function does not exist under that name: check its spelling (names are case-sensitive) "
        "and that the table it is looked up in is the one you think",
        "read_resource lua://namespaces lists what a run gets and lua://namespaces/<name> a namespace's "
        "functions (docs/lua-api.md: their arguments); docs/lua.md lists the sandbox's globals",
        "to see what a table holds, lua_eval: local ks = {} for k in pairs(T) do ks[#ks + 1] = k end return ks",
    ),
    "nil_index": (
        "a value is nil where a table was expected: check the name and every step of the path before it",
        "values from params, json.decode or a namespace call may lack a field: test with if x then ... end, "
        "or give a default: (params or {}).name",
        "log.debug('here', {value = x}) shows a value in the job's log",
    ),
    "type_error": (
        "check the value's type with type(x) before using it; the message names the value and its type",
        "numbers and strings convert with tonumber(s) and tostring(n)",
    ),
    "arithmetic": (
        "arithmetic needs numbers: convert text with tonumber(s) (nil when it is not a number)",
        "a nil operand is usually a misspelt name or a missing field",
    ),
    "compare": ("< and > compare two numbers or two strings; convert one side first",),
    "concat": ("'..' joins strings and numbers only: convert other values with tostring(x) or json.encode(t)",),
    "bad_argument": (
        "the message names the argument (#1 is the first) and the type expected",
        "docs/lua-api.md lists the arguments of the namespace functions; the Lua 5.4 manual those of the "
        "standard library",
    ),
    "namespace_error": (
        "the message starts with the function that failed (and its kind, if any); read_resource "
        "lua://namespaces/<namespace> and docs/lua-api.md describe its arguments and failures",
        "wrap the call in pcall(fn, ...) to handle the failure in the script",
    ),
    "not_in_sandbox": (
        "scripts run in a sandbox: no files, processes, environment, network or debug library, "
        "only the namespaces (docs/lua.md lists what is available)",
    ),
    "missing_main": (
        "a script with describe() does its work in a global function main(params) and returns the result "
        "from it; describe() only declares it",
        "lua_describe {script_hash} shows what describe() returns",
    ),
    "stack_overflow": ("a function calls itself without end: check the recursion's base case, or use a loop",),
    "user_error": (
        "the script raised this error itself (error() or assert()): the stack shows where",
        "check the params the run was given (lua_describe {script_hash} shows what the script expects)",
    ),
    "module_not_found": (
        "require finds stored scripts (script:NAME) and modules under the configured modules directory",
    ),
    "syntax": (
        "the line is where the parser noticed the problem; the mistake is often just before it "
        "(a missing 'end', ')' or quote)",
    ),
    "c_boundary": ("functions that wait (I/O, core.sleep, core.await) cannot run inside a callback called from C",),
}

_NIL_VALUE = re.compile(r"a nil value \((global|field|method|local|upvalue|constant) '([^']*)'\)")
_BAD_ARGUMENT = re.compile(r"^bad argument #(\d+) to '([^']+)' \((.*)\)$")
_NAMESPACE_FAILURE = re.compile(r"^([A-Za-z_]\w*)\.([A-Za-z_]\w*): ")
_MODULE_NOT_FOUND = re.compile(r"module (?:not found: \"([^\"]+)\"|'([^']+)' not found)")
_DID_YOU_MEAN = re.compile(r"did you mean '([^']+)'\?")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_PATH_BEFORE = r"([A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*)\s*([.:])\s*{name}\b"


@dataclass
class Scene:
    """What is known about a failure: Lua's message, the globals, the failing frame."""

    message: str
    globals: dict[str, set[str]] = field(default_factory=dict)  # global -> its string keys
    scope: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # local/upvalue -> (type, keys)
    raiser: str | None = None  # see sandbox.lua's context_of
    line_text: str | None = None  # the failing line of the script's own chunk, if known
    source: str | None = None  # the whole chunk, if known

    @classmethod
    def of(cls, message: str, info: Mapping[str, Any], line_text: str | None, source: str | None) -> Scene:
        """A scene from the sandbox's description of the error (see sandbox.lua's describe)."""
        scene = cls(message, line_text=line_text, source=source)
        for raw in info.get("names") or []:
            name = _text(raw)
            head, _, rest = name.partition(".")
            scene.globals.setdefault(head, set())
            if rest:
                scene.globals[head].add(rest)
        for entry in info.get("scope") or []:
            if isinstance(entry, dict) and "name" in entry:
                keys = entry.get("keys") or []
                # the innermost definition of a name shadows the others (locals come first)
                scene.scope.setdefault(_text(entry["name"]), (_text(entry.get("type", "")), [_text(k) for k in keys]))
        raiser = info.get("raiser")
        scene.raiser = _text(raiser) if raiser is not None else None
        return scene


def explain(scene: Scene) -> tuple[str, list[str], list[str]]:
    """The cause of a runtime error, its hints and its troubleshooting steps."""
    cause = classify(scene)
    hints = _dedupe(_hints(scene, cause))
    return cause, hints, list(TROUBLESHOOTING.get(cause, ()))


def classify(scene: Scene) -> str:
    """The ``cause`` of a runtime error's message (see docs/lua.md#causes-and-hints)."""
    message = scene.message
    nil = _NIL_VALUE.search(message)
    if nil and _removed(scene, nil.group(1), nil.group(2)):
        return "not_in_sandbox"
    module = _MODULE_NOT_FOUND.search(message)
    if module:
        name = module.group(1) or module.group(2)
        return "not_in_sandbox" if name.split(".")[0] in C_MODULES else "module_not_found"
    if message.startswith(MISSING_MAIN):
        return "missing_main"
    if message.endswith("is available in the sandbox") or message.endswith("are not available in the sandbox"):
        return "not_in_sandbox"
    if message.startswith("attempt to call a nil value"):
        return "nil_call"
    if message.startswith("attempt to index a nil value"):
        return "nil_index"
    if message.startswith("attempt to compare"):
        return "compare"
    if message.startswith("attempt to concatenate"):
        return "concat"
    if (
        message.startswith(("attempt to perform arithmetic", "attempt to divide by zero", "attempt to perform 'n"))
        or re.match(r"attempt to (add|sub|mul|div|mod|pow|unm|idiv) a '", message)
        or message == "number has no integer representation"
    ):
        return "arithmetic"
    if message.startswith(
        ("attempt to call", "attempt to index", "attempt to get length", "attempt to perform bitwise")
    ):
        return "type_error"
    if re.match(r"'for' (initial value|limit|step) must be a number|bad 'for' (initial value|limit|step)", message):
        return "type_error"
    if message.startswith("stack overflow") or "stack overflow" in message[:80]:
        return "stack_overflow"
    if message.startswith("attempt to yield across a C-call boundary"):
        return "c_boundary"
    if _BAD_ARGUMENT.match(message) or message.startswith("wrong number of arguments to"):
        return "bad_argument"
    namespace = _NAMESPACE_FAILURE.match(message)
    if namespace and namespace.group(2) in scene.globals.get(namespace.group(1), ()):
        return "namespace_error"
    if scene.raiser == "library":
        return "bad_argument"  # a library function's own wording ("invalid option", ...)
    return "user_error"


def closest(name: str, candidates: Iterable[str], synonyms: bool = False) -> list[str]:
    """The names among ``candidates`` that ``name`` is a likely misspelling of (at most
    three, equally close), or none; never ``name`` itself.  ``synonyms``: also a name
    an API of ours has for what ``name`` usually means (``parse``: ``decode``), which
    only holds for our namespaces, not for a script's own tables."""
    pool = sorted({c for c in candidates if c and c != name})
    if not pool:
        return []

    def squash(s: str) -> str:
        return s.replace("_", "").lower()

    same = [c for c in pool if squash(c) == squash(name)]
    if same:
        return same[:3]
    meant = [c for c in SYNONYMS.get(name.lower(), ()) if c in pool] if synonyms else []
    if meant:
        return meant
    if len(name) < 3:
        return []
    allowed = 1 if len(name) <= 4 else 2 if len(name) <= 8 else 3
    scored = [(_distance(name.lower(), c.lower()), c) for c in pool]
    best = min(d for d, _ in scored)
    if best <= allowed:
        return [c for d, c in scored if d == best][:3]
    prefixed = [c for c in pool if min(len(c), len(name)) >= 3 and (c.startswith(name) or name.startswith(c))]
    return prefixed if len(prefixed) == 1 else []


def _distance(a: str, b: str) -> int:
    """Optimal string alignment distance: edits, a swap of two neighbours counting one."""
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], previous2[j - 2] + 1)
        previous2, previous = previous, row
    return previous[len(b)]


def _mean(names: Sequence[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return (
        "did you mean "
        + (" or ".join(quoted) if len(quoted) <= 2 else ", ".join(quoted[:-1]) + " or " + quoted[-1])
        + "?"
    )


def _dedupe(hints: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(h for h in hints if h))


def _prefix_of(scene: Scene, name: str) -> tuple[str, str] | None:
    """The path written before ``.name``/``:name`` on the failing line, and the
    separator; None when the line is unknown or writes it more than one way."""
    if scene.line_text is None:
        return None
    found = {
        (re.sub(r"\s+", "", m.group(1)), m.group(2))
        for m in re.finditer(_PATH_BEFORE.format(name=re.escape(name)), scene.line_text)
    }
    if len(found) != 1:
        return None
    path, separator = found.pop()
    # `a.b.name` matches as path "a.b"; a longer chain's own prefix is what it is
    return path, separator


def _table_keys(scene: Scene, path: str) -> tuple[str, list[str]] | None:
    """(type, keys) of the value a path names: a local or upvalue of the failing frame,
    else a global (one level of fields known for globals); None when unknown."""
    parts = path.split(".")
    head = parts[0]
    if head in scene.scope:
        return scene.scope[head] if len(parts) == 1 else None
    if head in scene.globals:
        if len(parts) == 1:
            return "table", sorted(scene.globals[head])
        if len(parts) == 2 and head == "_G" and parts[1] in scene.globals:
            return "table", sorted(scene.globals[parts[1]])
    return None


def _removed(scene: Scene, kind: str, name: str) -> str | None:
    """The qualified name of a removed standard function the error is about, if any."""
    if kind == "global" and name in REMOVED and name not in scene.globals and name not in scene.scope:
        return name
    if kind in ("field", "method"):
        prefix = _prefix_of(scene, name)
        if prefix and prefix[0] in ("os", "io", "string", "debug") and prefix[0] not in scene.scope:
            qualified = f"{prefix[0]}.{name}"
            if qualified in REMOVED:
                return qualified
    return None


def _hints(scene: Scene, cause: str) -> list[str]:
    message = scene.message
    hints: list[str] = []
    if cause in ("namespace_error", "bad_argument"):
        # our namespaces' own validation suggests only fields that exist
        hints += [f"did you mean '{m}'?" for m in _DID_YOU_MEAN.findall(message)]
    nil = _NIL_VALUE.search(message)
    if nil and cause != "not_in_sandbox":
        hints += _nil_hints(scene, nil.group(1), nil.group(2))
    if cause == "not_in_sandbox":
        hints += _sandbox_hints(scene)
    elif cause == "missing_main":
        hints += _main_hints(scene)
    elif cause in ("arithmetic", "nil_index") and ("field '?'" in message or "field 'integer index'" in message):
        hints += _index_hints(scene)
    if cause == "arithmetic":
        if (
            re.match(r"attempt to (add|sub|mul|div|mod|pow|unm|idiv) a 'string'", message)
            or "arithmetic on a string" in message
        ):
            hints.append(
                "text that is not a number cannot be used in arithmetic: convert it with tonumber(s) "
                "(nil when it is not a number); join strings with .. instead of +"
            )
        elif message.startswith(("attempt to divide by zero", "attempt to perform 'n")):
            hints.append("integer // and % fail on a zero divisor: check the divisor first (or divide floats)")
    elif cause == "compare":
        if "number with string" in message or "string with number" in message:
            hints.append("convert one side first: tonumber(s) to compare numbers, tostring(n) to compare text")
    elif cause == "concat":
        if "a table value" in message:
            hints.append("turn a table into text with json.encode(t), or table.concat(t, ', ') for a list of strings")
        elif re.search(r"a (nil|boolean) value", message):
            hints.append("wrap the value in tostring(...) to join it, or give it a default: (x or '')")
    elif cause == "type_error":
        hints += _type_hints(scene)
    elif cause == "bad_argument":
        hints += _argument_hints(scene)
    if cause in ("namespace_error", "bad_argument") and scene.line_text:
        for m in re.finditer(r"\b([A-Za-z_]\w*)\s*:\s*([A-Za-z_]\w*)\s*\(", scene.line_text):
            namespace, function = m.groups()
            if (
                namespace in NAMESPACES
                and namespace not in scene.scope
                and function in scene.globals.get(namespace, ())
            ):
                hints.append(
                    f"call namespace functions with '.', not ':': {namespace}.{function}(...) "
                    f"({namespace}:{function} passes the {namespace} table as the first argument)"
                )
                break
    elif cause == "stack_overflow":
        hints.append("deep or endless recursion: check the recursion's base case, or use a loop")
    elif cause == "c_boundary":
        hints.append(
            "call functions that wait for I/O before or after table.sort/string.gsub "
            "(or similar), not from the callback you pass to them"
        )
    return hints


def _nil_hints(scene: Scene, kind: str, name: str) -> list[str]:
    if kind == "global":
        if name in ("params", "args") and name not in scene.globals:
            return [
                "the run got no params: pass them with lua_eval's or job_execute's params, "
                "and read them with a default: (params or {}).name"
            ]
        if name in IDIOMS:
            return [IDIOMS[name]]
        if name in NAMESPACES and name not in scene.globals:
            return [
                f"'{name}' is not available to this run: lua_eval runs get {_EVAL_NAMESPACES}; jobs "
                "(script_store, then job_execute) also get progress and job, and what describe().capabilities "
                "grant; fs needs an fs.read or fs.write capability"
            ]
        candidates = set(scene.globals) | set(scene.scope)
        return [_mean(found)] if (found := closest(name, candidates)) else []
    if kind in ("local", "upvalue", "constant"):
        if name == "self":
            return [
                "self is nil: a function defined with ':' (function T:m()) must be called with ':' "
                "(obj:m()), not obj.m()"
            ]
        return [
            f"'{name}' is nil here: check where it is assigned (a function that returned nothing, a misspelt field)"
        ]
    if kind not in ("field", "method"):
        return []
    prefix = _prefix_of(scene, name)
    if prefix is None:
        if (
            kind == "method"
            and scene.line_text
            and re.search(r"(['\"]|\]\])\s*\)\s*:\s*" + re.escape(name) + r"\b", scene.line_text)
        ):
            return [_mean(found)] if (found := closest(name, scene.globals.get("string", ()))) else []
        return []
    path, _ = prefix
    head = path.split(".")[0]
    qualified = f"{path}.{name}"
    if head not in scene.scope and qualified in IDIOMS:
        return [IDIOMS[qualified]]
    known = _table_keys(scene, path)
    if known is None:
        return []
    kind_of, keys = known
    if kind_of == "string":
        keys = sorted(scene.globals.get("string", ()))
    elif kind_of != "table":
        return []
    if name in keys:
        return []
    ours = head in NAMESPACES and head not in scene.scope and len(path.split(".")) == 1
    found = closest(name, keys, synonyms=ours)
    if found:
        if head in scene.globals and head not in scene.scope and len(path.split(".")) == 1:
            return [_mean([f"{path}.{f}" for f in found])]
        return [_mean(found)]
    if kind == "method" and kind_of == "table" and name in scene.globals.get("table", ()):
        return [f"a plain table has no methods: use table.{name}({path}, ...)"]
    if kind_of != "table":
        return []
    listed = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
    return [f"'{path}' has no field '{name}'" + (f" (it has: {listed})" if keys else " (it has no string keys)")]


def _sandbox_hints(scene: Scene) -> list[str]:
    message = scene.message
    module = _MODULE_NOT_FOUND.search(message)
    if module:
        name = (module.group(1) or module.group(2)).split(".")[0]
        return [f"the C module '{name}' is not available in the sandbox; {C_MODULES[name]}"]
    nil = _NIL_VALUE.search(message)
    if not nil:
        return []
    qualified = _removed(scene, nil.group(1), nil.group(2))
    if qualified is None:
        return []
    if qualified in ("io", "debug") and scene.line_text:
        # name the function the line used, when it is one of the library's
        used = re.search(rf"\b{qualified}\s*\.\s*([A-Za-z_]\w*)", scene.line_text)
        if used:
            specific = f"{qualified}.{used.group(1)}"
            advice = REMOVED.get(specific, REMOVED[qualified])
            return [f"{specific} is not available in the sandbox; {advice}"]
    return [f"{qualified} is not available in the sandbox; {REMOVED[qualified]}"]


def _main_hints(scene: Scene) -> list[str]:
    source = scene.source or ""
    if re.search(r"\blocal\s+function\s+main\b|\blocal\s+main\s*=", source):
        return ["main must be global: write 'function main(params)', not 'local function main'"]
    functions = [g for g in scene.globals if g not in ("describe", "on_shutdown")]
    if (found := closest("main", functions)) and found[0] not in NAMESPACES:
        return [f"'{found[0]}' looks like a misspelt 'main': name it main(params)"]
    return ["add function main(params) ... end with the script's work, returning its result"]


def _index_hints(scene: Scene) -> list[str]:
    line = scene.line_text or ""
    if re.search(r"\[\s*0\s*\]", line) or re.search(r"\bfor\s+[A-Za-z_]\w*\s*=\s*0\s*,", scene.source or ""):
        return ["Lua arrays start at 1: t[1] is the first element and t[#t] the last (t[0] is nil)"]
    if re.search(r"\[\s*#\s*[A-Za-z_][\w.]*\s*\+\s*1\s*\]", line):
        return ["t[#t + 1] is one past the end: the last element is t[#t]"]
    return []


def _type_hints(scene: Scene) -> list[str]:
    message = scene.message
    if re.match(r"attempt to index a (number|boolean) value", message):
        return ["numbers and booleans have no fields or methods: convert with tostring(x) first if you meant text"]
    if re.match(r"attempt to index a function value", message):
        return ["that value is a function: call it, f(), and index its result"]
    if re.match(r"attempt to get length of a (number|boolean|nil) value", message):
        return ["# works on strings and tables only"]
    if message.startswith("attempt to call a table value") and "for iterator" in message:
        return ["iterate a table with ipairs(t) (arrays, in order) or pairs(t) (any keys): for i, v in ipairs(t) do"]
    if re.match(r"'for' (initial value|limit|step) must be a number|bad 'for' ", message):
        if "got string" in message:
            return ["convert the bound with tonumber(x) first"]
        return ["the start, limit and step of a numeric for must be numbers; iterate a table with ipairs or pairs"]
    return []


def _argument_hints(scene: Scene) -> list[str]:
    message = scene.message
    hints: list[str] = []
    bad = _BAD_ARGUMENT.match(message)
    if not bad:
        return hints
    function, detail = bad.group(2), bad.group(3)
    if detail.endswith("got no value") and scene.line_text:
        for m in re.finditer(r"\b([A-Za-z_]\w*)\s*\.\s*" + re.escape(function) + r"\s*\(", scene.line_text):
            owner = m.group(1)
            kind_of = scene.scope.get(owner, ("", []))[0]
            if kind_of in ("string", "table") and owner not in ("string", "table"):
                hints.append(
                    f"call methods with ':': {owner}:{function}(...) passes {owner} as the first argument, "
                    f"{owner}.{function}(...) does not"
                )
                break
    if detail.startswith("number expected, got string"):
        hints.append("convert the text with tonumber(s) first (nil when it is not a number)")
    elif detail == "number has no integer representation":
        hints.append("this argument must be an integer: round it with math.floor(x) (or math.tointeger)")
    elif detail.startswith("string expected, got table"):
        hints.append("turn a table into text with json.encode(t), or table.concat(t) for a list of strings")
    return hints


_SYNTAX: Final[tuple[tuple[str, str], ...]] = (
    (
        r"^'end' expected",
        "a block is not closed: add the missing 'end' (function, if, for, while and do each need one)",
    ),
    (r"^<eof> expected near 'end'", "there is one 'end' too many, or a block was closed early"),
    (r"syntax error near '[+-]'", "a statement cannot be an expression: Lua has no ++ or +=, write x = x + 1"),
    (r"near '!'", "Lua writes not-equal as ~= and negation as not"),
    (r"near '(&|\|)'", "Lua's logical operators are and, or, not (bitwise: &, |, ~ on integers)"),
    (r"^'do' expected", "a loop's body starts with do: for i = 1, n do ... end, while cond do ... end"),
    (r"^'then' expected", "an if's condition ends with then: if cond then ... end"),
    (r"^unfinished string", "close the string with the quote it opened with; [[...]] holds text over several lines"),
)


def syntax_hints(message: str) -> list[str]:
    """What a parser message usually means, for the common cases."""
    return [hint for pattern, hint in _SYNTAX if re.search(pattern, message)][:1]
