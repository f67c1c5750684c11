"""A masked round's sum as Σ c0 (cipherhive.ckks.c0_sum): the server's checks without SEAL, exact
addition and rollback, unmasking, and a node's decryption with c1 rebuilt from the seeds;
then the same through the ingest worker processes (cipherhive.server.ingest.workers)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from cipherhive.bench.ingest import spool_uploads
from cipherhive.ckks import c0_sum, codec, seal_format
from cipherhive.ckks.codec import PublicCodec, SecretCodec
from cipherhive.secagg import masking
from cipherhive.secagg.masking import MaskPlan, SeedCheckFailed
from cipherhive.server.ingest.running_sum import MaskedSum
from cipherhive.server.ingest.workers import STRIPE, IngestWorkers, owner

MEMBERS = 4
N = codec.POLY_MODULUS_DEGREE


def _plans(q: int) -> list[MaskPlan]:
    keys_ = {(i, j): os.urandom(32) for i in range(MEMBERS) for j in range(i + 1, MEMBERS)}
    return [
        MaskPlan.fresh([(k, 1 if i == b else -1) for (a, b), k in keys_.items() if i in (a, b)], q)
        for i in range(MEMBERS)
    ]


def _uploads(secret: SecretCodec, blocks: int) -> tuple[list[list[bytes]], list[MaskPlan], np.ndarray]:
    """Every member's masked upload of ``blocks`` blocks, the plans, and the exact sum."""
    rng = np.random.default_rng(3)
    values = rng.normal(0, 0.05, size=(MEMBERS, blocks, N))
    plans = _plans(secret.modulus)
    uploads = [
        [secret.encrypt_masked(values[m, b], b, plans[m]) for b in range(blocks)] for m in range(MEMBERS)
    ]
    return uploads, plans, values.sum(axis=0)


def _decrypt(secret: SecretCodec, records: list[bytes], uploads: list[list[bytes]]) -> np.ndarray:
    return np.stack(
        [
            secret.decrypt_c0_sum(r, [masking.upload_seed(u[i]) for u in uploads], i)
            for i, r in enumerate(records)
        ]
    )


def test_the_c0_sum_decrypts_to_the_sum_and_rolls_back_bit_for_bit(
    secret: SecretCodec, public: PublicCodec
) -> None:
    uploads, plans, truth = _uploads(secret, 2)
    running = MaskedSum(public.upload_parser(), 2)
    for member in uploads[:3]:
        for i, blob in enumerate(member):
            running.add(i, running.load(blob))
    before = list(running.serialized())
    for i, blob in enumerate(uploads[3]):
        running.add(i, running.load(blob))
    after = list(running.serialized())
    assert running.subtract(uploads[3]) == 2
    assert list(running.serialized()) == before  # addition mod q is undone exactly
    for i, blob in enumerate(uploads[3]):
        running.add(i, running.load(blob))
    assert list(running.serialized()) == after
    running.remove_self_masks([p.self_seed for p in plans])
    records = list(running.serialized())
    assert all(len(r) == c0_sum.RECORD_BYTES for r in records)  # 8 bytes per value, not 16
    assert np.abs(_decrypt(secret, records, uploads) - truth).max() < 1e-8


def test_without_every_seed_or_with_the_self_masks_on_the_sum_is_noise(
    secret: SecretCodec, public: PublicCodec
) -> None:
    uploads, plans, truth = _uploads(secret, 1)
    running = MaskedSum(public.upload_parser(), 1)
    for member in uploads:
        running.add(0, running.load(member[0]))
    masked = list(running.serialized())
    # Self-masks still on: noise of the modulus' magnitude.
    assert np.median(np.abs(_decrypt(secret, masked, uploads))) > 1e4
    running.remove_self_masks([p.self_seed for p in plans])
    records = list(running.serialized())
    seeds = [masking.upload_seed(u[0]) for u in uploads]
    # A c1 rebuilt from one seed fewer is not the sum's: noise again, never the sum.
    wrong = secret.decrypt_c0_sum(records[0], seeds[:-1], 0)
    assert np.median(np.abs(wrong)) > 1e4
    assert np.abs(secret.decrypt_c0_sum(records[0], seeds, 0) - truth[0]).max() < 1e-8


