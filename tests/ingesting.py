"""Drive the server's own (asyncio) ingest path from a list of messages, in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from cipherhive.server.api.guard import Runner
from cipherhive.server.ingest.upload_stream import ingest
from cipherhive.server.rounds.manager import RoundManager
from cipherhive.v1 import federation_pb2 as pb

_RUNNER = Runner(2)


@asynccontextmanager
async def _no_wait() -> AsyncIterator[None]:
    yield


def ingest_messages(manager: RoundManager, node: str, messages: list[pb.SubmitRequest]) -> pb.SubmitReceipt:
    """One upload, as the servicer would run it: no transfer slot to wait for, never revoked."""

    async def stream() -> AsyncIterator[pb.SubmitRequest]:
        for message in messages:
            yield message

    async def go() -> pb.SubmitReceipt:
        return await ingest(manager, node, stream(), run=_RUNNER, slot=_no_wait, revoked=lambda: "")

    return asyncio.run(go())
