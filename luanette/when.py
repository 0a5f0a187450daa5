"""``when`` conditions of trigger rules: a small, side-effect-free expression language
over a timeline event (see docs/configuration.md, ``[[triggers]]``).

Grammar (keywords are lower case; whitespace between tokens is free)::

    condition  := or_expr
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | comparison
    comparison := operand [ ("==" | "!=" | "<" | "<=" | ">" | ">=") operand
                          | ["not"] "in" list ]
    operand    := literal | path | "(" or_expr ")"
    list       := "[" [ literal ("," literal)* [","] ] "]"
    literal    := number | string | "true" | "false" | "null"
    path       := "event_type" | "position_beats" | "tempo"
                | "metadata" ("." key)*          key: letters, digits, "_", "-"

Numbers are decimal (``8``, ``-1.5``, ``2e3``); strings are in single or double quotes
with ``\\`` escaping the next character.  Values:

* a path the event does not have (``metadata.nope``) is ``null``;
* ``==``/``!=`` are exact equality and its negation: ``null == null`` is true,
  ``metadata.nope != 5`` is true, a boolean is never equal to a number;
* ``<``, ``<=``, ``>``, ``>=`` are true only between two numbers or two strings
  (anything compared with ``null`` or with another type: false);
* ``x in [a, b]`` is ``x == a or x == b``; ``not in`` its negation;
* ``and``/``or``/``not`` (short-circuit) take an operand as true only when it is the
  boolean ``true``: a bare path ``metadata.urgent`` holds when that field is ``true``.

The parser is a recursive descent over at most :data:`MAX_LENGTH` characters with
nesting at most :data:`MAX_DEPTH` deep; evaluation only reads the event's fields (JSON
values: dicts are looked into by key, nothing else is).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Final

MAX_LENGTH: Final = 2000
"""Longest condition accepted, in characters."""
MAX_DEPTH: Final = 32
"""Deepest nesting of parentheses and ``not`` accepted."""
ROOTS: Final = ("event_type", "position_beats", "tempo", "metadata")
_COMPARE: Final = ("==", "!=", "<=", ">=", "<", ">")
_KEYWORDS: Final = ("and", "or", "not", "in", "true", "false", "null")
_NUMBER: Final = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_WORD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY: Final = re.compile(r"[A-Za-z0-9_\-]+")


class WhenError(ValueError):
    """A condition that cannot be parsed; ``position`` is the 1-based character where
    the problem is (0 for the whole text)."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at character {position}" if position else message)
        self.position = position


# --- tokens --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "op" (punctuation and comparisons), "kw", "num", "str", "path", "end"
    value: Any
    position: int  # 1-based


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
            continue
        at = i + 1
        two = text[i : i + 2]
        if two in ("==", "!=", "<=", ">="):
            out.append(_Token("op", two, at))
            i += 2
        elif c in "<>()[],":
            out.append(_Token("op", c, at))
            i += 1
        elif c in "'\"":
            chars: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise WhenError("unterminated string", at)
                if text[i] == c:
                    i += 1
                    break
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(text[i])
                i += 1
            out.append(_Token("str", "".join(chars), at))
        elif (number := _NUMBER.match(text, i)) is not None and (c != "-" or number.end() > i + 1):
            literal = number[0]
            value: float | int = float(literal) if any(ch in literal for ch in ".eE") else int(literal)
            if isinstance(value, float) and not math.isfinite(value):
                raise WhenError(f"number {literal} is out of range", at)
            out.append(_Token("num", value, at))
            i = number.end()
        elif (word := _WORD.match(text, i)) is not None:
            name = word[0]
            i = word.end()
            if name in _KEYWORDS:
                out.append(_Token("kw", name, at))
                continue
            if name not in ROOTS:
                raise WhenError(f"unknown field {name!r} (known: {', '.join(ROOTS[:3])}, metadata.<key>)", at)
            parts = [name]
            while i < n and text[i] == ".":
                key = _KEY.match(text, i + 1)
                if key is None:
                    raise WhenError("expected a key after '.'", i + 2)
                parts.append(key[0])
                i = key.end()
            if name != "metadata" and len(parts) > 1:
                raise WhenError(f"{name} has no fields (only metadata.<key> has)", at)
            out.append(_Token("path", tuple(parts), at))
        else:
            raise WhenError(f"unexpected character {c!r}", at)
    out.append(_Token("end", None, n + 1))
    return out


# --- the tree ------------------------------------------------------------------------
# ("lit", value) | ("path", parts) | ("not", node) | ("and"/"or", [nodes])
# | ("cmp", op, left, right) | ("in", node, [values], negated)

