"""The round state the manager shares with its satellite modules, as one explicit interface.

``masked``, ``pinning``, ``withdrawal``, ``replay``, ``recovery`` and ``scheduler`` take a
:class:`RoundContext` (and, when they must open or close a round, a :class:`RoundControl`)
instead of the manager itself: they import this module, never ``manager``, so the round
package has no import cycle, and what they may touch is written down here.

One lock (:attr:`RoundContext.lock`) guards the open round, its running sum and the set
of uploads in flight (see ``manager``); :attr:`RoundContext.open` is read and replaced
only under it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509

from cipherhive.ckks import codec
from cipherhive.federation.layout import Layout
from cipherhive.pki import enrolment_certs
from cipherhive.server.config import ServerConfig
from cipherhive.server.ingest.running_sum import MaskedSum, RunningSum
from cipherhive.server.ingest.workers import Outcome
from cipherhive.server.rounds.events import EventBus
from cipherhive.server.rounds.mask_state import MaskState, UploadDigests
from cipherhive.server.storage.rows import RoundRow, SubmissionRow
from cipherhive.server.storage.spool import Spool, SubmissionWriter
from cipherhive.server.storage.store import RoundStore
from cipherhive.v1 import federation_pb2 as pb

__all__ = ["OpenRound", "RoundContext", "RoundControl", "Upload", "Verdict"]


@dataclass(frozen=True)
class Verdict:
    """Why a round fails now: the step that decided it, whom it names, and in words
    (docs/spec/masked-round.md §10). ``culprits`` are the members the failure is charged to."""

    step: str
    reason: str
    culprits: tuple[str, ...] = ()


@dataclass
class Upload:
    node: str
    submission_id: str
    writer: SubmissionWriter
    added: int = 0
    aborted: str | None = None
    accepted: bool = False
    #: Masked rounds: what the member's commit must hash to, computed as the blocks arrive.
    digests: UploadDigests | None = None
    #: Sharded sums: (offset, length) of each spooled block, the blocks the workers added,
    #: and whether a chunk is with the workers right now (a rollback then waits for it).
    spooled: list[tuple[int, int]] = field(default_factory=list)
    added_blocks: list[int] = field(default_factory=list)
    #: Chunks sent to the workers whose outcome is not recorded yet, oldest first; the first
    #: block a worker refused; who may wait for the oldest chunk right now.
    pending: deque[list[Future[Outcome]]] = field(default_factory=deque)
    failed: str = ""
    settling: threading.Lock = field(default_factory=threading.Lock)
    #: CPU seconds the ingest workers spent on this upload (the ingest rate metric).
    busy: float = 0.0

    def key(self, number: int) -> str:
        return f"{number}/{self.node}/{self.submission_id}"


@dataclass
class OpenRound:
    row: RoundRow
    running: RunningSum | MaskedSum
    num_values: int
    accepted: dict[str, SubmissionRow] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)
    closing: bool = False
    #: Masked rounds: members, commits and released seeds (``secagg``).
    mask: MaskState | None = None
    #: The self-masks were already subtracted (a retried close must not subtract them twice).
    unmasked: bool = False
    #: Masked rounds: (H(seeds), H(blocks)) of each accepted upload, hashed at ingest (lost
    #: on a restart, when the commit check reads the spool instead).
    digests: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    #: Uploads rolled back while some of their chunks were still with the ingest workers.
    uploads_aborted: list[Upload] = field(default_factory=list)
    #: Decided while the round was open (a withdrawal, an upload for a replaced roster): the
    #: scheduler fails the round with it at its next step.
    verdict: Verdict | None = None

    @property
    def number(self) -> int:
        return self.row.round


class RoundControl(Protocol):
    """What only the manager does, for the satellites that trigger it (the scheduler opens and
    closes rounds, a withdrawal fails the open round built on it, recovery rebuilds a sum)."""

    def start_round(
        self, timeout: float = 0.0, actor: str = "scheduler", force: bool = False
    ) -> RoundRow: ...

    def close_round(
        self,
        number: int,
        reason: str,
        actor: str = "scheduler",
        *,
        fail_reason: str = "",
        verdict: Verdict | None = None,
    ) -> RoundRow: ...

    def new_sum(self, num_blocks: int, *, masked: bool) -> RunningSum | MaskedSum: ...


class RoundContext:
    """The manager's shared round state: the lock, the open round, presence, the wake-up,
    the event bus and the stores, plus the read-only answers built from them."""

    def __init__(
        self,
        config: ServerConfig,
        state: RoundStore,
        spool: Spool,
        public: codec.ServerCodec,
        fingerprint: str,
        bus: EventBus,
    ) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.codec = public
        self.fingerprint = fingerprint
        self.bus = bus
        #: Guards ``open``, its running sum, its uploads, and presence (re-entrant: the
        #: manager's helpers take it again).
        self.lock = threading.RLock()
        #: The open round (None: none is open); read and replaced under ``lock``.
        self.open: OpenRound | None = None
        #: Watch streams open per node (under ``lock``).
        self.watchers: Counter[str] = Counter()
        #: Nodes that joined successfully since this server started: only they can be online.
        self.joined: set[str] = set()
        #: When the last round closed (the scheduler waits ``interval_seconds`` after it).
        self.last_closed = 0.0
        #: When each node's last watch stream ended (under ``lock``); a node never seen since
        #: this server started counts as gone since then.
        self.absent_since: dict[str, float] = {}
        self.started = time.time()
        #: Revocations for enrolment certificates (set by the daemon; None: no CRL configured).
        self.revocations: enrolment_certs.RevocationCheck | None = None
        self._ca: x509.Certificate | None = None
        self._layout_cache: tuple[str, Layout] | None = None
        self._wake = threading.Event()

    # ------------------------------------------------------------ scheduler wake-up

    def wake(self) -> None:
        """Something changed that may let the scheduler close or open a round: look now."""
        self._wake.set()

    def wait_for_wake(self, timeout: float) -> None:
        """The scheduler's pause between steps: until woken or ``timeout`` seconds."""
        self._wake.wait(timeout)
        self._wake.clear()

    # ------------------------------------------------------------ answers from the state

    def layout(self) -> Layout | None:
        """The pinned layout (parsed once per change: it is read on every upload)."""
        text = self.state.get_meta("layout")
        if text is None:
            return None
        cached = self._layout_cache
        if cached is None or cached[0] != text:
            cached = (text, Layout.from_canonical(text))
            self._layout_cache = cached
        return cached[1]

    def blocks(self, num_values: int) -> int:
        return codec.blocks_for(num_values, self.codec.values_per_block)

    def ca_certificate(self) -> x509.Certificate:
        """The federation CA (loaded once): enrolment certificates must chain to it."""
        if self._ca is None:
            assert self.config.tls_ca is not None
            self._ca = x509.load_pem_x509_certificate(self.config.tls_ca.read_bytes())
        return self._ca

    def online(self) -> list[str]:
        """Joined and watching: a watch stream alone does not make a member online."""
        with self.lock:
            return sorted(n for n in self.watchers if n in self.joined)

    def absent_for(self, node: str, now: float) -> float:
        """Seconds since ``node`` was last online (0: online now)."""
        with self.lock:
            if node in self.joined and self.watchers.get(node, 0) > 0:
                return 0.0
            return max(0.0, now - self.absent_since.get(node, self.started))

    def open_row(self) -> RoundRow | None:
        """The open round's row, unless it is closing."""
        with self.lock:
            return self.open.row if self.open is not None and not self.open.closing else None

    def event(
        self,
        kind: pb.RoundEvent.Kind,
        row: RoundRow,
        *,
        reason: str = "",
        participants: int | None = None,
        replay: bool = False,
    ) -> pb.RoundEvent:
        """The RoundEvent a round row announces (live, or replayed to a reconnecting watcher)."""
        if not reason:
            reason = row.withdrawn_reason if kind == pb.RoundEvent.WITHDRAWN else row.reason
        return pb.RoundEvent(
            kind=kind,
            round=row.round,
            base_round=row.base_round,
            reason=reason,
            deadline_unix=row.deadline,
            expected=len(row.expected),
            participants=row.participants if participants is None else participants,
            replay=replay,
            time_unix=time.time(),
            # Rows from before the floor was recorded (schema 1) fall back to the setting.
            min_participants=row.min_participants or self.config.min_participants,
            masked=bool(row.masked),
            nonce=row.nonce or b"",
            enrol_deadline_unix=row.enrol_deadline,
        )
