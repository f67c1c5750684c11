"""Privacy accounting: ε from dp-accounting, pinned to a published value; the schedule.
Spec: docs/spec/privacy.md §1.1, §2.1."""

from __future__ import annotations

import math

import pytest

from cipherhive.privacy.accountant import DPEvent, _dp_event, epsilon, noise_multiplier_for
from cipherhive.privacy.schedule import PrivacySchedule, ScheduleError
from cipherhive.v1 import federation_pb2 as pb


def test_abadi_et_al_reference_value() -> None:
    """Abadi et al. (CCS 2016, §3.1): q = 0.01, sigma = 4, 10,000 steps, delta = 1e-5 gives epsilon
    about 1.26 with the moments accountant (integer orders up to 32, tail bound: the minimum over
    orders a of RDP(a) + log(1/delta)/(a - 1)). The same orders and conversion over dp-accounting's
    RDP reproduce it; the accountant a node uses (a tighter conversion and more orders) and PLD give
    less, never more."""
    from dp_accounting import rdp

    event = DPEvent(4.0, 0.01, 10_000)
    accountant = rdp.RdpAccountant(orders=list(range(2, 33)))
    accountant.compose(_dp_event([event]))  # the event a node composes
    classic = min(
        r + math.log(1 / 1e-5) / (order - 1)
        for order, r in zip(accountant._orders, accountant._rdp, strict=True)
    )
    assert classic == pytest.approx(1.26, abs=0.005)
    node = epsilon([event], 1e-5)
    assert node == pytest.approx(1.0355, abs=1e-3)  # dp-accounting 0.6's RDP value, pinned
    assert epsilon([event], 1e-5, "pld") < node < classic


def test_composition_matches_dp_accounting_rdp_and_pld() -> None:
    """Several rounds with different parameters: the node's ε equals dp-accounting's own composition."""
    import dp_accounting
    from dp_accounting import pld, rdp

    events = [DPEvent(1.1, 0.07, 70), DPEvent(1.1, 0.07, 70), DPEvent(2.0, 0.1, 30)]
    direct = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
            for e in events
        ]
    )
    expected_rdp = rdp.RdpAccountant().compose(direct).get_epsilon(1e-5)
    expected_pld = pld.PLDAccountant().compose(direct).get_epsilon(1e-5)
    assert epsilon(events, 1e-5) == pytest.approx(expected_rdp, rel=1e-9)
    assert epsilon(events, 1e-5, "pld") == pytest.approx(expected_pld, rel=1e-9)
    assert expected_pld < expected_rdp < 1.3 * expected_pld  # PLD is tighter, not wildly so
    assert epsilon([], 1e-5) == 0.0
    assert epsilon(events[:1], 1e-5) < epsilon(events, 1e-5)  # every round costs


def test_calibration_hits_the_target() -> None:
    z = noise_multiplier_for(3.0, 1e-5, 0.07, 350)
    assert epsilon([DPEvent(z, 0.07, 350)], 1e-5) <= 3.0
    assert epsilon([DPEvent(z * 0.97, 0.07, 350)], 1e-5) > 3.0


def test_events_refuse_nonsense() -> None:
    for args in ((0.0, 0.1, 1), (1.0, 0.0, 1), (1.0, 1.5, 1), (1.0, 0.1, -1), (math.nan, 0.1, 1)):
        with pytest.raises(ValueError):
            DPEvent(*args)


def test_schedule_round_trips_and_projects() -> None:
    schedule = PrivacySchedule("record", 5, 0.07, 1.2, 70, 1.0)
    again = PrivacySchedule.from_proto(schedule.to_proto())
    assert again == schedule
    assert PrivacySchedule.from_proto(pb.PrivacySchedule()) == PrivacySchedule()
    assert schedule.epsilon(1e-5) == pytest.approx(epsilon([DPEvent(1.2, 0.07, 70)] * 5, 1e-5))
    assert schedule.epsilon(1e-5, rounds=0) == 0.0
    with pytest.raises(ScheduleError):
        PrivacySchedule("record", 0, 0.07, 1.2, 70, 1.0)
    with pytest.raises(ScheduleError):
        PrivacySchedule.from_proto(pb.PrivacySchedule(mode=7))  # type: ignore[arg-type]
