"""How long a named member is left out (docs/spec/masked-round.md §10), on a real SQLite state.

The federation-level behaviour (a hostile member fails at most two of eight rounds) is in
tests/test_step_deadlines.py; this pins the arithmetic it rests on: the first offence keeps a
member out of the next ``exclude_rounds`` rounds, never its own round, each earlier offence in the
window doubles it, no exclusion outlasts the window, and a readmission forgets the past.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cipherhive.server.config import ServerConfig
from cipherhive.server.rounds import culprits
from cipherhive.server.rounds.context import RoundContext
from cipherhive.server.rounds.errors import RoundError
from cipherhive.server.rounds.events import EventBus
from cipherhive.server.storage.spool import Spool
from cipherhive.server.storage.state import State

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    s = State(tmp_path / "state.db")
    s.touch_node("mallory")
    s.touch_node("alice")
    yield s
    s.close()


def _context(state: State, tmp_path: Path, **settings: object) -> RoundContext:
    config = ServerConfig(insecure=True, **settings)  # type: ignore[arg-type]
    # The round logic's context over the real store; no codec is needed to name members.
    return RoundContext(config, state, Spool(tmp_path), None, "", EventBus())  # type: ignore[arg-type]


def _out(ctx: RoundContext, number: int) -> set[str]:
    return set(culprits.exclusions(ctx, number))


def test_the_first_offence_keeps_a_member_out_of_the_next_rounds_only(state: State, tmp_path: Path) -> None:
    ctx = _context(state, tmp_path, exclude_rounds=2)
    row = culprits.record(ctx, 5, "mallory", "commit", "the commit does not match the upload")
    assert row.excluded_until == 7
    assert _out(ctx, 5) == set()  # its own round goes on: the others may still finish it
    assert _out(ctx, 6) == _out(ctx, 7) == {"mallory"}
    assert _out(ctx, 8) == set()
    recent, excluding = culprits.standing(ctx, "mallory", 6)
    assert [o.step for o in recent] == ["commit"] and excluding is not None and excluding.round == 5
    assert culprits.standing(ctx, "alice", 6) == ([], None)


def test_repeat_offences_double_the_exclusion_and_the_window_caps_it(state: State, tmp_path: Path) -> None:
    ctx = _context(state, tmp_path, exclude_rounds=2, exclude_window=20)
    assert culprits.record(ctx, 1, "mallory", "upload", "did not upload").excluded_until == 3
    assert culprits.record(ctx, 4, "mallory", "upload", "did not upload").excluded_until == 4 + 4
    assert culprits.record(ctx, 9, "mallory", "upload", "did not upload").excluded_until == 9 + 8
    assert culprits.record(ctx, 18, "mallory", "upload", "did not upload").excluded_until == 18 + 16
    # Four earlier offences would make 32 rounds: no exclusion lasts longer than the window.
    assert culprits.record(ctx, 19, "mallory", "upload", "did not upload").excluded_until == 19 + 20
    # Offences older than the window no longer count: one at round 90 is a first offence again.
    assert culprits.record(ctx, 90, "mallory", "upload", "did not upload").excluded_until == 92
    # The same round named twice is one offence, not two.
    assert culprits.record(ctx, 90, "mallory", "commit", "did not commit").excluded_until == 92
    assert [o.step for o in state.offences("mallory", since_round=89)] == ["commit"]


def test_readmission_lifts_the_exclusion_and_forgets_earlier_offences(state: State, tmp_path: Path) -> None:
    ctx = _context(state, tmp_path, exclude_rounds=3)
    culprits.record(ctx, 2, "mallory", "release", "withheld its seed")
    culprits.record(ctx, 6, "mallory", "release", "withheld its seed")
    for _ in range(7):  # the server's latest round is 7
        number = state.open_round(0, deadline=0.0, expected=[]).round
        state.finish_round(number, state="failed", reason="test", participants=0)
    assert _out(ctx, 8) == {"mallory"}
    culprits.readmit(ctx, "mallory", "operator")
    assert _out(ctx, 8) == set()
    assert culprits.standing(ctx, "mallory", 8) == ([], None)
    # Its next offence is a first offence again.
    assert culprits.record(ctx, 9, "mallory", "release", "withheld its seed").excluded_until == 12
    with pytest.raises(RoundError) as unknown:
        culprits.readmit(ctx, "nobody", "operator")
    assert unknown.value.code == grpc.StatusCode.NOT_FOUND


def test_exclude_rounds_zero_names_without_excluding(state: State, tmp_path: Path) -> None:
    ctx = _context(state, tmp_path, exclude_rounds=0)
    assert culprits.record(ctx, 3, "mallory", "withdraw", "withdrew: stopping").excluded_until == 3
    assert _out(ctx, 4) == set()
    assert [o.node for o in state.offences()] == ["mallory"]
