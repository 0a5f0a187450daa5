"""The one nesting limit of every decoder (``hooteproto.depth.MAX_DEPTH``, 128).

For each decoder the daemon runs: wire bodies (HOOT01 MsgPack and JSON, legacy
envelopes), ``json.decode`` and the values crossing into and out of Lua, model backend
answers, garden replies and the front <-> worker channel.  A document up to the limit
decodes; a deeper one gets the named error (``nested deeper than 128 levels``), never a
``RecursionError``, whether it is one level too deep or 100,000.  Hypothesis builds the
documents both deep and wide (siblings at every level, strings full of brackets and of
bytes that look like MessagePack headers), and an independent oracle measures them.
"""

from __future__ import annotations

import asyncio
import json as pyjson
import uuid
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from hooteproto import frames
from hooteproto import garden as g
from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import (
    DecodeError,
    Encoding,
    decode_envelope,
    envelope_codec,
    payload_codec,
    peek_envelope_id,
)
from hooteproto.depth import (
    CARRIER_DEPTH,
    MAX_DEPTH,
    TooDeepError,
    check_json,
    check_msgpack,
    check_value,
    decode_json,
    decode_msgpack,
    peek,
)
from hooteproto.frames import Command
from luanette.backends import Backends, BackendUnavailable
from luanette.cas import Cas
from luanette.engine import channel as ch
from luanette.engine.api import CancelToken, Limits, ScriptError
from luanette.engine.pool import RunHooks
from luanette.garden import GardenClient, GardenError, GardenSettings
from luanette.luaconv import to_lua
from luanette.runtime import run_script
from luanette.settings import parse_settings
from luanette.stdlib.json import JsonNamespace
from luanette.stdlib.models import model_namespaces
from tests.strategies import strategy_for
from tests.test_server import hoot, raw_exchange

pytestmark = pytest.mark.timeout(120)

TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"
HUGE = 100_000  # far past what Python's stack (and msgspec's recursion) could take


# --- building documents, and an oracle ------------------------------------------------


def depth_of(value: Any) -> int:
    """Levels of lists and dicts in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, tuple, dict)):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def chain(depth: int, leaf: Any = 0) -> Any:
    """``[[...[leaf]...]]`` exactly ``depth`` levels deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# Text that a naive count would take for nesting: JSON brackets and quotes, and
# characters whose UTF-8 bytes look like MessagePack array and map headers (0x80-0x9f).
tricky_text = st.text(alphabet='[]{}",:\\ aé€ā', max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text
)
flat = scalars | st.lists(scalars, max_size=3) | st.dictionaries(tricky_text, scalars, max_size=3)


@st.composite
def nested(draw: st.DrawFn, depth: int) -> Any:
    """A value exactly ``depth`` levels deep, wide at every level: the deep child sits
    among siblings that are scalars, flat containers or chains of any smaller depth."""
    value = draw(scalars)
    for below in range(depth):  # `below`: the levels under the container made now
        siblings = draw(
            st.lists(
                scalars if below == 0 else flat | st.integers(0, below).map(chain),
                max_size=2,
            )
        )
        at = draw(st.integers(0, len(siblings)))
        items = [*siblings[:at], value, *siblings[at:]]
        if draw(st.booleans()):
            value = items
        else:
            keys = draw(st.lists(tricky_text, min_size=len(items), max_size=len(items), unique=True))
            value = dict(zip(keys, items, strict=True))
    return value


def around(limit: int) -> st.SearchStrategy[int]:
    """Depths near ``limit`` (both sides of it), and now and then any smaller one."""
    return st.integers(limit - 3, limit + 3) | st.integers(0, limit + 8)


def values(limit: int = MAX_DEPTH) -> st.SearchStrategy[Any]:
    return around(limit).flatmap(nested)


def splice(encoded: bytes, marker: str, replacement: bytes, encoding: Encoding) -> bytes:
    """``encoded`` with the encoding of the string ``marker`` replaced by raw bytes: how a
    document too deep for any encoder is made."""
    as_bytes = (msgspec.json if encoding is Encoding.JSON else msgspec.msgpack).encode(marker)
    assert encoded.count(as_bytes) == 1
    return encoded.replace(as_bytes, replacement)


