import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from flywheel.config import FlywheelConfig
from flywheel.workspace import Workspace, WorkspaceBusy, round_lock

_HOLD = """
import sys, time
from flywheel.config import FlywheelConfig
from flywheel.workspace import Workspace, round_lock
with round_lock(Workspace.from_config(FlywheelConfig(), sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_a_second_round_in_the_same_workspace_is_refused_with_the_holder_named(tmp_path, holder):
    ws = Workspace.from_config(FlywheelConfig(), tmp_path)
    with pytest.raises(WorkspaceBusy, match=f"another flywheel round is running.*pid {holder.pid}.*--wait"):
        with round_lock(ws):
            pass


def test_a_killed_holder_releases_the_lock(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with round_lock(Workspace.from_config(FlywheelConfig(), tmp_path)):
        assert f"pid {os.getpid()}" in (tmp_path / ".flywheel" / "round.lock").read_text()


def test_wait_blocks_until_the_holder_finishes(tmp_path, holder):
    ws = Workspace.from_config(FlywheelConfig(), tmp_path)
    acquired = threading.Event()

    def second():
        with round_lock(ws, wait=True):
            acquired.set()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    time.sleep(1.0)
    assert not acquired.is_set()
    holder.kill()
    holder.wait()
    assert acquired.wait(30)


def test_sequential_rounds_each_take_the_lock(tmp_path):
    ws = Workspace.from_config(FlywheelConfig(), tmp_path)
    for _ in range(2):
        with round_lock(ws):
            pass
