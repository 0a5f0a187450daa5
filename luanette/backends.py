"""HTTP client side of the model backends (DESIGN "Model backends (HTTP)").

One :class:`Backends` per daemon holds one shared ``aiohttp.ClientSession`` and, per
named backend (``luanette.settings.BackendSettings``), an ``asyncio.Semaphore`` of the
backend's ``concurrency``.  :meth:`Backends.call` sends one JSON request and returns the
decoded JSON answer, or raises:

- :class:`BackendUnavailable` (code ``backend_unavailable``): the backend cannot answer
  -- connection refused or reset, a timeout, 429 / 5xx after the retries, a response
  that is not JSON, too large or nested deeper than 128 levels
  (``hooteproto.depth.MAX_DEPTH``), or a retry that would start after the deadline;
- :class:`BackendRejected` (code ``invalid_params``): the backend refused the request
  itself (400, 413, 422): retrying the same body cannot help;
- :class:`UnknownBackend` (code ``not_found``): no backend of that name is configured.

Retries: 429, 5xx and connection failures (refused, reset, server gone) are retried up
to ``retries`` times.  The wait before retry *n* is ``retry_backoff_s * 2**(n-1)``
capped at ``retry_max_backoff_s``, times a jitter in [0.5, 1] (so a thousand jobs that
were told "busy" together do not come back together), and at least the ``Retry-After``
the backend sent.  A retry that would start at or after the caller's ``deadline`` is
not attempted: the call fails at once with the last reason, so a script learns about it
while it still has time to ``pcall`` and do something else.  A request that times out
is not retried: a GPU service that took ``timeout_s`` is still working on it, and
sending it again would queue a second copy behind the first.  An attempt's timeout is
``timeout_s``, or the time left before the deadline plus a quarter second when that is
shorter: inside a job the runtime cancels the wait at the deadline itself (the job then
ends as ``timeout``, naming the call it waited for), and the request's own timeout only
backs that up for callers without such a driver.  The semaphore is held only while
a request is in flight, not during the backoff.

Why aiohttp and not httpx: a colleague measured 1,000 concurrent requests through one
``httpx.AsyncClient`` at ~33 s (its connection pool does work quadratic in the number of
connections), and the same through one ``aiohttp.ClientSession`` at ~2 s.  The
connector is unbounded (``limit=0``): the per-backend semaphores are the limit, so a
backend configured for 1,000 concurrent requests gets 1,000 connections.

Tracing: each call is a ``luanette.backend.call`` span (a child of the current span,
i.e. of the script's) and its request carries that span's W3C ``traceparent`` header,
unless :meth:`Backends.call` is given a ``traceparent`` of its own.

Everything here runs on the event loop; nothing blocks it (JSON is decoded with
msgspec, which is fast enough for multi-megabyte base64 answers).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import aiohttp
import msgspec
import structlog

from hooteproto.depth import TooDeepError, decode_json
from luanette.settings import BackendSettings
from luanette.telemetry import Span, SpanKind, Telemetry, traceparent_of

__all__ = [
    "BackendError",
    "BackendRejected",
    "BackendStats",
    "BackendUnavailable",
    "Backends",
    "UnknownBackend",
]

_log = structlog.get_logger("luanette.backends")

USER_AGENT: Final = "luanette/0.1"
# Statuses that say "not now" rather than "never": retried.
_REJECTED: Final = frozenset({400, 413, 422})
# How much of an error body goes into a message.
_DETAIL_CHARS: Final = 300
_ERROR_BODY_BYTES: Final = 64 * 1024
# How long past the caller's deadline a request's own timeout fires (see _attempt).
_DEADLINE_SLACK_S: Final = 0.25
_json_encoder: Final = msgspec.json.Encoder()


class BackendError(Exception):
    """Base of the errors of a backend call.  ``code`` is the stable error code."""

    code = "backend_unavailable"

    def __init__(self, name: str, url: str, reason: str) -> None:
        super().__init__(f"{self.code}: {name} at {url}: {reason}")
        self.name = name
        self.url = url
        self.reason = reason


class BackendUnavailable(BackendError):
    """The backend cannot serve the request now (after the retries the deadline allowed)."""

    code = "backend_unavailable"


class BackendRejected(BackendError):
    """The backend refused the request (HTTP 400, 413, 422): the request is wrong."""

    code = "invalid_params"

    def __init__(self, name: str, url: str, reason: str, status: int) -> None:
        super().__init__(name, url, reason)
        self.status = status


class UnknownBackend(LookupError):
    """No backend of that name is configured."""

    code = "not_found"

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"not_found: no backend named {name!r} (configured: {', '.join(known)})")
        self.name = name


class BackendStats(msgspec.Struct):
    """Counters of one backend (read by telemetry and tests)."""

    requests: int = 0  # attempts sent
    ok: int = 0  # calls answered 2xx
    retries: int = 0  # attempts that were retries
    busy: int = 0  # 429 answers
    failures: int = 0  # calls that ended in an error
    in_flight: int = 0
    waiting: int = 0  # calls waiting for a concurrency slot
    peak_in_flight: int = 0


class _Backend:
    __slots__ = ("name", "settings", "semaphore", "stats")

    def __init__(self, name: str, settings: BackendSettings) -> None:
        self.name = name
        self.settings = settings
        self.semaphore = asyncio.Semaphore(settings.concurrency)
        self.stats = BackendStats()


class _Retry(Exception):
    """One attempt failed in a way worth retrying."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Backends:
    """The daemon's model backends: one HTTP session, one concurrency limit per backend.

    Create it anywhere; the session is opened on the first call, inside the running
    loop.  Call :meth:`aclose` once at shutdown, after the jobs have stopped.
    """

    def __init__(
        self,
        backends: Mapping[str, BackendSettings],
        *,
        telemetry: Telemetry | None = None,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._backends = {name: _Backend(name, s) for name, s in backends.items()}
        self._telemetry = telemetry or Telemetry()
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # ------------------------------------------------------------------ inspection

    @property
    def names(self) -> list[str]:
        """Configured backend names, sorted."""
        return sorted(self._backends)

    def settings(self, name: str) -> BackendSettings:
        """The settings of backend ``name`` (:class:`UnknownBackend` if none)."""
        return self._get(name).settings

    def stats(self, name: str) -> BackendStats:
        """The live counters of backend ``name``."""
        return self._get(name).stats

    @property
    def closed(self) -> bool:
        return self._closed

    # --------------------------------------------------------------------- calling

    async def call(
        self,
        name: str,
        path: str,
        body: Any,
        *,
        deadline: float | None,
        traceparent: str | None = None,
        method: str = "POST",
    ) -> Any:
        """Send ``body`` as JSON to ``<url of name><path>`` and return the decoded answer.

        ``deadline`` is a ``time.monotonic()`` value no attempt or retry may pass (the
        job's deadline), or None for none.  ``body`` None sends no body (use with
        ``method="GET"``).  Raises :class:`BackendUnavailable`, :class:`BackendRejected`
        or :class:`UnknownBackend`; cancellation propagates as usual.
        """
        backend = self._get(name)
        s = backend.settings
        url = s.url + path
        if self._closed:
            raise BackendUnavailable(name, s.url, "the daemon is shutting down")
        data = None if body is None else _json_encoder.encode(body)
        headers = {"User-Agent": self._user_agent, "Accept": "application/json", **s.headers}
        if data is not None:
            headers["Content-Type"] = "application/json"
        with self._telemetry.span(
            "luanette.backend.call",
            kind=SpanKind.CLIENT,
            attributes={"backend.name": name, "http.request.method": method, "url.full": url},
        ) as span:
            headers["traceparent"] = traceparent or traceparent_of(span) or ""
            if not headers["traceparent"]:
                del headers["traceparent"]
            return await self._call(backend, method, url, data, headers, deadline, span)

    async def stream(
        self,
        name: str,
        path: str,
        body: Any,
        *,
        deadline: float | None,
        on_chunk: Callable[[str, bool], None] | None = None,
        buffer_size: int = 1,
        traceparent: str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """POST an OpenAI-style chat ``body`` with ``stream: true`` and read the answer's
        server-sent events as they come.

        The deltas are handed to ``on_chunk(text, is_final)`` coalesced into chunks of at
        least ``buffer_size`` characters (the last one may be shorter; it comes with
        ``is_final`` true, possibly empty).  Returns ``{content, chunks, model,
        finish_reason, usage}`` (``usage`` None when the backend sent none).  Retries as
        :meth:`call` does, but only before the first byte of the answer: a stream cut
        in the middle fails as :class:`BackendUnavailable`, since its chunks are out.
        A backend that ignores ``stream`` and answers plain JSON is read as one chunk.
        ``meta`` (which job, pipeline and step) is for the caller's records, not sent.
        """
        backend = self._get(name)
        s = backend.settings
        url = s.url + path
        if self._closed:
            raise BackendUnavailable(name, s.url, "the daemon is shutting down")
        data = _json_encoder.encode({**body, "stream": True, "stream_options": {"include_usage": True}})
        headers = {
            "User-Agent": self._user_agent,
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
            **s.headers,
        }
        chunker = _Chunker(max(1, buffer_size), on_chunk)

        async def read(resp: aiohttp.ClientResponse) -> dict[str, Any]:
            return await _read_events(resp, chunker, backend.name, s.url, s.max_response_bytes)

        with self._telemetry.span(
            "luanette.backend.stream",
            kind=SpanKind.CLIENT,
            attributes={"backend.name": name, "http.request.method": "POST", "url.full": url},
        ) as span:
            headers["traceparent"] = traceparent or traceparent_of(span) or ""
            if not headers["traceparent"]:
                del headers["traceparent"]
            result: dict[str, Any] = await self._call(backend, "POST", url, data, headers, deadline, span, read)
            return result

    async def _call(
        self,
        backend: _Backend,
        method: str,
        url: str,
        data: bytes | None,
        headers: dict[str, str],
        deadline: float | None,
        span: Span,
        read: Callable[[aiohttp.ClientResponse], Awaitable[Any]] | None = None,
    ) -> Any:
        name, s = backend.name, backend.settings
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    result = await self._attempt(backend, method, url, data, headers, deadline, read)
                except _Retry as retry:
                    reason = retry.reason
                    if self._closed:
                        raise BackendUnavailable(name, s.url, "the daemon is shutting down") from None
                    if attempt > s.retries:
                        tries = "attempt" if attempt == 1 else "attempts"
                        raise BackendUnavailable(name, s.url, f"{reason} ({attempt} {tries})") from None
                    delay = self._delay(s, attempt, retry.retry_after)
                    if deadline is not None and time.monotonic() + delay >= deadline:
                        raise BackendUnavailable(
                            name,
                            s.url,
                            f"{reason} ({attempt} {'attempt' if attempt == 1 else 'attempts'}; "
                            f"the job deadline leaves no time for a retry in {delay:.2g} s)",
                        ) from None
                    _log.debug("backend.retry", backend=name, reason=reason, attempt=attempt, delay_s=round(delay, 3))
                    await asyncio.sleep(delay)
                    backend.stats.retries += 1
                    continue
                backend.stats.ok += 1
                span.set_attribute("backend.attempts", attempt)
                return result
        except Exception:
            backend.stats.failures += 1
            raise

    async def _attempt(
        self,
        backend: _Backend,
        method: str,
        url: str,
        data: bytes | None,
        headers: dict[str, str],
        deadline: float | None,
        read: Callable[[aiohttp.ClientResponse], Awaitable[Any]] | None = None,
    ) -> Any:
        s, stats = backend.settings, backend.stats
        stats.waiting += 1
        try:
            await backend.semaphore.acquire()
        finally:
            stats.waiting -= 1
        stats.in_flight += 1
        stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
        try:
            total, by_deadline = s.timeout_s, False
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BackendUnavailable(backend.name, s.url, "the job deadline passed before the request")
                if left + _DEADLINE_SLACK_S < total:
                    # A run's driver cancels the wait at the deadline itself, so the job
                    # ends as a timeout (naming the call it waited for); the slack makes
                    # sure that cancel wins, and still bounds callers without a driver.
                    total, by_deadline = left + _DEADLINE_SLACK_S, True
            timeout = aiohttp.ClientTimeout(total=total, sock_connect=min(s.connect_timeout_s, total))
            if self._closed:  # aclose() while this call waited or backed off
                raise BackendUnavailable(backend.name, s.url, "the daemon is shutting down")
            stats.requests += 1
            session = self._open()
            try:
                async with session.request(method, url, data=data, headers=headers, timeout=timeout) as resp:
                    status = resp.status
                    if 200 <= status < 300:
                        if read is not None:
                            return await read(resp)
                        raw = await _read_capped(resp, s.max_response_bytes, backend.name, s.url)
                        try:
                            return decode_json(raw) if raw else None
                        except msgspec.DecodeError as exc:
                            raise BackendUnavailable(
                                backend.name, s.url, f"answered HTTP {status} with a body that is not JSON ({exc})"
                            ) from None
                        except TooDeepError as exc:
                            raise BackendUnavailable(
                                backend.name, s.url, f"answered HTTP {status} with JSON {exc}"
                            ) from None
                    detail = _error_detail(await resp.content.read(_ERROR_BODY_BYTES))
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
            except aiohttp.ConnectionTimeoutError:
                raise _Retry(f"connect timed out after {timeout.sock_connect:.3g} s") from None
            except TimeoutError:  # asyncio.TimeoutError is the same class since 3.11
                reason = "no answer before the deadline" if by_deadline else f"no answer within {total:.3g} s"
                raise BackendUnavailable(backend.name, s.url, reason) from None
            except aiohttp.ClientConnectorError as exc:
                raise _Retry(_connect_reason(exc)) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:  # reset, server gone
                raise _Retry(f"connection lost: {exc.__class__.__name__}: {exc}") from None
            except aiohttp.ClientResponseError as exc:  # malformed HTTP
                raise BackendUnavailable(backend.name, s.url, f"bad HTTP answer: {exc.message}") from None
            except aiohttp.InvalidURL as exc:
                raise BackendUnavailable(backend.name, s.url, f"invalid URL {exc}") from None
            except aiohttp.ClientError as exc:  # anything else the client can raise
                raise BackendUnavailable(backend.name, s.url, f"{exc.__class__.__name__}: {exc}") from None
        finally:
            stats.in_flight -= 1
            backend.semaphore.release()
        what = f"HTTP {status}" + (f": {detail}" if detail else "")
        if status == 429:
            stats.busy += 1
            raise _Retry(f"busy ({what})", retry_after)
        if status >= 500:
            raise _Retry(what, retry_after)
        if status in _REJECTED:
            raise BackendRejected(backend.name, s.url, f"rejected the request ({what})", status)
        raise BackendUnavailable(backend.name, s.url, f"{method} {url[len(s.url):] or '/'} answered {what}")

    @staticmethod
    def _delay(s: BackendSettings, attempt: int, retry_after: float | None) -> float:
        backoff = min(s.retry_backoff_s * 2 ** (attempt - 1), s.retry_max_backoff_s)
        backoff *= random.uniform(0.5, 1.0)
        return max(backoff, retry_after or 0.0)

    # ------------------------------------------------------------------- lifecycle

    def _get(self, name: str) -> _Backend:
        backend = self._backends.get(name) if isinstance(name, str) else None
        if backend is None:
            raise UnknownBackend(str(name), self.names)
        return backend

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300, force_close=False)
            self._session = aiohttp.ClientSession(
                connector=connector,
                # per request timeouts are set on each request; no session-wide cap
                timeout=aiohttp.ClientTimeout(total=None),
                auto_decompress=True,
                raise_for_status=False,
                trust_env=False,
            )
        return self._session

    async def aclose(self) -> None:
        """Close the session and its connections; later calls fail as unavailable."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> Backends:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ------------------------------------------------------------------------- helpers


async def _read_capped(resp: aiohttp.ClientResponse, cap: int, name: str, base: str) -> bytes:
    length = resp.content_length
    if length is not None:
        if length > cap:
            raise BackendUnavailable(name, base, f"response of {length} bytes is over the limit of {cap} bytes")
        return await resp.read()
    chunks = bytearray()
    async for chunk in resp.content.iter_any():
        chunks += chunk
        if len(chunks) > cap:
            raise BackendUnavailable(name, base, f"response is over the limit of {cap} bytes")
    return bytes(chunks)


def _error_detail(raw: bytes) -> str:
    """The useful part of an error body: FastAPI's ``detail``, OpenAI's ``error.message``."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        doc = decode_json(raw)
    except (msgspec.DecodeError, TooDeepError):
        doc = None
    if isinstance(doc, dict):
        detail = doc.get("detail")
        error = doc.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            detail = error["message"]
        elif isinstance(error, str):
            detail = error
        if isinstance(detail, str):
            text = detail
        elif detail is not None:  # FastAPI validation errors: a list of objects
            text = msgspec.json.encode(detail).decode()
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _retry_after(value: str | None) -> float | None:
    """Seconds of a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    os_error = exc.os_error
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(os_error, (TimeoutError, asyncio.TimeoutError)):
        return "connect timed out"
    strerror = getattr(os_error, "strerror", None)
    return f"cannot connect: {strerror or os_error or exc}"


# ----------------------------------------------------------------------- streaming

# Chunks one streamed answer may be cut into (each is a broadcast and a handler call).
MAX_STREAM_CHUNKS: Final = 10_000
# Longest server-sent event line read (a delta is a few bytes; usage a few hundred).
_MAX_EVENT_LINE: Final = 1024 * 1024


class _Chunker:
    """Coalesces streamed deltas into chunks of at least ``size`` characters."""

    __slots__ = ("chunks", "emitted", "on_chunk", "pending", "size")

    def __init__(self, size: int, on_chunk: Callable[[str, bool], None] | None) -> None:
        self.size = size
        self.on_chunk = on_chunk
        self.pending: list[str] = []
        self.chunks: list[str] = []
        self.emitted = False  # whether anything left: a stream cut after that is not retried

    def add(self, text: str) -> None:
        self.pending.append(text)
        if sum(map(len, self.pending)) >= self.size:
            self._emit(False)

    def finish(self) -> None:
        self._emit(True)

    def _emit(self, final: bool) -> None:
        text = "".join(self.pending)
        self.pending.clear()
        if len(self.chunks) >= MAX_STREAM_CHUNKS:
            raise ValueError(f"more than {MAX_STREAM_CHUNKS} chunks (raise buffer_size)")
        self.chunks.append(text)
        self.emitted = True
        if self.on_chunk is not None:
            self.on_chunk(text, final)


async def _read_events(
    resp: aiohttp.ClientResponse, chunker: _Chunker, name: str, base: str, cap: int
) -> dict[str, Any]:
    """The content of a streamed chat completion (``text/event-stream``), fed to
    ``chunker`` delta by delta; a plain JSON answer counts as one delta."""
    model: Any = None
    finish: Any = None
    usage: Any = None
    parts: list[str] = []
    size = 0

    def take(doc: Any) -> None:
        nonlocal model, finish, usage, size
        if not isinstance(doc, dict):
            raise BackendUnavailable(name, base, "a streamed event is not a JSON object")
        error = doc.get("error")
        if error is not None:
            raise BackendUnavailable(name, base, f"the stream failed: {_error_detail(_json_encoder.encode(doc))}")
        model = doc.get("model", model)
        usage = doc.get("usage") or usage
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            finish = choice.get("finish_reason") or finish
            delta = choice.get("delta") or choice.get("message") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(text, str) and text:
                size += len(text)
                if size > cap:
                    raise BackendUnavailable(name, base, f"streamed answer is over the limit of {cap} bytes")
                parts.append(text)
                chunker.add(text)

    try:
        if not resp.content_type.startswith("text/event-stream"):
            take(decode_json(await _read_capped(resp, cap, name, base)))
        else:
            async for raw in resp.content:
                if len(raw) > _MAX_EVENT_LINE:
                    raise BackendUnavailable(name, base, "a streamed event line is too long")
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # comments, event names, blank separators
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                take(decode_json(payload))
        chunker.finish()
    except (msgspec.DecodeError, TooDeepError) as exc:
        raise BackendUnavailable(name, base, f"a streamed event is not JSON ({exc})") from None
    except ValueError as exc:  # the chunker's bound (aiohttp's line errors are ClientErrors)
        raise BackendUnavailable(name, base, f"streamed answer: {exc}") from None
    except aiohttp.ClientError as exc:
        if not chunker.emitted:
            raise  # nothing is out yet: retried as any other lost connection
        raise BackendUnavailable(name, base, f"the stream was cut: {exc.__class__.__name__}: {exc}") from None
    return {
        "content": "".join(parts),
        "chunks": chunker.chunks,
        "model": model,
        "finish_reason": finish,
        "usage": usage,
    }