def deep_bytes(depth: int, encoding: Encoding) -> bytes:
    """A document ``depth`` levels deep: arrays (JSON) or fixarrays (MsgPack) of one."""
    if encoding is Encoding.JSON:
        return b"[" * depth + b"0" + b"]" * depth
    return b"\x91" * depth + b"\x00"


MARK = "\x00deep\x00"


# --- the checker itself ---------------------------------------------------------------


@settings(max_examples=60)
@given(values())
def test_checks_and_decoders_agree_with_the_oracle(value: Any) -> None:
    deep = depth_of(value) > MAX_DEPTH
    as_json, as_msgpack = msgspec.json.encode(value), msgspec.msgpack.encode(value)
    for check, decode, data in ((check_json, decode_json, as_json), (check_msgpack, decode_msgpack, as_msgpack)):
        if deep:
            with pytest.raises(TooDeepError, match=TOO_DEEP):
                check(data)
            with pytest.raises(TooDeepError, match=TOO_DEEP):
                decode(data)
        else:
            check(data)
            assert decode(data) == value
    if deep:
        with pytest.raises(TooDeepError, match=TOO_DEEP):
            check_value(value)
    else:
        check_value(value)


@pytest.mark.parametrize("encoding", [Encoding.JSON, Encoding.COMPACT])
@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, HUGE])
def test_far_too_deep_is_the_named_error_never_recursion(encoding: Encoding, depth: int) -> None:
    data = deep_bytes(depth, encoding)
    check, decode = (check_json, decode_json) if encoding is Encoding.JSON else (check_msgpack, decode_msgpack)
    with pytest.raises(TooDeepError, match=TOO_DEEP):
        check(data)
    with pytest.raises(TooDeepError, match=TOO_DEEP):
        decode(data)
    assert decode(deep_bytes(MAX_DEPTH, encoding)) == chain(MAX_DEPTH)


def test_a_cycle_is_too_deep() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(TooDeepError):
        check_value(loop)
    with pytest.raises(ValueError, match=TOO_DEEP):
        to_lua({"a": loop})


