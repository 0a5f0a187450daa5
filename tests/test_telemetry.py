"""OpenTelemetry: the span tree of requests, evals, jobs and backend calls; otel.*; logs
carrying trace ids; OTLP export to a real HTTP collector on loopback."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

import pytest
import zmq
from aiohttp import web
from google.protobuf.message import Message
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry import trace
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from hooteproto import types as t
from hooteproto.client import Client
from hooteproto.codec import Encoding, envelope_codec
from luanette.cas import hash_bytes
from luanette.runtime import ScriptError, run_script
from luanette.sim import run_models
from luanette.stdlib.otel import OtelNamespace
from luanette.telemetry import (
    PARAM_VALUE_MAX,
    Telemetry,
    log_record,
    looks_secret,
    observe_pool,
    otlp_url,
    param_attributes,
    parent_context,
)
from tests.test_backends import settings_for
from tests.test_jobs import run, store, wait_done
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TP = f"00-{TRACE}-{PARENT}-01"


class Traced:
    """A Telemetry whose spans and metrics land in memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        self.telemetry = Telemetry(span_exporter=self.spans, metric_reader=self.metrics)

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        (span,) = self.named(name)
        return span

    async def settle(self, name: str, count: int = 1) -> list[ReadableSpan]:
        """Spans end just after the reply goes: wait for them."""
        await until(lambda: len(self.named(name)) >= count, f"{count} {name} span(s)")
        return self.named(name)


@pytest.fixture
def traced() -> Traced:
    return Traced()


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return span.parent is not None and span.parent.span_id == parent.context.span_id


# --- the span tree ---------------------------------------------------------------------


async def test_eval_over_hoot01_is_parented_on_the_callers_traceparent(make_server, traced):
    running = await make_server(telemetry=traced.telemetry)
    async with Client(running.endpoint) as c:
        reply = await c.request(t.LuaEval(code="return otel.trace_id()"), traceparent=TP)
    assert isinstance(reply, t.Success) and reply.result["result"] == TRACE
    (dispatch,) = await traced.settle("luanette.dispatch")
    script = traced.one("luanette.script.execute")
    assert dispatch.parent.span_id == int(PARENT, 16) and dispatch.context.trace_id == int(TRACE, 16)
    assert dispatch.kind is SpanKind.SERVER and dispatch.attributes["rpc.method"] == "lua_eval"
    assert child_of(script, dispatch)
    assert script.attributes["script.name"] == "eval"
    assert script.attributes["script.hash"] == hash_bytes(b"return otel.trace_id()")


async def test_legacy_envelope_traceparent_is_the_parent_too(make_server, traced, zctx):
    running = await make_server(telemetry=traced.telemetry)
    sock = zctx.socket(zmq.DEALER)
    sock.connect(running.endpoint)
    try:
        envelope = t.Envelope(id=uuid.uuid4(), payload=t.Ping(), traceparent=TP)
        await sock.send(envelope_codec.encode(envelope, Encoding.JSON))
        await asyncio.wait_for(sock.recv(), 5)
    finally:
        sock.close(0)
    (dispatch,) = await traced.settle("luanette.dispatch")
    assert dispatch.parent.span_id == int(PARENT, 16) and dispatch.attributes["rpc.method"] == "ping"


async def test_errors_mark_the_dispatch_span(make_server, traced):
    running = await make_server(telemetry=traced.telemetry)
    async with Client(running.endpoint) as c:
        reply = await c.request(t.LuaEval(code="error('boom')"))
    assert isinstance(reply, t.Error)
    (dispatch,) = await traced.settle("luanette.dispatch")
    assert dispatch.parent is None  # no traceparent: a root span
    assert dispatch.status.status_code is StatusCode.ERROR
    assert dispatch.attributes["luanette.error.code"] == "lua_error"


