"""The temporary API server the CLI starts for a round without PREFECT_API_URL (flywheel/temporary_api.py)."""

import json
import subprocess
import sys
import textwrap

import psutil
import pytest

from flywheel import temporary_api
from flywheel.temporary_api import TemporaryAPI, TemporaryAPIError, start_temporary_api


def _isolated_env(tmp_path) -> dict[str, str]:
    """A child process's environment with its own Prefect home, nothing inherited from this one."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def test_a_flow_runs_against_it_and_the_client_never_loads_the_server(tmp_path):
    # In a process of its own: pointing Prefect at a server is process-wide, and this one's tests use other servers.
    script = textwrap.dedent("""
        import json, os, sys
        from prefect import flow
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL
        from flywheel.temporary_api import start_temporary_api

        @flow(name="temporary-api-check")
        def double(x: int) -> int:
            return 2 * x

        api = start_temporary_api()
        api.wait()
        result = double(21)
        with get_client(sync_client=True) as client:
            runs = [run.state.name for run in client.read_flow_runs()]
        process = api.process
        server_loaded = "prefect.server.api.server" in sys.modules
        api.stop()
        print(json.dumps({"result": result, "runs": runs, "url": PREFECT_API_URL.value(), "api": api.api_url,
                          "env": os.environ["PREFECT_API_URL"], "server_loaded": server_loaded,
                          "exit": process.returncode}))
    """)
    env = _isolated_env(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["result"] == 42
    assert report["runs"] == ["Completed"]
    assert report["url"] == report["api"] == report["env"]
    assert report["server_loaded"] is False
    assert report["exit"] is not None  # stopped, not left behind


@pytest.fixture
def fake_server(monkeypatch):
    """start() runs the given Python code as the server; where Prefect's URL would point is recorded instead."""
    pointed: list[str] = []
    code = {"text": "pass"}
    monkeypatch.setattr(temporary_api, "server_command", lambda port: [sys.executable, "-c", code["text"]])
    monkeypatch.setattr(temporary_api, "point_prefect_at", pointed.append)
    return code, pointed


def test_a_server_that_exits_fails_with_its_code(fake_server):
    code, pointed = fake_server
    code["text"] = "raise SystemExit(1)"
    api = TemporaryAPI(startup_timeout_s=60)
    api.start()
    with pytest.raises(TemporaryAPIError, match="exited with code 1"):
        api.wait()
    assert pointed == [api.api_url]


def test_a_taken_port_is_retried_on_another_then_given_up(fake_server):
    code, pointed = fake_server
    code["text"] = f"raise SystemExit({temporary_api.PORT_TAKEN})"
    api = TemporaryAPI(startup_timeout_s=60, attempts=2)
    api.start()
    with pytest.raises(TemporaryAPIError, match=f"exited with code {temporary_api.PORT_TAKEN}"):
        api.wait()
    assert len(pointed) == 3  # the start and two restarts, each announced to Prefect
    assert pointed[-1] == api.api_url


def test_a_server_that_never_answers_times_out_and_is_stopped(fake_server):
    code, _ = fake_server
    code["text"] = "import time; time.sleep(60)"
    api = TemporaryAPI(startup_timeout_s=0.5)
    api.start()
    process = api.process
    with pytest.raises(TemporaryAPIError, match="did not answer within 0.5 s"):
        api.wait()
    assert process.poll() is not None
    assert api.process is None


def test_no_server_when_one_is_configured(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setattr(TemporaryAPI, "start", lambda self: pytest.fail("started a server"))
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert start_temporary_api() is None


def test_sigterm_before_the_flow_starts_stops_the_server(tmp_path):
    # A round killed while it provisions its model (before Prefect's own handler is installed) must not leave its
    # server behind: Python's default SIGTERM skips the at-exit stop.
    script = textwrap.dedent("""
        import sys, time
        from flywheel import temporary_api
        temporary_api.server_command = lambda port: [sys.executable, "-c", "import time; time.sleep(120)"]
        temporary_api.point_prefect_at = lambda url: None
        api = temporary_api.TemporaryAPI(startup_timeout_s=60)
        api.start()
        print(api.process.pid, flush=True)
        time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    server = psutil.Process(int(process.stdout.readline()))
    process.terminate()
    try:
        assert process.wait(timeout=60) == 143
        assert not server.is_running()
    finally:
        if server.is_running():
            server.kill()


def test_sigterm_during_a_flow_stops_the_server(tmp_path):
    # Prefect's handler marks the run crashed, then re-sends SIGTERM to the handler it replaced; were that Python's
    # default, the process would end there without stopping its server.
    script = textwrap.dedent("""
        import time
        from prefect import flow
        from flywheel.temporary_api import start_temporary_api

        @flow(name="terminated")
        def wait():
            print("running", flush=True)
            time.sleep(120)

        api = start_temporary_api()
        api.wait()
        print(api.process.pid, flush=True)
        wait()
    """)
    env = _isolated_env(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               text=True)
    server = psutil.Process(int(process.stdout.readline()))
    try:
        assert process.stdout.readline().strip() == "running"
        process.terminate()
        assert process.wait(timeout=120) == 143
        server.wait(timeout=30)  # stopped by the at-exit handler (psutil.TimeoutExpired if left running)
    finally:
        if server.is_running():
            server.kill()
