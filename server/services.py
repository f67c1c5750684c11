"""The gRPC servicers (asyncio): thin adapters from RPCs to the round manager.

Who calls, with which role, within which limits, is settled before a handler
runs (``server/guard.py``); a handler reads the caller from ``guard.caller()``.
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

import grpc

from cipherhive import __version__
from cipherhive.layout import Layout
from cipherhive.logs import audit, event
from cipherhive.server import metrics
from cipherhive.server.guard import Runner, caller
from cipherhive.server.identity import Authenticator, Refusal
from cipherhive.server.ingest import ingest
from cipherhive.server.limits import Transfers
from cipherhive.server.publish import stream_sum
from cipherhive.server.rounds import STATE_NAMES, RoundError, RoundManager
from cipherhive.server.state import RoundRow
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.server")
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
    async def _one(self, kind: str) -> AsyncIterator[None]:
        """The caller's single upload or download (a second at the same time is refused)."""
        who = caller()
        self.transfers.claim(who, kind)
        try:
            yield
        finally:
            self.transfers.release(who, kind)

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        who = caller()
        layout = Layout.from_proto(request.layout)
        if request.layout.num_params != layout.num_params:
            raise RoundError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"layout.num_params {request.layout.num_params} is not the sum of its tensors' "
                f"sizes ({layout.num_params})",
            )
        try:
            await self.run(self.m.join, who.name, request.key_fingerprint, layout)
        except RoundError as exc:
            audit("join refused", who.name, role=who.role, reason=exc.message[:MAX_LOGGED])
            raise
        audit("join", who.name, role=who.role, version=request.software_version[:40])

        def reply() -> pb.JoinReply:
            latest = self.m.state.rounds(limit=1)
            return pb.JoinReply(
                node_name=who.name,
                settings=self.m.settings(),
                latest_round=latest[-1].round if latest else 0,
                latest_sum_round=self.m.state.latest_sum_round(),
            )

        return await self.run(reply)

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
            async with self._one("upload"):
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

    async def FetchAggregate(self, request: pb.FetchRequest, context: grpc.aio.ServicerContext) -> None:
        """Written with ``context.write`` under a deadline: a member that stops reading
        must not keep a transfer slot for ever."""
        who = caller()
        async with self._one("download"), self.transfers.slot():
            layout = await self.run(self.m.layout)
            chunks: Iterator[pb.AggregateChunk] = stream_sum(
                self.m.state,
                self.m.spool,
                request,
                layout.hash if layout else "",
                self.m.config.max_ciphertexts_per_chunk,
            )
            while (chunk := await self.run(next, chunks, None)) is not None:
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
    """History after ``since_round``, then live events, with heartbeats, until the call ends."""
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
                return
            revoked = auth.revoked(who)
            if revoked:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, revoked)
            yield got
    finally:
        manager.bus.unsubscribe(sub)


def round_info(manager: RoundManager, row: RoundRow, with_submissions: bool = True) -> pb.RoundInfo:
    info = pb.RoundInfo(
        round=row.round,
        state=STATE_NAMES[row.state],
        base_round=row.base_round,
        opened_unix=row.opened,
        deadline_unix=row.deadline,
        closed_unix=row.closed or 0.0,
        expected=len(row.expected),
        participants=row.participants,
        reason=row.reason,
    )
    if with_submissions:
        for sub in manager.state.submissions(row.round):
            info.submissions.append(
                pb.SubmissionInfo(
                    node_name=sub.node,
                    accepted_unix=sub.accepted,
                    num_bytes=sub.num_bytes,
                    metrics=sub.metrics,
                )
            )
    return info


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

    def _status(self) -> pb.StatusReply:
        rounds = self.m.state.rounds(limit=1)
        return pb.StatusReply(
            version=__version__,
            started_unix=self.started,
            settings=self.m.settings(),
            nodes_known=len(self.m.state.nodes()),
            nodes_online=len(self.m.online()),
            open_round=self.m.open_round_number(),
            latest_round=rounds[-1].round if rounds else 0,
            latest_sum_round=self.m.state.latest_sum_round(),
            rounds_failed=self.m.state.count_rounds("failed"),
            auto_start=self.m.config.auto_start,
            max_rounds=self.m.config.max_rounds,
        )

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        return await self.run(self._status)

    def _nodes(self) -> pb.ListNodesReply:
        online = set(self.m.online())
        return pb.ListNodesReply(
            nodes=[
                pb.NodeInfo(
                    name=n.name,
                    online=n.name in online,
                    first_seen_unix=n.first_seen,
                    last_seen_unix=n.last_seen,
                    last_round=n.last_round,
                    submissions=n.submissions,
                )
                for n in self.m.state.nodes()
            ]
        )

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodesReply:
        return await self.run(self._nodes)

    async def ListRounds(
        self, request: pb.ListRoundsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRoundsReply:
        def rounds() -> pb.ListRoundsReply:
            rows = self.m.state.rounds(limit=request.limit)
            return pb.ListRoundsReply(rounds=[round_info(self.m, row) for row in rows])

        return await self.run(rounds)

    async def GetRound(self, request: pb.GetRoundRequest, context: grpc.aio.ServicerContext) -> pb.RoundInfo:
        row = await self.run(self.m.state.round, request.round)
        if row is None:
            raise RoundError(grpc.StatusCode.NOT_FOUND, f"round {request.round} does not exist")
        return await self.run(round_info, self.m, row)

    async def StartRound(
        self, request: pb.StartRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoundInfo:
        if not 0 <= request.timeout_seconds <= 7 * 86400:
            raise RoundError(
                grpc.StatusCode.INVALID_ARGUMENT, "timeout_seconds must be 0 (configured) to 604800"
            )
        actor = caller().name
        row = await self.run(lambda: self.m.start_round(request.timeout_seconds, actor=actor))
        return await self.run(round_info, self.m, row)

    async def CloseRound(
        self, request: pb.CloseRoundRequest, context: grpc.aio.ServicerContext
    ) -> pb.RoundInfo:
        actor = caller().name
        row = await self.run(lambda: self.m.close_round(request.round, "closed by operator", actor=actor))
        return await self.run(round_info, self.m, row)

    async def WatchEvents(
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RoundEvent]:
        async for item in follow_events(self.m, self.run, self.auth, request.since_round, self._stopping):
            yield item