async def test_a_job_and_its_backend_calls_hang_under_the_request_that_queued_it(make_server, traced):
    async with run_models("all") as sim:
        running = await make_server(settings=settings_for(sim.url), telemetry=traced.telemetry)
        code = "-- name: traced_job\nfunction main() otel.event('calling', {n = 2}); return orpheus.generate{}.variations[1].hash end"
        async with Client(running.endpoint) as c:
            digest = await store(c, code)
            reply = await c.request(t.JobExecute(script_hash=digest, params=None), traceparent=TP)
            job_id = reply.result["job_id"]
            done = await wait_done(c, job_id)
        assert done["status"] == "complete", done
        await traced.settle("luanette.script.execute")
        execute = traced.one("luanette.script.execute")
        queued_by = next(s for s in traced.named("luanette.dispatch") if s.attributes["rpc.method"] == "job_execute")
        call = traced.one("luanette.backend.call")
        assert child_of(execute, queued_by) and child_of(call, execute)
        assert execute.context.trace_id == call.context.trace_id == int(TRACE, 16)
        assert execute.attributes["job.id"] == job_id and execute.attributes["script.hash"] == digest
        assert execute.attributes["job.status"] == "complete"
        assert [(e.name, dict(e.attributes)) for e in execute.events] == [("calling", {"n": 2})]
        assert call.kind is SpanKind.CLIENT and call.attributes["backend.name"] == "orpheus"
        # the model service saw the call's own span as its parent
        (sent,) = sim.stats.traceparents
        assert sent == f"00-{TRACE}-{call.context.span_id:016x}-{int(call.context.trace_flags):02x}"


async def test_a_failed_job_marks_its_span(make_server, traced):
    running = await make_server(telemetry=traced.telemetry)
    async with Client(running.endpoint) as c:
        digest = await store(c, "error('nope')")
        done = await wait_done(c, (await run(c, digest))["job_id"])
    assert done["status"] == "failed"
    (execute,) = await traced.settle("luanette.script.execute")
    assert execute.status.status_code is StatusCode.ERROR and execute.attributes["job.status"] == "failed"


async def test_without_an_exporter_ids_still_flow_and_nothing_is_recorded(make_server):
    running = await make_server()  # the daemon's default: no exporter
    async with Client(running.endpoint) as c:
        plain = await c.request(t.LuaEval(code="return {otel.trace_id(), otel.traceparent()}"))
        joined = await c.request(t.LuaEval(code="return otel.traceparent()"), traceparent=TP)
    trace_id, traceparent = plain.result["result"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and traceparent.split("-")[1] == trace_id
    assert joined.result["result"].startswith(f"00-{TRACE}-")  # the caller's trace goes on
    assert not running.server.telemetry.exporting


# --- otel.* ------------------------------------------------------------------------------


async def otel_run(traced: Traced, code: str) -> tuple[Any, ReadableSpan]:
    with traced.telemetry.span("luanette.script.execute") as span:
        outcome = await run_script(code, namespaces=[OtelNamespace(traced.telemetry)])
    assert span.get_span_context().is_valid
    return outcome.result, traced.one("luanette.script.execute")


async def test_otel_functions_read_and_annotate_the_runs_span(traced):
    result, span = await otel_run(
        traced,
        """
        otel.set_attribute("take", 3)
        otel.set_attribute("mood", "calm")
        otel.set_attribute("keys", {"C", "G"})
        otel.event("sections", {count = 2, ok = true})
        otel.record_metric("notes_generated", 48, {model = "orpheus"})
        otel.record_metric("notes_generated", 16, {model = "orpheus"})
        return {otel.trace_id(), otel.span_id(), otel.traceparent()}
        """,
    )
    trace_id, span_id, traceparent = result
    assert trace_id == f"{span.context.trace_id:032x}" and span_id == f"{span.context.span_id:016x}"
    assert traceparent.startswith(f"00-{trace_id}-{span_id}-") and int(traceparent[-2:], 16) & 1  # sampled
    assert span.attributes["take"] == 3 and span.attributes["mood"] == "calm"
    assert tuple(span.attributes["keys"]) == ("C", "G")
    assert [(e.name, dict(e.attributes)) for e in span.events] == [("sections", {"count": 2, "ok": True})]
    metrics = traced.metrics.get_metrics_data()
    points = [
        point
        for rm in metrics.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "notes_generated"
        for point in metric.data.data_points
    ]
    assert len(points) == 1 and points[0].count == 2 and points[0].sum == 64
    assert dict(points[0].attributes) == {"model": "orpheus"}


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        ("otel.set_attribute('script.hash', 'x')", "'script.hash' is set by the daemon"),
        ("otel.set_attribute('k', {1, 'a'})", "value must be an array of values of one type"),
        ("otel.set_attribute('k', {a = 1})", "value must be a string, number or boolean, got table"),
        ("otel.set_attribute('', 1)", "key must be 1 to 128 characters"),
        ("otel.event('e', {x = print})", "argument #2.x is a function"),
        ("otel.event('e', 'x')", "attributes must be a table, got string"),
        ("otel.record_metric('9lives', 1)", "name must start with a letter"),
        ("otel.record_metric('n', 'many')", "value must be a finite number, got string"),
        ("otel.record_metric('n', 1/0)", "is infinite"),
        ("for i = 1, 200 do otel.event('e') end", "a run may add at most 128 events"),
    ],
)
async def test_otel_argument_errors(traced, call, fragment):
    with pytest.raises(ScriptError) as info:
        await otel_run(traced, call)
    assert info.value.detail.message.startswith("otel."), info.value.detail.message
    assert fragment in info.value.detail.message


