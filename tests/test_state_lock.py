"""One daemon per state directory: a second server or node on it is refused, naming the first.

Two nodes on one state directory would resend, commit and release from the same round files and
ledgers as if each were alone; two servers would serve one database. The lock is the kernel's
(``flock``), so a daemon killed with SIGKILL leaves nothing behind that blocks its restart.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cipherhive.demo.federation import LocalFederation, ProcessFailed
from cipherhive.runtime.fsutil import LOCK_FILE, StateDirInUse, exclusive_state_dir

HOLD = """
import sys, time
from pathlib import Path
from cipherhive.runtime.fsutil import exclusive_state_dir
with exclusive_state_dir(Path(sys.argv[1]), "node"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.timeout(60)
def test_a_second_holder_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StateDirInUse) as refused, exclusive_state_dir(state, "node"):
            pass
        assert f"in use by another cipherhive node (pid {holder.pid})" in str(refused.value)
        assert "state directory of its own" in str(refused.value)
    finally:
        holder.kill()
        holder.wait(10)
    with exclusive_state_dir(state, "node"):  # SIGKILL released it
        assert (state / LOCK_FILE).read_text() == f"pid {__import__('os').getpid()}\n"
    assert (state / LOCK_FILE).stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_second_server_or_node_on_a_state_directory_exits_2_naming_the_first(tmp_path: Path) -> None:
    fed = LocalFederation(tmp_path, nodes=2, rounds={"auto_start": False})
    fed.setup()
    try:
        fed.start_server()
        fed.wait_serving()
        fed.start_node(0)
        fed.wait_for(lambda: "joined federation" in fed.log("node-1"), 120, "node-1 to join")
        for who, args in (
            ("server", ["server", "--config", str(tmp_path / "server.toml")]),
            ("node", ["node", "--config", str(tmp_path / "node-1.toml")]),
        ):
            with pytest.raises(ProcessFailed) as second:
                fed.run_command(f"second-{who}", args, timeout=120)
            assert second.value.code == 2, second.value.output
            first = fed.procs["server" if who == "server" else "node-1"].pid
            assert f"is in use by another cipherhive {who} (pid {first})" in second.value.output
        assert fed.procs["server"].poll() is None and fed.procs["node-1"].poll() is None
    finally:
        codes = fed.stop_all()
    assert codes["server"] == 0 and codes["node-1"] == 0, codes
