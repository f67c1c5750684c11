"""One interceptor in front of every service on the mutual-TLS port.

Health, reflection, Aggregation and Admin all pass through :class:`Guard`:
it identifies the caller from its client certificate, refuses a revoked one,
checks the role the method needs, applies the per-identity and server-wide
limits, puts a read deadline on every client stream, and hands the caller to
the servicer through the :data:`CALLER` context variable. No servicer repeats
these checks, and none can forget them: a service added later is guarded too.

At shutdown the guard also ends every stream it serves to a client (round events,
downloads, health's Watch, reflection) with UNAVAILABLE :data:`SHUTTING_DOWN`
(:meth:`Guard.end_streams`), so none holds the server for its whole grace period and
nodes know at once that the server is restarting. Uploads are not cut: they keep the
grace period to finish, so one acknowledged by then is durable.

gRPC's asyncio ``HandlerCallDetails`` carries no auth context, so the guard
wraps the *behaviours* of the handler that ``continuation`` returns; the
``context`` passed to a behaviour has the peer's certificate. Each method is
re-registered as client-streaming (the same bytes on the wire), so that the
guard admits the caller *before* reading its request: a call whose request
never arrives is counted and cut like any idle stream, instead of waiting
outside every limit where gRPC reads unary requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from cipherhive.runtime.logs import audit, bind_caller
from cipherhive.server import metrics
from cipherhive.server.api.identity import ANY_ROLE, Authenticator, Caller, Refusal
from cipherhive.server.api.limits import Admission
from cipherhive.server.rounds.manager import RoundError
from cipherhive.server.storage.rows import DatabaseUnavailable

log = logging.getLogger("cipherhive.server")
R = TypeVar("R")

#: The identified caller of the call being served (set by the guard before any servicer runs).
CALLER: contextvars.ContextVar[Caller] = contextvars.ContextVar("cipherhive_caller")

#: Client-streaming methods held to a minimum byte rate as well as the idle deadline.
RATED_STREAMS = frozenset({"/cipherhive.v1.Aggregation/SubmitUpdate"})

#: The details of the UNAVAILABLE status that ends every open stream to a client when the server
#: stops. Nodes recognise these exact words as "the server is restarting" and reconnect quickly
#: (docs/troubleshooting.md#the-server-is-restarting); changing them breaks that for deployed nodes.
SHUTTING_DOWN = "the server is shutting down"


#: What a stream's next step returns once the stream has ended.
_END = object()


def shutting_down() -> Refusal:
    """The refusal that ends a stream (or a call arriving) while the server stops."""
    return Refusal(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


#: When the last "database unreachable" warning was logged: one a few seconds is enough to say
#: it, however many calls an outage fails.
_outage_logged = [0.0]
OUTAGE_LOG_SECONDS = 5.0


def database_unavailable(exc: DatabaseUnavailable, method: str, who: Caller) -> tuple[grpc.StatusCode, str]:
    """A call that needed the round state while its database was unreachable: UNAVAILABLE, which
    nodes retry; nothing of the call was kept (docs/explanation/reliability.md#the-database-fails)."""
    metrics.CALLS_REFUSED.labels("unavailable").inc()
    now = time.monotonic()
    if now - _outage_logged[0] >= OUTAGE_LOG_SECONDS:
        _outage_logged[0] = now
        log.warning(
            "the round state database is unreachable; calls fail with UNAVAILABLE until it is "
            "back (%s by %s %s): %s",
            method,
            who.role,
            who.name,
            exc,
        )
    return (
        grpc.StatusCode.UNAVAILABLE,
        "the server cannot reach its round state database right now; nothing of this call was "
        "kept: retry in a few seconds",
    )


def required_role(method: str) -> str:
    """The certificate role a method needs: members aggregate, operators administer."""
    if method.startswith("/cipherhive.v1.Aggregation/"):
        return "node"
    if method.startswith("/cipherhive.v1.Admin/"):
        return "admin"
    return ANY_ROLE  # health checking and reflection: any certificate of the federation


def caller() -> Caller:
    """The caller of the current call (only inside a guarded call)."""
    return CALLER.get()


class Runner:
    """Runs blocking work (database, round lock, ciphertext parsing) off the event loop.

    The pool is bounded (``[limits] max_workers``): streams cost no thread, only
    the work they hand over does. The caller's context goes along, so code in
    the worker thread sees :data:`CALLER` too.
    """

    def __init__(self, max_workers: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="work")

    async def __call__(self, fn: Callable[..., R], *args: Any) -> R:
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(ctx.run, fn, *args))

    async def surely(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn`` to completion even if this call is being cancelled (rollbacks)."""
        future = asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))
        with contextlib.suppress(asyncio.CancelledError):  # the worker finishes it anyway
            await asyncio.shield(future)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)


class ReadDeadline:
    """A client stream that must keep sending: idle too long, or too slow on average, and it is cut.

    Only the time spent waiting for the client counts: a stream that waits for a
    transfer slot or for the server to parse is not the client's fault. The rate
    is judged once the client has had ``idle`` seconds of waiting.
    """

    def __init__(
        self,
        source: AsyncIterator[Any],
        *,
        idle: float,
        min_rate: float,
        on_cut: Callable[[grpc.StatusCode, str], RoundError],
    ) -> None:
        self._source = source
        self.idle = idle
        self.min_rate = min_rate
        self._on_cut = on_cut
        self.waited = 0.0
        self.received = 0

    def __aiter__(self) -> ReadDeadline:
        return self

    async def __anext__(self) -> Any:
        timeout, by_rate = self.idle, False
        if self.min_rate > 0:
            budget = max(self.idle, self.received / self.min_rate) - self.waited
            if budget < timeout:
                timeout, by_rate = budget, True
        started = time.monotonic()
        try:
            if timeout <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(self._source.__anext__(), timeout)
        except TimeoutError:
            self.waited += time.monotonic() - started
            if by_rate:
                rate = self.received / max(self.waited, 1e-9)
                raise self._on_cut(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the stream averaged {rate:.0f} bytes/s, below the server's minimum of "
                    f"{self.min_rate:g} (min_upload_bytes_per_second); it was cut and nothing it "
                    "sent was kept",
                ) from None
            raise self._on_cut(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"nothing received for {self.idle:g} s (stream_idle_seconds); the stream was cut "
                "and nothing it sent was kept",
            ) from None
        self.waited += time.monotonic() - started
        self.received += message.ByteSize()
        return message


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, auth: Authenticator, admission: Admission, *, idle: float, min_rate: float) -> None:
        self.auth = auth
        self.admission = admission
        self.idle = idle
        self.min_rate = min_rate
        self._closing = asyncio.Event()

    def end_streams(self) -> None:
        """Shutdown (on the server's event loop): end every open stream to a client, and any
        that starts later, with UNAVAILABLE :data:`SHUTTING_DOWN` (uploads go on)."""
        self._closing.set()

    async def _until_closing(self, call: Awaitable[Any]) -> Any:
        """Serve ``call`` unless the server stops first: then cancel it and refuse.

        Cancelling runs the stream's own clean-up (a download's transfer slot, a watcher's
        online mark); what it sent needs no keeping: a node resumes a cut download, and
        replays round events, once it has reconnected.
        """
        work = asyncio.ensure_future(call)  # a task copies the context: CALLER stays set
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((work, closing), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the client went away: cut the work, let its clean-up run
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait((work,))
            if not work.cancelled():
                work.exception()  # it failed as it was cut: nobody is left to tell
            raise
        finally:
            closing.cancel()
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.wait((work,))
        if not work.cancelled():
            work.exception()  # whatever it raised while being cut, the status is the shutdown's
        raise shutting_down()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        return self._wrap(handler, details.method)

    # ------------------------------------------------------------ admission

    async def _admit(self, context: grpc.aio.ServicerContext, method: str, request: Any) -> Caller:
        """Identify and admit the caller, or abort the call with the refusal's status."""
        claimed = getattr(request, "node_name", "") if method.endswith("/Join") else ""
        try:
            who = self.auth.identify(
                context.auth_context(), context.invocation_metadata() or (), required_role(method), claimed
            )
            self.admission.enter(who)
        except Refusal as exc:
            metrics.CALLS_REFUSED.labels(exc.code.name.lower()).inc()
            await context.abort(exc.code, exc.message)
            raise  # unreachable: abort raises
        CALLER.set(who)
        bind_caller(who.role, who.name)
        return who

    def _deadline(self, source: AsyncIterator[Any], method: str, who: Caller) -> ReadDeadline:
        def cut(code: grpc.StatusCode, message: str) -> RoundError:
            audit("stream cut", who.name, role=who.role, method=method, code=code.name, reason=message)
            metrics.STREAMS_CUT.labels(code.name.lower()).inc()
            return RoundError(code, message)

        rate = self.min_rate if method in RATED_STREAMS else 0.0
        return ReadDeadline(source, idle=self.idle, min_rate=rate, on_cut=cut)

    async def _read_one(self, requests: AsyncIterator[Any], method: str, who: Caller) -> Any:
        request = await anext(self._deadline(requests, method, who), None)
        if request is None:
            raise RoundError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{method} takes one request message; none came"
            )
        return request

    async def _begin(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str, single: bool
    ) -> tuple[Caller, Any]:
        """Admit the caller, then read: its one request message (``single``), or wrap its stream.

        Admission comes before any read, so a call whose request never arrives is still
        counted against its identity and cut at the idle deadline. Only in insecure mode,
        where a Join may name its node in the request, is the request read first.
        """
        first = None
        if single and self.auth.insecure:
            try:
                first = await self._read_one(requests, method, Caller("unidentified", "client"))
            except RoundError as exc:
                await context.abort(exc.code, exc.message)
        who = await self._admit(context, method, first)
        try:
            if not single:
                return who, self._deadline(requests, method, who)
            return who, first if first is not None else await self._read_one(requests, method, who)
        except RoundError as exc:
            self.admission.leave(who)
            await context.abort(exc.code, exc.message)
        except BaseException:
            self.admission.leave(who)
            raise
        raise AssertionError("unreachable: abort raises")

    # ------------------------------------------------------------ wrapping

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The guarded handler. Every method is served as client-streaming: the wire format is
        the same, and it lets the guard admit the caller before the request message is read."""
        ser = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.unary_unary, method, True), **ser)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, False), **ser
            )
        single = handler.unary_stream is not None
        behaviour = handler.unary_stream if single else handler.stream_stream
        if inspect.isasyncgenfunction(behaviour):
            return grpc.stream_stream_rpc_method_handler(self._generator(behaviour, method, single), **ser)
        # A coroutine that writes with context.write (health Watch, FetchAggregate): ended at shutdown.
        return grpc.stream_stream_rpc_method_handler(
            self._unary(behaviour, method, single, ends_at_shutdown=True), **ser
        )

    def _unary(
        self, behaviour: Callable[..., Any], method: str, single: bool, *, ends_at_shutdown: bool = False
    ) -> Callable[..., Any]:
        async def guarded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            who, request = await self._begin(requests, context, method, single)
            try:
                result = behaviour(request, context)
                if ends_at_shutdown and inspect.isawaitable(result):
                    return await self._until_closing(result)
                # The generated base servicer's stubs are plain functions (UNIMPLEMENTED).
                return await result if inspect.isawaitable(result) else result
            except (RoundError, Refusal) as exc:
                await context.abort(exc.code, exc.message)
            except DatabaseUnavailable as exc:
                await context.abort(*database_unavailable(exc, method, who))
            except NotImplementedError:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"this server does not implement {method}")
            finally:
                self.admission.leave(who)

        return guarded

    def _generator(self, behaviour: Callable[..., Any], method: str, single: bool) -> Callable[..., Any]:
        async def guarded(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            who, request = await self._begin(requests, context, method, single)
            stream = behaviour(request, context)
            try:
                # Each step raced against shutdown: the round-event streams end by themselves
                # then (EventBus.close_all), but a stream waiting on its client (reflection) would not.
                while (reply := await self._until_closing(anext(stream, _END))) is not _END:
                    yield reply
            except (RoundError, Refusal) as exc:
                await context.abort(exc.code, exc.message)
            except DatabaseUnavailable as exc:
                await context.abort(*database_unavailable(exc, method, who))
            finally:
                try:
                    await stream.aclose()  # its clean-up now, not whenever it is collected
                finally:
                    self.admission.leave(who)

        return guarded