async def test_metric_names_are_bounded_per_daemon(traced):
    result, _ = await otel_run(
        traced,
        "for i = 1, 200 do otel.record_metric('m' .. i, i) end\n"
        "local ok, err = pcall(otel.record_metric, 'one_too_many', 1)\n"
        "otel.record_metric('m7', 1)  -- an existing name is fine\n"
        "return err",
    )
    assert "already has 200 metrics" in result
    assert len(traced.telemetry.histograms) == 200


# --- logs ----------------------------------------------------------------------------------


async def test_script_logs_carry_trace_and_job_ids(make_server, traced):
    from structlog.testing import capture_logs

    running = await make_server(telemetry=traced.telemetry)
    with capture_logs() as logs:
        async with Client(running.endpoint) as c:
            digest = await store(c, "log.info('from the job', {n = 1})")
            job_id = (await run(c, digest))["job_id"]
            await wait_done(c, job_id)
            await c.request(t.LuaEval(code="log.warn('from an eval')"), traceparent=TP)
    lines = [entry for entry in logs if entry["event"] == "lua.log"]
    from_job = next(e for e in lines if e["message"] == "from the job")
    from_eval = next(e for e in lines if e["message"] == "from an eval")
    await traced.settle("luanette.script.execute", 2)
    job_span = next(s for s in traced.named("luanette.script.execute") if s.attributes.get("job.id") == job_id)
    assert from_job["job_id"] == job_id and from_job["trace_id"] == f"{job_span.context.trace_id:032x}"
    assert from_eval["trace_id"] == TRACE


# --- OTLP export -------------------------------------------------------------------------


def test_otlp_url():
    assert otlp_url("http://collector:4318", "traces") == "http://collector:4318/v1/traces"
    assert otlp_url("http://collector:4318/", "metrics") == "http://collector:4318/v1/metrics"
    assert otlp_url("https://x/custom/path", "traces") == "https://x/custom/path"
    with pytest.raises(ValueError):
        otlp_url("collector:4318", "traces")