@settings(max_examples=100)
@given(strategy_for(t.Envelope), st.sampled_from(list(Encoding)), st.data())
def test_peek_reads_the_envelope_id_without_the_rest(envelope: t.Envelope, encoding: Encoding, data) -> None:
    body = envelope_codec.encode(envelope, encoding)
    assert peek_envelope_id(body) == (envelope.id, encoding)
    # what follows the id may be cut anywhere, or be anything
    json = encoding is Encoding.JSON
    cut = body[: data.draw(st.integers(len(body) // 2, len(body)))]
    found = peek_envelope_id(cut)[0]
    assert found in (envelope.id, None)
    if encoding is not Encoding.JSON:  # the id comes first and is whole in the second half
        assert peek(body, (0,) if encoding is Encoding.COMPACT else ("id",), json=json) == envelope.id.bytes


# --- wire bodies ----------------------------------------------------------------------


@settings(max_examples=60)
@given(values(MAX_DEPTH - 1), st.sampled_from(list(Encoding)))
def test_wire_bodies_decode_up_to_the_limit(params: Any, encoding: Encoding) -> None:
    payload = t.LuaEval(code="return params", params=params)
    body = payload_codec.encode(payload, encoding)
    assert depth_of(msgspec.msgpack.decode(body) if encoding is not Encoding.JSON else msgspec.json.decode(body)) == (
        1 + depth_of(params)
    )
    if 1 + depth_of(params) <= MAX_DEPTH:
        assert payload_codec.decode(body, encoding) == payload
    else:
        with pytest.raises(DecodeError, match=TOO_DEEP):
            payload_codec.decode(body, encoding)


@settings(max_examples=60)
@given(values(MAX_DEPTH - 2), st.sampled_from(list(Encoding)))
def test_legacy_envelopes_decode_up_to_the_limit_and_keep_their_id(params: Any, encoding: Encoding) -> None:
    envelope = t.Envelope(id=uuid.uuid4(), traceparent=None, payload=t.LuaEval(code="", params=params))
    body = envelope_codec.encode(envelope, encoding)
    if 2 + depth_of(params) <= MAX_DEPTH:
        assert decode_envelope(body) == envelope
    else:
        with pytest.raises(DecodeError, match=TOO_DEEP):
            decode_envelope(body)
    assert peek_envelope_id(body) == (envelope.id, encoding)


def deep_request(encoding: Encoding, depth: int) -> bytes:
    """A LuaEval body whose params are ``depth`` levels deep (the body one more)."""
    body = payload_codec.encode(t.LuaEval(code="return 1", params=MARK), encoding)
    return splice(body, MARK, deep_bytes(depth, encoding), encoding)


def deep_envelope(encoding: Encoding, depth: int, rid: uuid.UUID) -> bytes:
    envelope = t.Envelope(id=rid, traceparent=None, payload=t.LuaEval(code="return 1", params=MARK))
    return splice(envelope_codec.encode(envelope, encoding), MARK, deep_bytes(depth, encoding), encoding)


@pytest.mark.parametrize("encoding", list(Encoding))
@pytest.mark.parametrize("depth", [1000, HUGE])
def test_far_too_deep_wire_bodies_are_decode_errors(encoding: Encoding, depth: int) -> None:
    with pytest.raises(DecodeError, match=TOO_DEEP):
        payload_codec.decode(deep_request(encoding, depth), encoding)
    rid = uuid.uuid4()
    body = deep_envelope(encoding, depth, rid)
    with pytest.raises(DecodeError, match=TOO_DEEP):
        decode_envelope(body)
    assert peek_envelope_id(body) == (rid, encoding)


def test_readers_of_replies_allow_for_the_reply_around_a_result() -> None:
    # a result MAX_DEPTH deep, in job_poll's reply: success -> result -> completed -> job -> result
    info = {"job_id": "j", "status": "complete", "result": chain(MAX_DEPTH)}
    reply = t.Success(result={"completed": [info], "pending": [], "timed_out": False})
    body = payload_codec.encode(reply, Encoding.COMPACT)
    with pytest.raises(DecodeError, match=TOO_DEEP):  # as a request it would be refused
        payload_codec.decode(body)
    assert payload_codec.decode(body, max_depth=MAX_DEPTH + CARRIER_DEPTH) == reply


def _no_recursion_logged(logs: list[dict]) -> None:
    for entry in logs:
        assert "RecursionError" not in repr(entry), entry
        assert entry.get("log_level") != "error" and "exc_info" not in entry, entry


@pytest.mark.parametrize("encoding", list(Encoding))
async def test_a_body_1000_deep_gets_bad_request_under_its_request_id(server, zctx, encoding: Encoding) -> None:
    rid = uuid.uuid4()
    request = hoot(t.Ping(), encoding, rid)
    request.body = deep_request(encoding, 1000)
    with capture_logs() as logs:
        reply = frames.parse(await raw_exchange(zctx, server.endpoint, request.to_frames()))
    assert reply.command is Command.REPLY and reply.request_id == rid
    error = payload_codec.decode(reply.body, reply.body_encoding())
    assert isinstance(error, t.Error) and error.code == "bad_request"
    assert TOO_DEEP in error.message and TOO_DEEP in error.details["reason"]
    _no_recursion_logged(logs)
    assert any(e["event"] == "request.malformed" for e in logs)
    assert server.server.stats.malformed == 1 and server.server.stats.internal_errors == 0
    # the loop serves on, and a body at the limit is a request like any other
    async with Client(server.endpoint, encoding=encoding) as c:
        ok = await c.request(t.LuaEval(code="return #params", params=chain(MAX_DEPTH - 1)), timeout=30)
        assert isinstance(ok, t.Success) and ok.result["result"] == 1
        # and its result comes back whole, inside a reply that is deeper than it
        echo = await c.request(t.LuaEval(code="return params", params=chain(MAX_DEPTH - 1, "x")), timeout=30)
        assert isinstance(echo, t.Success) and echo.result["result"] == chain(MAX_DEPTH - 1, "x")


@pytest.mark.parametrize("encoding", list(Encoding))
async def test_a_legacy_envelope_1000_deep_gets_bad_request_under_its_id(server, zctx, encoding: Encoding) -> None:
    rid = uuid.uuid4()
    with capture_logs() as logs:
        raw = await raw_exchange(zctx, server.endpoint, [deep_envelope(encoding, 1000, rid)])
    reply = envelope_codec.decode(raw[-1], encoding)
    assert reply.id == rid
    assert isinstance(reply.payload, t.Error) and reply.payload.code == "bad_request"
    assert TOO_DEEP in reply.payload.message
    _no_recursion_logged(logs)
    assert server.server.stats.internal_errors == 0


# --- Lua: json.decode, json.encode, results, params -------------------------------------

JSON = [JsonNamespace()]
ROUND_TRIP = """
local ok, value = pcall(json.decode, params.text)
if not ok then return {ok = false, err = value} end
return {ok = true, text = json.encode(value)}
"""


@settings(max_examples=60)
@given(values())
async def test_json_decode_in_lua_up_to_the_limit_else_a_catchable_error(value: Any) -> None:
    text = msgspec.json.encode(value).decode()
    out = (await run_script(ROUND_TRIP, {"text": text}, namespaces=JSON)).result
    if depth_of(value) <= MAX_DEPTH:
        assert out["ok"] is True, out
        assert pyjson.loads(out["text"]) == pyjson.loads(text)
    else:
        assert out["ok"] is False
        assert out["err"].startswith("json.decode: ") and TOO_DEEP in out["err"], out["err"]
        assert "internal error" not in out["err"]


async def test_json_decode_far_too_deep_is_a_catchable_error() -> None:
    text = deep_bytes(HUGE, Encoding.JSON).decode()
    out = (await run_script(ROUND_TRIP, {"text": text}, namespaces=JSON)).result
    assert out["ok"] is False and f"json.decode: text is {TOO_DEEP}" in out["err"]


# a table `params.n` levels deep (n >= 1), built in a loop
LUA_DEEP = "local t = {} local c = t for i = 2, params.n do c[1] = {} c = c[1] end\n"


@settings(max_examples=25)
@given(around(MAX_DEPTH).filter(lambda n: n >= 1))
async def test_lua_tables_up_to_the_limit_encode_and_return(n: int) -> None:
    code = LUA_DEEP + "local ok, text = pcall(json.encode, t) return {ok = ok, text = text}"
    out = (await run_script(code, {"n": n}, namespaces=JSON)).result
    if n <= MAX_DEPTH:
        assert out["ok"] is True and pyjson.loads(out["text"]) == chain(n - 1, {})
        assert (await run_script(LUA_DEEP + "return t", {"n": n})).result == chain(n - 1, {})
    else:
        assert out["ok"] is False and TOO_DEEP in out["text"], out
        with pytest.raises(ScriptError) as info:
            await run_script(LUA_DEEP + "return t", {"n": n})
        assert info.value.detail.kind == "result_not_serializable" and TOO_DEEP in info.value.detail.message


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        (LUA_DEEP + "return json.encode(t)", TOO_DEEP),
        ("local t = {} t.self = t return json.encode(t)", "contains itself"),
        ("local t = {1, {2, {}}} t[2][2].up = t return json.encode(t)", "contains itself"),
    ],
)
async def test_json_encode_of_deep_or_cyclic_tables_is_a_clear_error(code: str, fragment: str) -> None:
    catching = f"local ok, err = pcall(function() {code} end) return {{ok, err}}"
    ok, err = (await run_script(catching, {"n": HUGE}, namespaces=JSON)).result
    assert ok is False and fragment in err and "json.encode" in err, err


@pytest.mark.parametrize(
    ("code", "fragment"),
    [(LUA_DEEP + "return t", TOO_DEEP), ("local t = {} t[1] = t return t", "contains itself")],
)
async def test_deep_or_cyclic_results_are_not_serializable(code: str, fragment: str) -> None:
    with pytest.raises(ScriptError) as info:
        await run_script(code, {"n": HUGE})
    assert info.value.detail.kind == "result_not_serializable"
    assert fragment in info.value.detail.message


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, HUGE])
async def test_params_too_deep_for_lua_are_invalid_params(depth: int) -> None:
    with pytest.raises(ScriptError) as info:
        await run_script("return 1", chain(depth))
    assert info.value.detail.kind == "invalid_params" and TOO_DEEP in info.value.detail.message
    assert (await run_script("return params", chain(MAX_DEPTH))).result == chain(MAX_DEPTH)


