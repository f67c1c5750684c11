"""The gRPC servicers: thin adapters from RPCs to the round manager.

Every handler identifies the caller first (certificate, role), validates
what it received, and turns refusals into a gRPC status with a message a
person can act on; an exception in one call never affects another.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import grpc

from cipherhive.logs import audit, event
from cipherhive.server import metrics, views
from cipherhive.server.identity import Authenticator, Caller
from cipherhive.server.ingest import ingest
from cipherhive.server.limits import Limiter
from cipherhive.server.publish import stream_sum
from cipherhive.server.rounds import RoundError, RoundManager
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger("cipherhive.server")
#: How long a transfer waits for a slot before the caller is told to retry.
TRANSFER_WAIT_SECONDS = 60.0
R = TypeVar("R")


class Gate:
    """Identify the caller, then hold one of its call slots (rate and concurrency limits)."""

    def __init__(self, auth: Authenticator, limiter: Limiter) -> None:
        self.auth = auth
        self.limiter = limiter

    @contextmanager
    def enter(self, context: grpc.ServicerContext, role: str, claimed: str = "") -> Iterator[Caller]:
        caller = self.auth.require(context, role, claimed)
        with self.limiter.admit(caller.name, context):
            yield caller


def _guard(context: grpc.ServicerContext, call: Callable[[], R]) -> R:
    """Run ``call``, turning a RoundError into the matching gRPC status."""
    try:
        return call()
    except RoundError as exc:
        context.abort(exc.code, exc.message)
        raise  # unreachable: abort raises


class AggregationService(pb_grpc.AggregationServicer):
    def __init__(self, manager: RoundManager, gate: Gate, stopping: Callable[[], bool]) -> None:
        self.m = manager
        self.gate = gate
        self._stopping = stopping

    @contextmanager
    def _transfer_slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Wait for one of the few transfer slots; a stream that waits is not read, so
        flow control holds its data on the sender's side instead of in this process."""
        if not self.m.transfer_slots.acquire(timeout=TRANSFER_WAIT_SECONDS):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is busy with other transfers; retry"
            )
        try:
            yield
        finally:
            self.m.transfer_slots.release()

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        with self.gate.enter(context, "node", claimed=request.node_name) as caller:
            return _guard(context, lambda: views.join_reply(self.m, caller.name, request))

    def ReportOutcome(self, request: pb.OutcomeReport, context: grpc.ServicerContext) -> pb.OutcomeAck:
        with self.gate.enter(context, "node") as caller:
            return _guard(context, lambda: views.report_outcome(self.m, caller.name, request))

    def WatchRounds(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.RoundEvent]:
        with self.gate.enter(context, "node") as caller:
            self.m.watcher_enter(caller.name)
            event(log, "node online", node=caller.name)
            try:
                yield from follow_events(self.m, request.since_round, context, self._stopping, self.gate.auth)
            finally:
                self.m.watcher_exit(caller.name)
                event(log, "node offline", node=caller.name)

    def SubmitUpdate(
        self, request_iterator: Iterator[pb.SubmitRequest], context: grpc.ServicerContext
    ) -> pb.SubmitReceipt:
        with self.gate.enter(context, "node") as caller, self._transfer_slot(context):
            try:
                return ingest(self.m, caller.name, request_iterator, self.m.config.max_ciphertexts_per_chunk)
            except RoundError as exc:
                audit("submission refused", caller.name, code=exc.code.name, reason=exc.message)
                metrics.SUBMISSIONS.labels(exc.code.name.lower()).inc()
                context.abort(exc.code, exc.message)
                raise

    def FetchAggregate(
        self, request: pb.FetchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.AggregateChunk]:
        with self.gate.enter(context, "node") as caller, self._transfer_slot(context):
            layout = self.m.layout()
            try:
                yield from stream_sum(
                    self.m.state,
                    self.m.spool,
                    request,
                    layout.hash if layout else "",
                    self.m.config.max_ciphertexts_per_chunk,
                    keep_sums=self.m.config.keep_sums,
                )
            except RoundError as exc:
                context.abort(exc.code, exc.message)
            event(log, "sum served", node=caller.name, round=request.round)


def follow_events(
    manager: RoundManager,
    since_round: int,
    context: grpc.ServicerContext,
    stopping: Callable[[], bool],
    auth: Authenticator,
) -> Iterator[pb.RoundEvent]:
    """History after ``since_round``, then live events, with heartbeats, until the call ends."""
    q = manager.bus.subscribe()
    try:
        yield from manager.history(since_round)
        heartbeat = manager.config.heartbeat_seconds
        last = time.monotonic()
        while context.is_active() and not stopping():
            try:
                item = q.get(timeout=min(heartbeat, 0.5))
            except queue.Empty:
                if time.monotonic() - last < heartbeat:
                    continue
                item = pb.RoundEvent(kind=pb.RoundEvent.HEARTBEAT, time_unix=time.time())
            if item is None:
                return
            revoked = auth.revoked(context)
            if revoked:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, revoked)
            last = time.monotonic()
            yield item
    finally:
        manager.bus.unsubscribe(q)


class AdminService(pb_grpc.AdminServicer):
    def __init__(
        self, manager: RoundManager, gate: Gate, started: float, stopping: Callable[[], bool]
    ) -> None:
        self.m = manager
        self.gate = gate
        self.started = started
        self._stopping = stopping

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        with self.gate.enter(context, "admin"):
            return views.status(self.m, self.started)

    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesReply:
        with self.gate.enter(context, "admin"):
            return views.list_nodes(self.m)

    def ListRounds(self, request: pb.ListRoundsRequest, context: grpc.ServicerContext) -> pb.ListRoundsReply:
        with self.gate.enter(context, "admin") as caller:
            return _guard(context, lambda: views.list_rounds(self.m, request, caller.name))

    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> pb.RoundInfo:
        with self.gate.enter(context, "admin"):
            return _guard(context, lambda: views.get_round(self.m, request.round))

    def StartRound(self, request: pb.StartRoundRequest, context: grpc.ServicerContext) -> pb.RoundInfo:
        with self.gate.enter(context, "admin") as caller:
            return _guard(context, lambda: views.start_round(self.m, request, caller.name))

    def CloseRound(self, request: pb.CloseRoundRequest, context: grpc.ServicerContext) -> pb.RoundInfo:
        with self.gate.enter(context, "admin") as caller:
            return _guard(context, lambda: views.close_round(self.m, request, caller.name))

    def WatchEvents(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.RoundEvent]:
        with self.gate.enter(context, "admin"):
            yield from follow_events(self.m, request.since_round, context, self._stopping, self.gate.auth)

    def WithdrawRound(self, request: pb.WithdrawRoundRequest, context: grpc.ServicerContext) -> pb.RoundInfo:
        with self.gate.enter(context, "admin") as caller:
            return _guard(context, lambda: views.withdraw(self.m, request, caller.name))

    def SetLayout(self, request: pb.SetLayoutRequest, context: grpc.ServicerContext) -> pb.LayoutReply:
        with self.gate.enter(context, "admin") as caller:
            return _guard(context, lambda: views.set_layout(self.m, request, caller.name))

    def ResetLayout(self, request: pb.ResetLayoutRequest, context: grpc.ServicerContext) -> pb.LayoutReply:
        with self.gate.enter(context, "admin") as caller:
            return _guard(context, lambda: views.reset_layout(self.m, caller.name))