class Collector:
    """A stand-in for an OpenTelemetry collector: an OTLP/HTTP receiver on loopback that
    decodes what it is sent (protobuf) with opentelemetry-proto's classes."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.logs: list[ExportLogsServiceRequest] = []
        self.metrics = 0
        self.endpoint = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Collector:
        app = web.Application()
        app.router.add_post("/v1/traces", self._into(self.traces, ExportTraceServiceRequest))
        app.router.add_post("/v1/logs", self._into(self.logs, ExportLogsServiceRequest))
        app.router.add_post("/v1/metrics", self._metrics)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @staticmethod
    def _into(received: list, kind: type[Message]):
        async def receive(request: web.Request) -> web.Response:
            assert request.content_type == "application/x-protobuf"
            body = kind()
            body.ParseFromString(await request.read())
            received.append(body)
            return web.Response(status=200)

        return receive

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics += 1
        return web.Response(status=200)

    def spans(self) -> list:
        return [
            span
            for request in self.traces
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def log_records(self) -> list:
        return [
            record
            for request in self.logs
            for resource_logs in request.resource_logs
            for scope_logs in resource_logs.scope_logs
            for record in scope_logs.log_records
        ]


def attributes_of(item: Any) -> dict[str, Any]:
    """A protobuf span's, event's or log record's attributes as plain values."""
    out: dict[str, Any] = {}
    for kv in item.attributes:
        field = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, field) if field else None
    return out


async def test_spans_are_exported_over_otlp_http_to_a_real_collector():
    async with Collector() as collector:
        telemetry = Telemetry(otlp_endpoint=collector.endpoint)
        with telemetry.span("luanette.dispatch", parent=parent_context(TP)):
            with telemetry.span("luanette.script.execute"):
                pass
        await asyncio.to_thread(telemetry.shutdown)  # flushes the batch
    spans = collector.spans()
    assert sorted(s.name for s in spans) == ["luanette.dispatch", "luanette.script.execute"]
    assert {s.trace_id.hex() for s in spans} == {TRACE}
    service = {
        a.key: a.value.string_value for r in collector.traces for rs in r.resource_spans for a in rs.resource.attributes
    }
    assert service["service.name"] == "luanette"


# --- script span attributes, error events, OTLP logs --------------------------------------

EXPORTED = """
function describe()
  return {name = "exported", params = {
    key = {type = "string", secret = true},
    take = {type = "integer", default = 2},
    mood = {type = "string"},
  }}
end
function main(p)
  log.info("take " .. p.take, {n = p.take, mood = p.mood})
  local t = nil
  return t.x
end
"""


async def test_a_daemons_script_logs_and_spans_reach_a_real_collector(daemon_process):
    """The console script with --otlp-endpoint: the job's span carries its creator, its
    params but the secret one, and its error as an event; its log.* line is an OTLP log
    record in the same trace and span."""
    import signal

    async with Collector() as collector:
        d = daemon_process("--otlp-endpoint", collector.endpoint)
        async with Client(d.endpoint) as c:
            digest = await store(c, EXPORTED, creator="tester")
            job_id = (await run(c, digest, {"key": "s3cr3t-value", "take": 3, "mood": "m" * 1000}))["job_id"]
            done = await wait_done(c, job_id)
        d.signal(signal.SIGTERM)
        assert await asyncio.to_thread(d.wait) == 0  # its exit flushes the batches
    assert done["status"] == "failed" and done["error"]["cause"], done

    (execute,) = [s for s in collector.spans() if attributes_of(s).get("job.id") == job_id]
    attributes = attributes_of(execute)
    assert execute.name == "luanette.script.execute"
    assert attributes["script.creator"] == "tester" and attributes["script.name"] == "exported"
    assert attributes["script.params.take"] == 3
    assert attributes["script.params.mood"] == "m" * (PARAM_VALUE_MAX - 1) + "…"
    assert not any(k.startswith("script.params.key") for k in attributes)
    (error,) = [e for e in execute.events if e.name == "luanette.script.error"]
    assert attributes_of(error) == {
        "error.kind": "lua_runtime",
        "error.cause": done["error"]["cause"],
        "error.message": done["error"]["message"],
        "error.line": done["error"]["line"],
    }

    (line,) = [r for r in collector.log_records() if r.body.string_value == "take 3"]
    assert line.trace_id == execute.trace_id and line.span_id == execute.span_id
    assert line.severity_text == "INFO" and line.severity_number == 9  # SeverityNumber.INFO
    assert line.event_name == "lua.log"
    logged = attributes_of(line)
    assert logged["job_id"] == job_id and logged["script_hash"] == digest and logged["fields.n"] == 3
    # the secret is nowhere: not in a span, not in a log record
    sent = b"".join(r.SerializeToString() for r in [*collector.traces, *collector.logs])
    assert b"s3cr3t-value" not in sent and b"s3cr3t-value" not in d.proc.stderr.read()


