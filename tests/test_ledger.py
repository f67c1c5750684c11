"""The release ledger fails closed (docs/spec/masked-round.md §6): when unsure, no release and no upload."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cipherhive.node.secagg.release_ledger import FILE_NAME, LedgerError, ReleaseLedger
from cipherhive.runtime import fsutil


@pytest.fixture()
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / FILE_NAME


def test_release_once_per_base_then_no_upload(path: Path) -> None:
    ledger = ReleaseLedger.init(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert ledger.may_release("v7") and ledger.may_upload("v7")
    ledger.record_release("v7")
    assert not ledger.may_release("v7") and not ledger.may_upload("v7")
    assert ledger.may_release("v8") and ledger.may_upload("v8")
    with pytest.raises(LedgerError, match="already released on base 'v7'"):
        ledger.record_release("v7")
    assert ledger.released() == {"v7"}
    with pytest.raises(ValueError, match="printable"):
        ledger.may_release("")


def test_crash_between_record_and_send_still_refuses(path: Path) -> None:
    """The record is durable before the seed leaves; a restart (a new object) still refuses."""
    ReleaseLedger.init(path).record_release("v7")
    # ... the process dies here, before or after sending the seed ...
    restarted = ReleaseLedger(path)
    assert not restarted.may_release("v7")
    assert not restarted.may_upload("v7")


def test_a_failed_record_leaves_the_ledger_intact(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the record cannot be made durable the caller gets an error and must not send."""
    ledger = ReleaseLedger.init(path)
    ledger.record_release("v6")
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError, match="No space"):
        ledger.record_release("v7")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))


def test_missing_ledger_refuses(path: Path) -> None:
    with pytest.raises(LedgerError, match="is missing"):
        ReleaseLedger(path)
    ledger = ReleaseLedger.init(path)
    path.unlink()  # deleted while the node runs
    for ask in (ledger.may_release, ledger.may_upload, ledger.record_release):
        with pytest.raises(LedgerError, match=r"is missing.*refusing"):
            ask("v1")
    assert not path.exists()  # never recreated behind the operator's back


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        json.dumps({"format": "cipherhive/v1/release-ledger", "released": []}).encode(),
        json.dumps({"format": "other", "released": [], "check": ""}).encode(),
        json.dumps({"format": "cipherhive/v1/release-ledger", "released": [1], "check": ""}).encode(),
    ],
)
def test_corrupt_ledger_refuses(path: Path, content: bytes) -> None:
    ledger = ReleaseLedger.init(path)
    path.write_bytes(content)
    with pytest.raises(LedgerError, match="is corrupt"):
        ledger.may_release("v1")
    with pytest.raises(LedgerError, match="is corrupt"):
        ledger.may_upload("v1")
    with pytest.raises(LedgerError, match="is corrupt"):
        ReleaseLedger(path)
    assert path.read_bytes() == content  # not reset


def test_a_hand_edited_release_is_detected(path: Path) -> None:
    """Dropping a base from the list (to release on it again) breaks the check."""
    ledger = ReleaseLedger.init(path)
    ledger.record_release("v1")
    ledger.record_release("v2")
    doc = json.loads(path.read_text())
    doc["released"] = ["v2"]
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="corrupt"):
        ledger.may_release("v1")


def test_init_never_overwrites_and_writable_ledger_refused(path: Path) -> None:
    ReleaseLedger.init(path).record_release("v1")
    with pytest.raises(FileExistsError, match="never reset"):
        ReleaseLedger.init(path)
    assert not ReleaseLedger(path).may_release("v1")
    os.chmod(path, 0o666)
    with pytest.raises(LedgerError, match="writable by others"):
        ReleaseLedger(path)
