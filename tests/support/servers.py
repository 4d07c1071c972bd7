"""Servers on 127.0.0.1 for the server tests: a Prefect server, an MLflow server, PostgreSQL, an HTTP receiver."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


def wait_until(check, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None,
               every: float = 1.0):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        tail = log.read_text()[-3000:] if log and log.exists() else ""
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: process exited {process.returncode}\n{tail}")
        if time.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{tail}")
        time.sleep(every)


def quiet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "FLYWHEEL_WORKSPACE"):
        env.pop(key, None)
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def prefect_server(home: Path, database_url: str | None = None):
    """`prefect server start` with its own home (and database); yields the API URL."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    env = quiet_env(PREFECT_HOME=str(home), PREFECT_SERVER_API_HOST="127.0.0.1",
                    # Scheduled runs appear within seconds instead of the default minute.
                    PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    log = home / "server.log"
    with log.open("w") as handle:
        process = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                    str(port), "--analytics-off"], env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/api/health"), 240, "prefect server", process, log)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(process)


@contextmanager
def mlflow_server(root: Path, backend_store_uri: str, artifacts_destination: str | None = None,
                  env_extra: dict[str, str] | None = None):
    """`mlflow server` on a backend store; yields its tracking URI."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    if artifacts_destination:
        command += ["--artifacts-destination", artifacts_destination]
    else:
        command += ["--default-artifact-root", (root / "artifacts").as_uri()]
    log = root / "mlflow.log"
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=quiet_env(**(env_extra or {})), stdout=handle,
                                   stderr=subprocess.STDOUT, cwd=root)
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), 240, "mlflow server", process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL binaries (package postgresql), if installed."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


@contextmanager
def postgres(databases: tuple[str, ...]):
    """A throwaway PostgreSQL cluster on a free loopback port; yields ``postgresql://flywheel@127.0.0.1:PORT``.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` system user (Debian's package
    creates it), in a folder of its own under the system temp dir that this user can enter.
    """
    import tempfile

    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    data, sockets = root / "pgdata", root / "sockets"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    log = root / "postgres.log"

    def run(*command: str) -> None:
        result = subprocess.run([*as_user, *command], capture_output=True, text=True, cwd=root)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-2000:]}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "flywheel", "--auth=trust", "-E", "UTF8", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "120", "-o",
            f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c full_page_writes=off", "start")
        try:
            for name in databases:
                run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "flywheel", name)
            yield f"postgresql://flywheel@127.0.0.1:{port}"
        finally:
            subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True, cwd=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def s3_server(buckets: tuple[str, ...]):
    """moto's S3-compatible server on a free loopback port, with the buckets made; yields its endpoint URL."""
    port = free_port()
    log_dir = Path(__import__("tempfile").mkdtemp(prefix="flywheel-s3-"))
    log = log_dir / "moto.log"
    with log.open("w") as handle:
        process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                   env=quiet_env(), stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(f"{url}/moto-api/"), 120, "moto server", process, log)
        import boto3

        client = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                              region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield url
    finally:
        stop(process)
        shutil.rmtree(log_dir, ignore_errors=True)


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    received.append(json.loads(body or b"{}"))
                except ValueError:
                    received.append({"raw": body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