async def test_a_failed_eval_records_its_error_as_an_event(make_server, traced):
    running = await make_server(telemetry=traced.telemetry)
    async with Client(running.endpoint) as c:
        reply = await c.request(t.LuaEval(code="error('no drums')"))
    assert isinstance(reply, t.Error)
    (execute,) = await traced.settle("luanette.script.execute")
    (error,) = [e for e in execute.events if e.name == "luanette.script.error"]
    assert error.attributes["error.kind"] == "lua_runtime"
    assert error.attributes["error.cause"] == reply.details["cause"] == "user_error"
    assert "no drums" in error.attributes["error.message"] and error.attributes["error.line"] == 1


async def test_a_stored_scripts_creator_and_params_are_span_attributes(make_server, traced):
    running = await make_server(telemetry=traced.telemetry)
    async with Client(running.endpoint) as c:
        digest = await store(c, "function main(p) return 1 end", creator="ada")
        job_id = (await run(c, digest, {"n": 7, "tempo": 92.5, "on": True, "notes": [1, 2], "api_key": "k"}))["job_id"]
        assert (await wait_done(c, job_id))["status"] == "complete"
    (execute,) = await traced.settle("luanette.script.execute")
    params = {k: v for k, v in execute.attributes.items() if k.startswith("script.params.")}
    assert execute.attributes["script.creator"] == "ada"
    assert params == {"script.params.n": 7, "script.params.tempo": 92.5, "script.params.on": True}


def test_param_attributes_keep_scalars_and_leave_secrets_out():
    long = "x" * (PARAM_VALUE_MAX + 10)
    got = param_attributes(
        {"a": long, "b": None, "c": {"d": 1}, "big": 2**70, "pick": "me"},
        secret={"pick"},
    )
    assert got == {"script.params.a": "x" * (PARAM_VALUE_MAX - 1) + "…"}
    hidden = ["password", "dbPassword", "AuthToken", "access_token", "api-key", "apiKey", "client_secret",
              "credentials", "ssh_private_key", "pwd", "x.auth"]
    shown = ["author", "passes", "max_tokens", "key", "secretary_note", "tokenizer", "compass"]
    assert [name for name in hidden + shown if looks_secret(name)] == hidden
    assert param_attributes(["not", "a", "table"]) == {}
    assert len(param_attributes({f"p{i:03}": i for i in range(100)})) == 32


def test_only_log_events_carrying_a_trace_become_records():
    assert log_record("info", {"event": "server.listening", "level": "info"}) is None
    assert log_record("info", {"event": "x", "trace_id": "zz", "span_id": "01"}) is None
    record = log_record(
        "warning",
        {"event": "jobs.slow", "level": "warning", "trace_id": TRACE, "span_id": PARENT, "job_id": "j",
         "fields": {"n": 1, "tags": ["a"]}, "timestamp": "2026-01-01T00:00:00Z"},
    )
    assert record is not None
    span_context = trace.get_current_span(record["context"]).get_span_context()
    assert f"{span_context.trace_id:032x}" == TRACE and f"{span_context.span_id:016x}" == PARENT
    assert record["body"] == "jobs.slow" and record["severity_text"] == "WARNING"
    assert record["attributes"] == {"job_id": "j", "fields.n": 1, "fields.tags": '["a"]'}


# --- the worker pool's gauges ---------------------------------------------------------------