# --- the front <-> worker channel -------------------------------------------------------


async def test_the_channel_carries_values_at_the_limit_and_refuses_deeper_params(make_server) -> None:
    running = await make_server(workers=1)
    engine = running.server.engine

    async def run(params: Any) -> Any:
        outcome = await engine.run(
            "return params",
            params,
            limits=Limits(timeout_s=10.0),
            info=ch.RunInfo("eval"),
            cancel=CancelToken(),
            hooks=RunHooks(lambda: None),
        )
        return outcome.result

    with capture_logs() as logs:
        # Run.params and Done.result at the limit cross both ways
        assert await run({"p": chain(MAX_DEPTH - 1, "leaf")}) == {"p": chain(MAX_DEPTH - 1, "leaf")}
        for depth in (MAX_DEPTH + 1, HUGE):
            with pytest.raises(ScriptError) as info:
                await run(chain(depth))
            assert info.value.detail.kind == "invalid_params" and TOO_DEEP in info.value.detail.message
        assert await run(1) == 1  # the worker is fine
    _no_recursion_logged(logs)
    assert engine.stats.workers_lost == 0


def test_every_channel_message_at_the_limit_decodes() -> None:
    value = chain(MAX_DEPTH)
    limits = Limits()
    for message, decoder in (
        (ch.Run(run=1, code="", params=value, chunk_name="x", limits=limits, info=ch.RunInfo("eval")), ch.to_worker),
        (ch.Answer(call=1, ok=True, value=value), ch.to_worker),
        (ch.Done(run=1, result=value), ch.to_front),
        (ch.Call(call=1, run=1, service="backend", args=["x", "/", value, None, "POST"]), ch.to_front),
        (ch.Note(run=1, kind="log", data=["info", "x", {"deep": value}]), ch.to_front),
    ):
        frame = ch.encoder.encode(message)
        check_msgpack(frame, MAX_DEPTH + CARRIER_DEPTH)
        assert decoder.decode(frame) == message


