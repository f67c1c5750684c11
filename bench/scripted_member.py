"""A member of the federation that a script plays itself, step by step through a masked round.

It holds the federation's secret key and a member's certificates, like a real
node, but its caller decides what it does at each step: it can collude with the
server's operator (read the spool), withhold its upload or its seed, or send
steps a real node never would. Everything it sends goes over the real wire
(mutual TLS) to a real server process (docs/spec/masked-round.md). The tests
play it, and so does the hostile-member benchmark (:mod:`cipherhive.bench.hostile`),
which is why it lives in the installed package, beside the benchmarks (no product
code plays it), rather than beside the tests.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field

import grpc
import numpy as np

from cipherhive.ckks import codec, keys
from cipherhive.demo.federation import LocalFederation
from cipherhive.federation.layout import Layout
from cipherhive.node.secagg.participation import MaskingSetup, Participation
from cipherhive.node.secagg.release_ledger import ReleaseLedger
from cipherhive.node.secagg.sum_proof import check_seed_hashes, verify_proof
from cipherhive.node.training.update import leading
from cipherhive.pki import certs
from cipherhive.runtime.transport import ClientTLS, channel
from cipherhive.secagg.chain import ChainHash, sum_digest
from cipherhive.v1 import federation_pb2 as pb
from cipherhive.v1 import federation_pb2_grpc as pb_grpc

__all__ = ["Member"]


@dataclass
class Member:
    fed: LocalFederation
    name: str
    layout: Layout
    members: list[str]
    floor: int = 3
    events: queue.Queue[pb.RoundEvent] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        d = self.fed.workdir / self.name
        self.channel = channel(
            f"127.0.0.1:{self.fed.port}",
            ClientTLS(d / f"{self.name}.crt", d / f"{self.name}.key", d / "ca.crt", "localhost"),
        )
        self.stub = pb_grpc.AggregationStub(self.channel)
        secret = keys.read_secret_context(self.fed.workdir / "keys" / keys.SECRET_FILE)
        self.codec = codec.SecretCodec(secret)
        import tenseal as ts

        self.fingerprint = keys.fingerprint(ts.context_from(secret))
        self.setup = MaskingSetup.load(
            members=self.members,
            floor=self.floor,
            tls_cert=d / f"{self.name}.crt",
            tls_ca=d / "ca.crt",
            enrol_cert=d / f"{self.name}.enrol.crt",
            enrol_key=d / f"{self.name}.enrol.key",
            crl=self.fed.workdir / "ca" / certs.CRL,
            aggregator="localhost",
            federation_fingerprint=self.fingerprint,
        )
        self.chain = ChainHash.genesis(self.fingerprint, self.layout.hash)
        self.ledger = ReleaseLedger.init(self.fed.workdir / f"{self.name}-test-ledger.json")
        self.blocks = codec.blocks_for(self.layout.num_values, self.codec.values_per_block)
        self._watch: threading.Thread | None = None

    # ------------------------------------------------------------ connection

    def join(self) -> None:
        self.stub.Join(
            pb.JoinRequest(key_fingerprint=self.fingerprint, layout=self.layout.to_proto()), timeout=30
        )
        stream = self.stub.WatchRounds(pb.WatchRequest(since_round=0))

        def pump() -> None:
            try:
                for ev in stream:
                    self.events.put(ev)
            except grpc.RpcError:
                pass

        self._watch = threading.Thread(target=pump, daemon=True)
        self._watch.start()
        self._stream = stream

    def close(self) -> None:
        if self._watch is not None:
            self._stream.cancel()
        self.channel.close()

    def wait(self, kind: pb.RoundEvent.Kind, number: int, timeout: float = 90) -> pb.RoundEvent:
        """The next event of ``kind`` for round ``number`` (others are dropped)."""
        while True:
            ev = self.events.get(timeout=timeout)
            if ev.kind == kind and ev.round == number:
                return ev
            if ev.kind == pb.RoundEvent.FAILED and ev.round == number and kind != pb.RoundEvent.FAILED:
                raise AssertionError(f"round {number} failed while waiting: {ev.reason}")

    # ------------------------------------------------------------ protocol steps

    def enrol(self, opened: pb.RoundEvent) -> Participation:
        part = Participation.enrol(
            self.setup, opened.round, opened.base_round, opened.nonce, self.chain.value, self.blocks
        )
        self.stub.Enrol(pb.EnrolRequest(round=opened.round, enrolment=part.enrolment.encode()), timeout=30)
        return part

    def vector(self, update: np.ndarray, weight: float) -> np.ndarray:
        """The encrypted vector ``[w, 1.0, e…, w·Δ]`` of an update (no evaluation: zero slots)."""
        return np.concatenate([leading(weight), weight * update.astype(np.float64)])

    def upload(self, part: Participation, vector: np.ndarray, round_number: int, base_round: int) -> None:
        plan = part.mask_plan(self.codec.modulus)
        step = self.codec.values_per_block
        blobs = (
            self.codec.encrypt_masked(vector[i * step : (i + 1) * step], i, plan) for i in range(self.blocks)
        )
        upload = part.write_upload(self.fed.workdir / f"{self.name}-upload-{round_number}.ct", blobs)
        assert part.roster is not None
        header = pb.SubmitHeader(
            round=round_number,
            base_round=base_round,
            submission_id=f"test-{self.name}-{round_number}",
            layout_hash=self.layout.hash,
            key_fingerprint=self.fingerprint,
            num_values=self.layout.num_values,
            num_ciphertexts=self.blocks,
            roster_hash=part.roster.hash,
        )
        requests = [pb.SubmitRequest(header=header)]
        for i, blob in enumerate(upload.blobs()):
            requests.append(
                pb.SubmitRequest(chunk=pb.SubmitChunk(index=i, first_ciphertext=i, ciphertexts=[blob]))
            )
        self.stub.SubmitUpdate(iter(requests), timeout=60)

    def commit(self, part: Participation, round_number: int) -> None:
        self.stub.SubmitCommit(pb.CommitRequest(round=round_number, commit=part.commit()), timeout=30)

    def release(self, part: Participation, commits: pb.RoundEvent) -> None:
        seed = part.release(list(commits.commits), self.ledger, f"test-{commits.round}")
        self.stub.ReleaseSeed(pb.ReleaseRequest(round=commits.round, seed=seed), timeout=30)

    # ------------------------------------------------------------ the sum

    def fetch_sum(self, number: int) -> tuple[list[bytes], list[list[bytes]]]:
        blobs: list[bytes] = []
        seeds: list[list[bytes]] = []
        for chunk in self.stub.FetchAggregate(pb.FetchRequest(round=number), timeout=60):
            blobs.extend(chunk.ciphertexts)
            seeds.extend(list(s.seeds) for s in chunk.seeds)
        return blobs, seeds

    def checked_sum(self, number: int) -> np.ndarray:
        """What a node does: proof, seeds against the commits, then decrypt with c1 from the seeds."""
        proof = self.stub.GetRoundProof(pb.ProofRequest(round=number), timeout=30)
        proven = verify_proof(
            self.setup, proof, round_number=number, chain_hash=self.chain.value, block_count=self.blocks
        )
        blobs, seeds = self.fetch_sum(number)
        check_seed_hashes(proven, seeds)
        self.chain.apply(sum_digest(blobs))
        # The sum is Σ c0 alone; c1 is rebuilt from the checked seeds (cipherhive.ckks.c0_sum).
        decrypted = [
            self.codec.decrypt_c0_sum(blob, block_seeds, index)
            for index, (blob, block_seeds) in enumerate(zip(blobs, seeds, strict=True))
        ]
        return np.concatenate(decrypted)[: self.layout.num_values]
