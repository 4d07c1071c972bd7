"""Prefect's temporary API server for a round run without ``PREFECT_API_URL``, started by the CLI itself.

Prefect would start the same server (``prefect.server.api.server:create_app`` under uvicorn, in a subprocess) at the
flow's first API call, through ``SubprocessASGIServer``; but that class lives in the server's module, and importing it
loads the whole server (its models, database layer and services: about 2 s on 2 cores) into the client process,
which never uses any of it. Here the client starts the subprocess from the command line alone and points
``PREFECT_API_URL`` at it, so the flow's client, its log and event workers and any child process find it like a
running server.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import closing

# uvicorn's exit status when it cannot bind its port: another process took it between the check and the bind.
PORT_TAKEN = 3


class TemporaryAPIError(RuntimeError):
    pass


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(port: int) -> list[str]:
    """The command Prefect's ``SubprocessASGIServer`` runs (prefect 3.8), UI off."""
    import prefect

    return [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]


def server_environment() -> dict[str, str]:
    """This process's environment and Prefect settings, with the variables that make the server a temporary one."""
    from prefect.settings import get_current_settings

    environment = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                   "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
    environment.pop("PREFECT_API_URL", None)  # a restart on another port: the server is not its own client
    return environment


class TemporaryAPI:
    """One temporary server: :meth:`start` launches it and returns at once; :meth:`wait` blocks until it answers;
    :meth:`stop` (also registered to run at exit) shuts it down gracefully, so it writes what it has accepted."""

    def __init__(self, startup_timeout_s: float, attempts: int = 5):
        self.startup_timeout_s = startup_timeout_s
        self.attempts = attempts
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        from prefect.logging import get_logger
        from prefect.logging.configuration import ensure_logging_setup

        ensure_logging_setup()  # the line with the address reaches the terminal, as Prefect's own start prints it
        self._launch()
        get_logger().info(f"Starting temporary server on http://127.0.0.1:{self.port}")
        atexit.register(self.stop)  # before Prefect's log and event workers register theirs: it runs after them
        exit_on_sigterm()

    def _launch(self) -> None:
        """The server on a free port, and Prefect in this process pointed at it."""
        self.port = free_port()
        self.process = subprocess.Popen(server_command(self.port), env=server_environment())
        point_prefect_at(self.api_url)

    def wait(self) -> None:
        """Until ``/health`` answers; a server that took a busy port is restarted on another."""
        import httpx

        deadline = time.monotonic() + self.startup_timeout_s
        restarts = 0
        with httpx.Client() as client:
            while True:
                assert self.process is not None, "start() first"
                code = self.process.poll()
                if code == PORT_TAKEN and restarts < self.attempts:
                    restarts += 1
                    self._launch()
                    continue
                if code is not None:
                    raise TemporaryAPIError(f"Prefect's temporary API server exited with code {code} before it "
                                            "answered (its error is printed above)")
                try:
                    if client.get(f"{self.api_url}/health", timeout=5).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TemporaryAPIError(
                        f"Prefect's temporary API server did not answer within {self.startup_timeout_s:g} s "
                        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)")
                time.sleep(0.1)

    def stop(self, timeout_s: float = 10) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def exit_on_sigterm() -> None:
    """Make SIGTERM exit through the interpreter (``SystemExit``, status 143), so the at-exit stop runs. Python's
    default ends the process at once and leaves the server running, whether the signal comes before the flow or
    during it: Prefect's handler, swapped in while a flow runs, marks the run crashed and then re-sends the signal
    to the handler it replaced. A handler someone else installed is kept."""
    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: signals are the main thread's to handle
        pass


def point_prefect_at(api_url: str) -> None:
    """``PREFECT_API_URL`` for this process and its children. Prefect reads the environment into a process-wide
    settings context at import, so that context is rebuilt (threads started later fall back to it)."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = api_url
    refresh_global_settings_context()


def start_temporary_api() -> TemporaryAPI | None:
    """Start the temporary server when a round would need one: no ``PREFECT_API_URL`` set and Prefect's ephemeral
    mode allowed (with it disallowed, Prefect's own error about the missing URL stands). Returns it booting."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    api = TemporaryAPI(startup_timeout_s=settings.server.ephemeral.startup_timeout_seconds)
    api.start()
    return api