# --- model backends ---------------------------------------------------------------------


class _Backend:
    """A loopback HTTP server answering every request with the body it is given."""

    def __init__(self) -> None:
        self.status = 200
        self.body = b"{}"
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _answer(self, request: web.Request) -> web.Response:
        return web.Response(status=self.status, body=self.body, content_type="application/json")

    async def start(self) -> _Backend:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def http():
    backend = await _Backend().start()
    yield backend
    await backend.stop()


def backend_settings(url: str):
    return parse_settings({"backends": {"deep": {"url": url, "retries": 0}}}, source="test")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=values())
async def test_backend_answers_up_to_the_limit_else_backend_unavailable(http, value: Any) -> None:
    http.status, http.body = 200, msgspec.json.encode(value)
    async with Backends(backend_settings(http.url).backends) as backends:
        if depth_of(value) <= MAX_DEPTH:
            assert await backends.call("deep", "/predict", {}, deadline=None) == value
        else:
            with pytest.raises(BackendUnavailable, match=f"answered HTTP 200 with JSON {TOO_DEEP}"):
                await backends.call("deep", "/predict", {}, deadline=None)


async def test_backend_bodies_far_too_deep_are_backend_unavailable_in_lua_too(http, tmp_path) -> None:
    settings_ = backend_settings(http.url)
    async with Backends(settings_.backends) as backends:
        namespaces = model_namespaces(backends, Cas(tmp_path / "cas"), settings_.models)
        code = "local ok, err = pcall(backend.call, 'deep', {}) return {ok, err}"
        for status in (200, 500):  # an answer, and an error body (its detail is read too)
            http.status, http.body = status, deep_bytes(HUGE, Encoding.JSON)
            with capture_logs() as logs:
                ok, err = (await run_script(code, namespaces=namespaces)).result
            assert ok is False and "backend_unavailable" in err and "internal error" not in err, err
            assert (TOO_DEEP in err) == (status == 200), err
            _no_recursion_logged(logs)


