"""Run the flywheel CLI in a child process, as a user would, with the workspace's own Prefect home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli_env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PREFECT_HOME"] = str(workspace / ".flywheel" / "prefect")
    env["FLYWHEEL_WORKSPACE"] = str(workspace)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def flywheel_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flywheel.cli", *args]


def run_cli(workspace: Path, *args: str, timeout: int = 600, check: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    # Its own session: a fault injected into the run kills its whole process group, never the test's.
    result = subprocess.run(flywheel_cmd(*args), cwd=workspace, env={**cli_env(workspace), **(env or {})},
                            capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if check and result.returncode != 0:
        raise AssertionError(f"flywheel {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-8000:]}")
    return result


def start_cli(workspace: Path, *args: str, log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(flywheel_cmd(*args), cwd=workspace, env=cli_env(workspace), stdout=handle,
                            stderr=subprocess.STDOUT, text=True)