def test_a_node_refuses_what_seal_would_not_load(secret: SecretCodec, public: PublicCodec) -> None:
    uploads, _, _ = _uploads(secret, 1)
    seeds = [masking.upload_seed(u[0]) for u in uploads]
    record = bytes(c0_sum.RECORD_BYTES)
    with pytest.raises(SeedCheckFailed, match="bytes"):
        secret.decrypt_c0_sum(record[:-8], seeds, 0)
    with pytest.raises(SeedCheckFailed, match="no seeds"):
        secret.decrypt_c0_sum(record, [], 0)
    unreduced = np.full(N, secret.modulus, dtype="<u8").tobytes()
    with pytest.raises(SeedCheckFailed, match="coefficients SEAL refuses"):
        secret.decrypt_c0_sum(unreduced, seeds, 0)
    garbage = seeds[1][:16] + b"\x07" + seeds[1][17:]
    with pytest.raises(SeedCheckFailed, match="seed SEAL cannot expand"):
        secret.decrypt_c0_sum(record, [seeds[0], garbage], 0)


def _tampered(blob: bytes, at: int, value: bytes) -> bytes:
    return blob[:at] + value + blob[at + len(value) :]


def test_the_server_checks_every_upload_without_seal(secret: SecretCodec, public: PublicCodec) -> None:
    parser = public.upload_parser()
    good = secret.encrypt_masked(np.ones(N), 0, MaskPlan.fresh([], secret.modulus))
    c0, seed = parser.parse(good)
    assert c0.shape == (N,) and seed == masking.upload_seed(good)
    meta_at = seal_format.HEADER.size
    c0_at = c0_sum.UPLOAD_BYTES - c0_sum.SEED_TRAILER_BYTES - c0_sum.RECORD_BYTES
    q = secret.modulus.to_bytes(8, "little")
    cases = [
        (good[:-1], "is 65730 bytes"),
        (secret.encrypt(np.ones(N)), "bytes"),  # SEAL's own output: zstd, another length
        (_tampered(good, meta_at + 33, b"\x03"), "parameters"),  # size 3
        (_tampered(good, meta_at + 57, np.float64(2.0**30).tobytes()), "parameters"),  # scale
        (_tampered(good, c0_at + 8 * 5, q), "not reduced"),
        (_tampered(good, c0_sum.UPLOAD_BYTES - c0_sum.SEED_TRAILER_BYTES + 16, b"\x09"), "seed"),
        (_tampered(good, 0, b"\x00\x00"), "SEAL object"),
    ]
    for blob, why in cases:
        with pytest.raises(c0_sum.UploadError, match=why):
            parser.parse(blob)


# ----------------------------------------------------------------------------- ingest workers


def test_ingest_workers_add_their_stripes_roll_back_and_report_bad_blocks(
    tmp_path: Path, secret: SecretCodec, public: PublicCodec
) -> None:
    blocks = 2 * STRIPE + 3  # three stripes: both workers own blocks
    assert {owner(i, 2) for i in range(blocks)} == {0, 1}
    uploads, plans, truth = _uploads(secret, blocks)
    spooled = spool_uploads(uploads, tmp_path)
    lost: list[str] = []
    pool = IngestWorkers(2, public.upload_parser(), lost.append)
    try:
        sharded = pool.attach(blocks)
        threads = []
        for m, (path, items) in enumerate(spooled[:3]):

            def feed(m: int = m, path: str = path, items: list[tuple[int, int, int]] = items) -> None:
                for start in range(0, blocks, STRIPE):
                    outcome = sharded.add_spooled(f"k{m}", path, items[start : start + STRIPE])
                    assert not outcome.error and len(outcome.done) == len(items[start : start + STRIPE])

            threads.append(threading.Thread(target=feed))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        before = list(sharded.serialized())
        # The fourth upload: added, then rolled back exactly.
        path, items = spooled[3]
        assert len(sharded.add_spooled("k3", path, items).done) == blocks
        sharded.subtract_spooled("k3", path, items)
        assert list(sharded.serialized()) == before
        # A bad block stops its worker's part at that block; what was added is reported.
        bad = tmp_path / "bad.ct"
        blob = bytearray(Path(path).read_bytes())
        offset, length = items[STRIPE + 1][1], items[STRIPE + 1][2]
        blob[offset + length - c0_sum.SEED_TRAILER_BYTES + 16] = 9  # an unknown PRNG
        bad.write_bytes(bytes(blob))
        outcome = sharded.add_spooled("bad", str(bad), items)
        assert f"ciphertext {STRIPE + 1}" in outcome.error and "seed" in outcome.error
        assert STRIPE + 1 not in outcome.done and STRIPE in outcome.done
        sharded.subtract_spooled("bad", str(bad), [items[i] for i in outcome.done])
        assert list(sharded.serialized()) == before
        assert len(sharded.add_spooled("k3", path, items).done) == blocks
        sharded.remove_self_masks([p.self_seed for p in plans])
        assert np.abs(_decrypt(secret, list(sharded.serialized()), uploads) - truth).max() < 1e-8
        sharded.release()
    finally:
        pool.close()
    assert lost == []