async def test_backend_answers_cross_the_channel_at_the_limit_and_fail_beyond(make_server, http) -> None:
    running = await make_server(settings=backend_settings(http.url), workers=1)

    async def job(code: str) -> Any:  # the model namespaces are a job's
        async with Client(running.endpoint) as c:
            stored = await c.request(t.ScriptStore(content=code))
            started = await c.request(t.JobExecute(script_hash=stored.result["hash"], params={}))
            polled = await c.request(
                t.JobPoll(job_ids=[started.result["job_id"]], timeout_ms=20_000, mode=t.PollMode.ALL), timeout=30
            )
        info = polled.result["completed"][0]
        assert info["status"] == "complete", info
        return info["result"]

    # an answer at the limit: Answer in, Done out, the store, and a job_poll reply around it
    http.body = msgspec.json.encode({"deep": chain(MAX_DEPTH - 1)})
    assert await job("return backend.call('deep', {})") == {"deep": chain(MAX_DEPTH - 1)}
    http.body = deep_bytes(1000, Encoding.JSON)
    ok, err = await job("local ok, err = pcall(backend.call, 'deep', {}) return {ok, err}")
    assert ok is False and "backend_unavailable" in err and TOO_DEEP in err, err


# --- garden replies ---------------------------------------------------------------------


async def _garden_exchange(reply_body: Any) -> Any:
    """Send one request through a GardenClient to a raw peer that answers with
    ``reply_body(request_header)``; the client's result, or the exception it raised."""
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    async def answer() -> None:
        identity, body = await router.recv_multipart()
        header = g.shell_request_codec.decode(body).header
        await router.send_multipart([identity, reply_body(header)])

    try:
        async with GardenClient(GardenSettings(endpoint=f"tcp://127.0.0.1:{port}", timeout_s=30.0)) as client:
            peer = asyncio.create_task(answer())
            try:
                return await client.request(g.GetTransportState())
            except (GardenError, DecodeError) as exc:
                return exc
            finally:
                await peer
    finally:
        router.close(0)


@settings(max_examples=20, deadline=None)
@given(values(MAX_DEPTH - 2), st.sampled_from(list(Encoding)))
async def test_garden_replies_up_to_the_limit_else_a_garden_error(result: Any, encoding: Encoding) -> None:
    def reply(header: g.MessageHeader) -> bytes:
        return g.shell_reply_codec.encode(g.ShellReplyMessage.reply(header, g.Ok(result=result)), encoding)

    sample = reply(g.MessageHeader.new(uuid.uuid4(), "shell_request"))
    depth = depth_of(msgspec.json.decode(sample) if encoding is Encoding.JSON else msgspec.msgpack.decode(sample))
    got = await _garden_exchange(reply)
    if depth <= MAX_DEPTH:
        assert got == g.Ok(result=result)
    else:
        # failed on the reply itself (its request named by the parent header), not a timeout
        assert isinstance(got, GardenError) and "unreadable reply from the garden" in str(got)
        assert TOO_DEEP in str(got)


@pytest.mark.parametrize("encoding", list(Encoding))
async def test_a_garden_reply_far_too_deep_fails_its_request_at_once(encoding: Encoding) -> None:
    def reply(header: g.MessageHeader) -> bytes:
        body = g.shell_reply_codec.encode(g.ShellReplyMessage.reply(header, g.Ok(result=MARK)), encoding)
        return splice(body, MARK, deep_bytes(HUGE, encoding), encoding)

    with capture_logs() as logs:
        got = await _garden_exchange(reply)
    assert isinstance(got, GardenError) and TOO_DEEP in str(got)
    _no_recursion_logged([e for e in logs if e.get("event") != "garden.bad_reply"])
    assert all("RecursionError" not in repr(e) for e in logs)
