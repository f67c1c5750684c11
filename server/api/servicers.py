"""The gRPC servicers (asyncio): thin adapters from RPCs to the round manager.

Who calls, with which role, within which limits, is settled before a handler
runs (``server/api/guard.py``); a handler reads the caller from ``guard.caller()``.
Handlers run on the event loop and hand everything that blocks (the round
manager's lock, SQLite, ciphertext parsing, sum files) to the bounded worker
pool, so an open stream costs no thread. Refusals raise ``RoundError`` or
``Refusal``, which the guard turns into the gRPC status; an exception in one
call never affects another.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc

from cipherhive.runtime.logs import audit, event
from cipherhive.server import metrics
from cipherhive.server.api import handlers
from cipherhive.server.api.guard import Runner, caller, shutting_down
from cipherhive.server.api.identity import Authenticator, Refusal
from cipherhive.server.api.limits import Transfers
from cipherhive.server.api.sum_stream import stream_sum
from cipherhive.server.ingest.upload_stream import ingest
from cipherhive.server.rounds.manager import RoundError, RoundManager
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.server")
Reply = TypeVar("Reply")
#: Client-supplied strings are cut to this length before they are logged.
MAX_LOGGED = 200


class AggregationService(pb_grpc.AggregationServicer):
    def __init__(
        self,
        manager: RoundManager,
        run: Runner,
        transfers: Transfers,
        auth: Authenticator,
        stopping: Callable[[], bool],
        write_timeout: float,
    ) -> None:
        self.m = manager
        self.run = run
        self.transfers = transfers
        self.auth = auth
        self._stopping = stopping
        self.write_timeout = write_timeout

    @asynccontextmanager
    async def _one(self, kind: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """The caller's single upload or download (a second at the same time is refused)."""
        who = caller()
        self.transfers.claim(who, kind, context)
        try:
            yield
        finally:
            self.transfers.release(who, kind, context)

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        who = caller()
        return await self.run(handlers.join_reply, self.m, who.name, request, who.serial)

    async def ReportOutcome(
        self, request: pb.OutcomeReport, context: grpc.aio.ServicerContext
    ) -> pb.OutcomeAck:
        return await self.run(handlers.report_outcome, self.m, caller().name, request)

    # Masked rounds (docs/spec/masked-round.md): each body is short and runs in a worker thread.

    async def Enrol(self, request: pb.EnrolRequest, context: grpc.aio.ServicerContext) -> pb.EnrolReply:
        return await self._masked("enrolment", self.m.enrol, request)

    async def SubmitCommit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitReply:
        return await self._masked("commit", self.m.submit_commit, request)

    async def ReleaseSeed(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseReply:
        return await self._masked("self-mask release", self.m.release_seed, request)

    async def Withdraw(
        self, request: pb.WithdrawRequest, context: grpc.aio.ServicerContext
    ) -> pb.WithdrawReply:
        return await self._masked("withdrawal", self.m.withdraw, request)

    async def GetRoundProof(
        self, request: pb.ProofRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoundProof:
        return await self.run(self.m.round_proof, request.round)

    async def GetRevocationList(
        self, request: pb.RevocationListRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevocationList:
        return await self.run(handlers.revocation_list, self.auth.revocation_list)

    async def _masked(self, what: str, body: Callable[..., Reply], request: Any) -> Reply:
        """Run one masked-round step; a refusal is audited with who made it."""
        who = caller()
        try:
            return await self.run(body, who, request)
        except RoundError as exc:
            audit(
                f"{what} refused",
                who.name,
                round=request.round,
                code=exc.code.name,
                reason=exc.message[:MAX_LOGGED],
            )
            raise

    async def WatchRounds(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RoundEvent]:
        who = caller()
        await self.run(self.m.watcher_enter, who.name)
        event(log, "node online", node=who.name)
        try:
            async for item in follow_events(self.m, self.run, self.auth, request.since_round, self._stopping):
                yield item
        finally:
            await self.run.surely(self.m.watcher_exit, who.name)
            event(log, "node offline", node=who.name)

    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[pb.SubmitRequest], context: grpc.aio.ServicerContext
    ) -> pb.SubmitReceipt:
        who = caller()
        try:
            async with self._one("upload", context):
                return await ingest(
                    self.m,
                    who.name,
                    request_iterator,
                    run=self.run,
                    slot=self.transfers.slot,
                    revoked=lambda: self.auth.revoked(who),
                )
        except (RoundError, Refusal) as exc:
            audit(
                "submission refused",
                who.name,
                role=who.role,
                code=exc.code.name,
                reason=exc.message[:MAX_LOGGED],
            )
            metrics.SUBMISSIONS.labels(exc.code.name.lower()).inc()
            raise

    async def _next_chunk(self, chunks: Iterator[pb.AggregateChunk]) -> pb.AggregateChunk | None:
        """The next chunk of a sum; a refusal (no such round, withdrawn, pruned) is audited."""
        try:
            return await self.run(next, chunks, None)
        except RoundError as exc:
            who = caller()
            audit("download refused", who.name, code=exc.code.name, reason=exc.message[:MAX_LOGGED])
            raise

    async def FetchAggregate(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> None:
        """Written with ``context.write`` under a deadline: a member that stops reading
        must not keep a transfer slot for ever."""
        who = caller()
        async with self._one("download", context), self.transfers.slot():
            layout = await self.run(self.m.layout)
            chunks: Iterator[pb.AggregateChunk] = stream_sum(
                self.m.state,
                self.m.spool,
                request,
                layout.hash if layout else "",
                self.m.config.max_ciphertexts_per_chunk,
                keep_sums=self.m.config.keep_sums,
            )
            while (chunk := await self._next_chunk(chunks)) is not None:
                try:
                    await asyncio.wait_for(context.write(chunk), self.write_timeout)
                except TimeoutError:
                    reason = f"the client read nothing for {self.write_timeout:g} s; download cut"
                    audit("stream cut", who.name, role=who.role, method="FetchAggregate", reason=reason)
                    raise RoundError(grpc.StatusCode.DEADLINE_EXCEEDED, reason) from None
            event(log, "sum served", node=who.name, round=request.round)


async def follow_events(
    manager: RoundManager,
    run: Runner,
    auth: Authenticator,
    since_round: int,
    stopping: Callable[[], bool],
) -> AsyncIterator[pb.RoundEvent]:
    """History after ``since_round``, then live events, with heartbeats, until the call ends.

    It never ends with OK: at shutdown (``EventBus.close_all`` wakes it) it ends with
    UNAVAILABLE ``SHUTTING_DOWN``, which nodes take as "the server is restarting".
    """
    who = caller()
    sub = manager.bus.subscribe()
    try:
        for item in await run(manager.history, since_round):
            yield item
        heartbeat = manager.config.heartbeat_seconds
        while not stopping():
            try:
                got = await asyncio.wait_for(sub.get(), heartbeat)
            except TimeoutError:
                got = pb.RoundEvent(kind=pb.RoundEvent.HEARTBEAT, time_unix=time.time())
            if got is None:
                if sub.overflowed:
                    raise Refusal(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "this stream fell too far behind (not reading events); reconnect",
                    )
                break  # woken for shutdown
            revoked = auth.revoked(who)
            if revoked:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, revoked)
            yield got
        raise shutting_down()
    finally:
        manager.bus.unsubscribe(sub)


class AdminService(pb_grpc.AdminServicer):
    """Operator calls; each body runs in a worker thread (database and round lock)."""

    def __init__(
        self,
        manager: RoundManager,
        run: Runner,
        auth: Authenticator,
        started: float,
        stopping: Callable[[], bool],
    ) -> None:
        self.m = manager
        self.run = run
        self.auth = auth
        self.started = started
        self._stopping = stopping

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        return await self.run(handlers.status, self.m, self.started)

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodesReply:
        return await self.run(handlers.list_nodes, self.m)

    async def ListRounds(
        self, request: pb.ListRoundsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRoundsReply:
        return await self.run(handlers.list_rounds, self.m, request, caller().name)

    async def GetRound(self, request: pb.GetRoundRequest, context: grpc.aio.ServicerContext) -> pb.RoundInfo:
        return await self.run(handlers.get_round, self.m, request.round)

    async def StartRound(
        self, request: pb.StartRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoundInfo:
        return await self.run(handlers.start_round, self.m, request, caller().name)

    async def CloseRound(
        self, request: pb.CloseRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoundInfo:
        return await self.run(handlers.close_round, self.m, request, caller().name)

    async def WithdrawRound(
        self, request: pb.WithdrawRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoundInfo:
        return await self.run(handlers.withdraw, self.m, request, caller().name)

    async def SetLayout(
        self, request: pb.SetLayoutRequest, context: grpc.aio.ServicerContext
    ) -> pb.LayoutReply:
        return await self.run(handlers.set_layout, self.m, request, caller().name)

    async def ReadmitNode(
        self, request: pb.ReadmitNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeInfo:
        return await self.run(handlers.readmit_node, self.m, request.name, caller().name)

    async def ResetLayout(
        self, request: pb.ResetLayoutRequest, context: grpc.aio.ServicerContext
    ) -> pb.LayoutReply:
        return await self.run(handlers.reset_layout, self.m, caller().name)

    async def WatchEvents(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RoundEvent]:
        async for item in follow_events(self.m, self.run, self.auth, request.since_round, self._stopping):
            yield item
