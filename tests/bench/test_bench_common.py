"""bench/common.py's child-process handling: stopping a benchmark stops the round it runs, never orphans it."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402

CHILD = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    def stop(signum, frame):
        pathlib.Path(sys.argv[1]).write_text("stopped cleanly")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print(os.getpid(), flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("runner", ["run_child", "run_measured"])
def test_sigterm_to_the_benchmark_stops_its_child_first(tmp_path, runner):
    marker = tmp_path / "marker"
    call = {"run_child": "common.run_child(command)",
            "run_measured": "common.run_measured(command, env=dict(os.environ), cwd=Path.cwd(), log=Path('log.txt'))"}
    parent = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        sys.path.insert(0, {str(BENCH)!r})
        import common
        command = [sys.executable, "-c", {CHILD!r}, {str(marker)!r}]
        {call[runner]}
        print("not stopped", flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", parent], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    if runner == "run_measured":  # the child's output goes to the log: wait for its pid there
        log = tmp_path / "log.txt"
        while not (log.is_file() and log.read_text().strip()):
            assert process.poll() is None
            time.sleep(0.05)
        pid = int(log.read_text())
    else:
        pid = int(process.stdout.readline())
    child = psutil.Process(pid)
    process.terminate()
    try:
        assert process.wait(timeout=60) == 143
        assert marker.read_text() == "stopped cleanly"
        assert "not stopped" not in process.stdout.read()
        assert not child.is_running()
    finally:
        if child.is_running():
            child.kill()


def test_a_failing_child_raises_with_its_code():
    with pytest.raises(subprocess.CalledProcessError) as raised:
        common.run_child([sys.executable, "-c", "raise SystemExit(3)"])
    assert raised.value.returncode == 3
    assert common.run_child([sys.executable, "-c", "pass"]) == 0