def test_a_dead_ingest_worker_is_reported_not_hidden(tmp_path: Path, public: PublicCodec) -> None:
    lost: list[str] = []
    done = threading.Event()

    def on_lost(why: str) -> None:
        lost.append(why)
        done.set()

    pool = IngestWorkers(2, public.upload_parser(), on_lost)
    try:
        sharded = pool.attach(4)
        pool.workers[1].process.kill()
        assert done.wait(10), "the loss of a worker must be reported"
        assert "ingest worker 1" in lost[0] and "exited" in lost[0]
        items = [(i, 0, 10) for i in range(2 * STRIPE)]  # the second stripe is worker 1's
        with pytest.raises(Exception, match="ingest worker 1"):
            sharded.add_spooled("k", str(tmp_path / "none"), items)
        sharded.release()
    finally:
        pool.close()


def test_without_room_in_dev_shm_a_round_adds_in_the_server_process(
    public: PublicCodec, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Writing past a full /dev/shm would kill the server (SIGBUS): it checks the room first."""
    import logging
    from types import SimpleNamespace

    from cipherhive.server.ingest.workers import ShardedSum
    from cipherhive.server.rounds import manager as round_manager

    pool = IngestWorkers(2, public.upload_parser(), lambda why: None)
    try:
        manager = SimpleNamespace(codec=public, ingest=pool)
        monkeypatch.setattr(round_manager, "shared_memory_free", lambda: 10 << 20)
        small = round_manager.RoundManager.new_sum(manager, 100, masked=True)  # type: ignore[arg-type]
        assert isinstance(small, ShardedSum)  # 6.6 MB fits in 10
        small.release()
        with caplog.at_level(logging.WARNING, logger="cipherhive.server.rounds"):
            big = round_manager.RoundManager.new_sum(manager, 1000, masked=True)  # type: ignore[arg-type]
        assert type(big) is MaskedSum
        assert "needs 62 MB of /dev/shm and 10 MB are free" in caplog.text
    finally:
        pool.close()


def test_member_and_server_state_the_same_upload_digests(secret: SecretCodec) -> None:
    """One computation on both sides (docs/spec/masked-round.md §5): the member's digests over
    its whole upload equal the server's, built with block hashes arriving out of order."""
    from cipherhive.secagg.commit import UploadDigests, block_digest, upload_digests

    uploads, _, _ = _uploads(secret, 3)
    blobs = uploads[0]
    server = UploadDigests()
    for blob in blobs:
        server.update(blob)  # seeds in order, as the stream arrives
    for index in reversed(range(len(blobs))):  # block hashes as the workers finish them
        assert server.final(len(blobs)) is None
        server.blocks[index] = block_digest(blobs[index])
    seeds_hash, blocks_hash = upload_digests(blobs)
    assert server.final(len(blobs)) == (seeds_hash, blocks_hash)
    assert seeds_hash != upload_digests(uploads[1])[0]
    assert [masking.upload_seed(b) for b in blobs] == [c0_sum.seed_trailer_of(b) for b in blobs]