Node = tuple[Any, ...]


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def accept(self, kind: str, value: Any) -> bool:
        token = self.peek()
        if token.kind == kind and token.value == value:
            self.i += 1
            return True
        return False

    def expect(self, kind: str, value: Any, what: str) -> None:
        if not self.accept(kind, value):
            self.fail(f"expected {what}")

    def fail(self, message: str) -> None:
        token = self.peek()
        found = "the end" if token.kind == "end" else repr(_show(token))
        raise WhenError(f"{message}, found {found}", token.position)

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise WhenError(f"nested more than {MAX_DEPTH} deep", self.peek().position)

    def condition(self) -> Node:
        node = self.or_expr()
        if self.peek().kind != "end":
            self.fail("expected 'and', 'or' or the end")
        return node

    def or_expr(self) -> Node:
        items = [self.and_expr()]
        while self.accept("kw", "or"):
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else ("or", items)

    def and_expr(self) -> Node:
        items = [self.not_expr()]
        while self.accept("kw", "and"):
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else ("and", items)

    def not_expr(self) -> Node:
        if self.accept("kw", "not"):
            self.nest()
            node = self.not_expr()
            self.depth -= 1
            return ("not", node)
        return self.comparison()

    def comparison(self) -> Node:
        left = self.operand()
        token = self.peek()
        if token.kind == "op" and token.value in _COMPARE:
            self.i += 1
            return ("cmp", token.value, left, self.operand())
        negated = False
        if token.kind == "kw" and token.value == "not":
            following = self.tokens[self.i + 1]
            if following.kind == "kw" and following.value == "in":
                self.i += 1
                negated = True
        if self.accept("kw", "in"):
            return ("in", left, self.literal_list(), negated)
        return left

    def operand(self) -> Node:
        token = self.peek()
        if token.kind == "op" and token.value == "(":
            self.i += 1
            self.nest()
            node = self.or_expr()
            self.depth -= 1
            self.expect("op", ")", "')'")
            return node
        if token.kind == "path":
            self.i += 1
            return ("path", token.value)
        return ("lit", self.literal())

    def literal(self) -> Any:
        token = self.peek()
        if token.kind in ("num", "str"):
            self.i += 1
            return token.value
        if token.kind == "kw" and token.value in ("true", "false", "null"):
            self.i += 1
            return {"true": True, "false": False, "null": None}[token.value]
        self.fail("expected a value (a field, a number, a string, true, false, null or '(')")
        raise AssertionError  # fail() raises

    def literal_list(self) -> list[Any]:
        self.expect("op", "[", "'[' after 'in'")
        values: list[Any] = []
        while not self.accept("op", "]"):
            values.append(self.literal())
            if not self.accept("op", ","):
                self.expect("op", "]", "',' or ']'")
                break
        return values


def _show(token: _Token) -> str:
    if token.kind == "path":
        return ".".join(token.value)
    if token.kind == "str":
        return repr(token.value)
    return str(token.value)


@dataclass(frozen=True)
class Condition:
    """A parsed ``when`` condition; :meth:`holds` evaluates it over an event."""

    text: str
    tree: Node

    def holds(self, event: Any) -> bool:
        """Whether the condition is true for ``event`` (a mapping with the event's
        fields, or an object with ``event_type``, ``position_beats``, ``tempo`` and
        ``metadata`` attributes)."""
        return _evaluate(self.tree, event) is True


def parse(text: str) -> Condition:
    """Parse a condition. Raises :class:`WhenError` (with the position) when it is not
    one, is longer than :data:`MAX_LENGTH` or nests deeper than :data:`MAX_DEPTH`."""
    if not isinstance(text, str):
        raise WhenError(f"a condition is a string, got {type(text).__name__}", 0)
    if len(text) > MAX_LENGTH:
        raise WhenError(f"the condition is {len(text)} characters long, more than the limit of {MAX_LENGTH}", 0)
    if not text.strip():
        raise WhenError("the condition is empty", 0)
    return Condition(text, _Parser(text).condition())


# --- evaluation ----------------------------------------------------------------------


def _field(event: Any, parts: tuple[str, ...]) -> Any:
    root = parts[0]
    if isinstance(event, dict):
        value = event.get(root)
    else:
        # only the four known event fields are read, never arbitrary attributes
        value = {
            "event_type": lambda: getattr(getattr(event, "event_type", None), "value", None),
            "position_beats": lambda: getattr(event, "position_beats", None),
            "tempo": lambda: getattr(event, "tempo", None),
            "metadata": lambda: getattr(event, "metadata", None),
        }[root]()
    for key in parts[1:]:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if type(a) is not type(b):
        return False
    return bool(a == b)


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return _equal(a, b)
    if op == "!=":
        return not _equal(a, b)
    if not ((_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))):
        return False
    if op == "<":
        return bool(a < b)
    if op == "<=":
        return bool(a <= b)
    if op == ">":
        return bool(a > b)
    return bool(a >= b)


def _evaluate(node: Node, event: Any) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "path":
        return _field(event, node[1])
    if kind == "not":
        return _evaluate(node[1], event) is not True
    if kind == "and":
        return all(_evaluate(item, event) is True for item in node[1])
    if kind == "or":
        return any(_evaluate(item, event) is True for item in node[1])
    if kind == "cmp":
        return _compare(node[1], _evaluate(node[2], event), _evaluate(node[3], event))
    # "in"
    value = _evaluate(node[1], event)
    found = any(_equal(value, item) for item in node[2])
    return found != node[3]