def gauge_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """name -> [(attributes, value)] of the gauges one collection of ``reader`` reads."""
    points: dict[str, list[tuple[dict[str, Any], float]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name.startswith(("luanette.workers.", "luanette.pool.")):
                    points[metric.name] = [(dict(p.attributes or {}), p.value) for p in metric.data.data_points]
    return points


def test_pool_gauges_read_the_pool_at_each_collection(traced):
    stats: dict[str, Any] = {
        "workers": 5,
        "groups": {"local": {"workers": 2, "busy": 1, "idle": 1}, "gpu-host": {"workers": 3, "busy": 3, "idle": 0}},
        "waiting": 4,
        "oldest_waiting_s": 7.5,
    }
    observe_pool(traced.telemetry, lambda: stats)
    points = gauge_points(traced.metrics)
    assert sorted(points["luanette.workers.busy"], key=str) == [({"group": "gpu-host"}, 3), ({"group": "local"}, 1)]
    assert sorted(points["luanette.workers.idle"], key=str) == [({"group": "gpu-host"}, 0), ({"group": "local"}, 1)]
    assert points["luanette.pool.waiting_runs"] == [({}, 4)]
    assert points["luanette.pool.oldest_waiting_age"] == [({}, 7.5)]

    stats.update(groups={"local": {"workers": 2, "busy": 0, "idle": 2}}, waiting=0, oldest_waiting_s=None)
    points = gauge_points(traced.metrics)
    assert points["luanette.workers.idle"] == [({"group": "local"}, 2)]
    assert points["luanette.pool.waiting_runs"] == [({}, 0)]
    assert points["luanette.pool.oldest_waiting_age"] == [({}, 0.0)]  # none waits


def test_a_pool_that_cannot_be_read_reports_nothing(traced):
    def broken() -> dict[str, Any]:
        raise RuntimeError("engine gone")

    observe_pool(traced.telemetry, broken)
    points = gauge_points(traced.metrics)  # the collection itself does not fail
    assert all(not found for found in points.values())


def test_a_pool_read_that_meets_a_change_is_tried_again(traced):
    reads = []

    def changing() -> dict[str, Any]:
        reads.append(1)
        if len(reads) % 2:  # every other read meets the event loop changing the pool
            raise RuntimeError("dictionary changed size during iteration")
        return {"groups": {"local": {"busy": 2, "idle": 0}}, "waiting": 1, "oldest_waiting_s": 0.5}

    observe_pool(traced.telemetry, changing)
    points = gauge_points(traced.metrics)
    assert points["luanette.workers.busy"] == [({"group": "local"}, 2)]
    assert points["luanette.pool.waiting_runs"] == [({}, 1)]


async def test_a_daemons_pool_gauges_count_its_workers(make_server, traced):
    server = await make_server(telemetry=traced.telemetry, workers=2)
    async with Client(server.endpoint) as c:

        def ready(points: dict[str, list[tuple[dict[str, Any], float]]]) -> float:
            return sum(v for key in ("luanette.workers.busy", "luanette.workers.idle") for _, v in points.get(key, []))

        await until(lambda: ready(gauge_points(traced.metrics)) == 2, "both workers ready")
        points = gauge_points(traced.metrics)
        busy = dict((a["group"], v) for a, v in points["luanette.workers.busy"])
        idle = dict((a["group"], v) for a, v in points["luanette.workers.idle"])
        assert set(busy) == set(idle) == {"local"} and busy["local"] + idle["local"] == 2
        assert points["luanette.pool.waiting_runs"] == [({}, 0)]

        digest = await store(c, "function main() clock.sleep(1500) return 1 end")
        job = await run(c, digest)

        def busy_now() -> bool:
            return any(v >= 1 for _, v in gauge_points(traced.metrics).get("luanette.workers.busy", []))

        await until(busy_now, "a busy worker while the job runs")
        assert (await wait_done(c, job["job_id"]))["status"] == "complete"
