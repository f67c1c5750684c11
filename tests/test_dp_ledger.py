"""The privacy ledger fails closed: when unsure, no training; never a fresh budget.
Spec: docs/spec/privacy.md §1.3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cipherhive.node.privacy.ledger import BudgetExhausted, PrivacyLedger, PrivacyLedgerError, ledger_path
from cipherhive.privacy.accountant import DPEvent, epsilon

EVENT = DPEvent(1.1, 0.07, 70)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return ledger_path(tmp_path / "ledgers", "acme-claims")


def test_charges_survive_a_restart_and_match_dp_accounting(path: Path) -> None:
    """ε over several rounds and a restart, recomputed with dp-accounting (RDP and PLD)."""
    import dp_accounting
    from dp_accounting import pld, rdp

    ledger = PrivacyLedger.init(path, "acme-claims")
    reported = [ledger.charge(r, EVENT, 1e-5, 10.0) for r in (1, 2)]
    ledger = PrivacyLedger(path, "acme-claims")  # the node restarts
    reported.append(ledger.charge(3, DPEvent(2.0, 0.1, 30), 1e-5, 10.0))
    assert [e.round for e in ledger.entries()] == [1, 2, 3]
    history = [e.event for e in ledger.entries()]
    direct = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
            for e in history
        ]
    )
    assert reported[-1] == pytest.approx(rdp.RdpAccountant().compose(direct).get_epsilon(1e-5), rel=1e-9)
    assert ledger.epsilon(1e-5) == reported[-1]
    assert pld.PLDAccountant().compose(direct).get_epsilon(1e-5) < reported[-1]
    assert reported == sorted(reported) and reported[0] == pytest.approx(epsilon([EVENT], 1e-5))
    assert path.stat().st_mode & 0o777 == 0o600


def test_budget_stops_at_the_limit(path: Path) -> None:
    ledger = PrivacyLedger.init(path, "acme-claims")
    limit = epsilon([EVENT] * 3, 1e-5) + 1e-9  # exactly three rounds fit
    for r in (1, 2, 3):
        ledger.charge(r, EVENT, 1e-5, limit)
    before = path.read_bytes()
    with pytest.raises(BudgetExhausted, match="beyond its limit"):
        ledger.charge(4, EVENT, 1e-5, limit)
    assert path.read_bytes() == before  # a refused round is not recorded
    with pytest.raises(BudgetExhausted):
        PrivacyLedger(path, "acme-claims").charge(4, EVENT, 1e-5, limit)  # nor after a restart


def test_missing_ledger_refuses_and_is_never_recreated(path: Path) -> None:
    with pytest.raises(PrivacyLedgerError, match="is missing"):
        PrivacyLedger(path, "acme-claims")
    ledger = PrivacyLedger.init(path, "acme-claims")
    ledger.charge(1, EVENT, 1e-5, 10.0)
    path.unlink()  # deleted while the node runs
    with pytest.raises(PrivacyLedgerError, match=r"is missing.*refusing"):
        ledger.charge(2, EVENT, 1e-5, 10.0)
    with pytest.raises(PrivacyLedgerError, match="is missing"):
        ledger.epsilon(1e-5)
    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"\xff\xfe",
        b"[]",
        json.dumps(
            {"format": "cipherhive/v1/privacy-ledger", "dataset": "acme-claims", "events": []}
        ).encode(),
    ],
)
def test_corrupt_ledger_refuses(path: Path, content: bytes) -> None:
    ledger = PrivacyLedger.init(path, "acme-claims")
    path.write_bytes(content)
    with pytest.raises(PrivacyLedgerError, match="is corrupt"):
        ledger.charge(1, EVENT, 1e-5, 10.0)
    with pytest.raises(PrivacyLedgerError, match="is corrupt"):
        PrivacyLedger(path, "acme-claims")
    assert path.read_bytes() == content  # not reset


def test_a_hand_edited_history_is_detected(path: Path) -> None:
    """Dropping a round (to spend it again) breaks the check."""
    ledger = PrivacyLedger.init(path, "acme-claims")
    ledger.charge(1, EVENT, 1e-5, 10.0)
    ledger.charge(2, EVENT, 1e-5, 10.0)
    doc = json.loads(path.read_text())
    doc["events"] = doc["events"][1:]
    path.write_text(json.dumps(doc))
    with pytest.raises(PrivacyLedgerError, match="corrupt"):
        ledger.epsilon(1e-5)


def test_keyed_to_the_dataset(path: Path, tmp_path: Path) -> None:
    PrivacyLedger.init(path, "acme-claims").charge(1, EVENT, 1e-5, 10.0)
    with pytest.raises(PrivacyLedgerError, match="accounts for dataset 'acme-claims'"):
        PrivacyLedger(path, "other-data")
    with pytest.raises(FileExistsError, match="never reset"):
        PrivacyLedger.init(path, "acme-claims")
    assert ledger_path(tmp_path, "other-data") != path
    with pytest.raises(ValueError):
        ledger_path(tmp_path, "../escape")


def test_writable_ledger_refused(path: Path) -> None:
    PrivacyLedger.init(path, "acme-claims")
    os.chmod(path, 0o666)
    with pytest.raises(PrivacyLedgerError, match="writable by others"):
        PrivacyLedger(path, "acme-claims")
