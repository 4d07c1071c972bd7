"""Where a flywheel keeps its data and state, and the environment its embedded services run in.

A workspace is a git + DVC repository (by default the project checkout): ``data/`` is tracked by ``data.dvc`` and
rounds are tagged; MLflow's SQLite database, its artifacts, the Prefect home and the model store live under one
git-ignored state folder.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from flywheel.config import FlywheelConfig, resolve


@dataclass(frozen=True)
class Workspace:
    root: Path
    state: Path
    dvc_remote: str
    tracking_uri: str
    tag_prefix: str

    @classmethod
    def from_config(cls, config: FlywheelConfig, root: Path | str | None = None) -> Workspace:
        root = Path(root or os.environ.get("FLYWHEEL_WORKSPACE") or Path.cwd()).resolve()
        state = resolve(config.storage.state_dir, root).resolve()
        remote = config.storage.dvc_remote
        if os.environ.get("FLYWHEEL_DVC_REMOTE") and remote == type(config.storage)().dvc_remote:
            remote = os.environ["FLYWHEEL_DVC_REMOTE"]  # replaces the default folder, never a remote a recipe chose
        if "://" not in remote:
            remote = str(resolve(remote, root).resolve())
        tracking = config.storage.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        tracking = tracking or f"sqlite:///{state / 'mlflow.db'}"
        return cls(root=root, state=state, dvc_remote=remote, tracking_uri=tracking, tag_prefix=config.storage.tag_prefix)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def rounds_data(self) -> Path:
        return self.data_dir / "rounds"

    @property
    def models(self) -> Path:
        return self.state / "models"

    @property
    def records(self) -> Path:
        """Round records (manifests), written last by each round."""
        return self.state / "rounds"

    @property
    def prefect_home(self) -> Path:
        return self.state / "prefect"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.state / "mlartifacts"

    @property
    def gx_root(self) -> Path:
        return self.root / "great_expectations"

    def round_name(self, number: int) -> str:
        return f"{self.tag_prefix}{number:04d}"

    def round_data(self, number: int) -> Path:
        return self.rounds_data / self.round_name(number)

    def round_state(self, number: int) -> Path:
        return self.state / "work" / self.round_name(number)


def quiet_environment() -> dict[str, str]:
    """Settings that keep the embedded services offline and silent."""
    return {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The embedded API server starts slowly on a busy 2-core machine; the default 20 s is too tight.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GX_ANALYTICS_ENABLED": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def activate(workspace: Workspace) -> None:
    """Point Prefect and MLflow at the workspace. Call before importing Prefect: it reads its home at import."""
    for key, value in quiet_environment().items():
        os.environ.setdefault(key, value)
    workspace.state.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(workspace.prefect_home))
    os.environ["MLFLOW_TRACKING_URI"] = workspace.tracking_uri
    os.environ["FLYWHEEL_WORKSPACE"] = str(workspace.root)


class WorkspaceBusy(RuntimeError):
    """Another round holds the workspace: two rounds must never train from the same champion at once."""


@contextmanager
def round_lock(workspace: Workspace, wait: bool = False) -> Iterator[None]:
    """Hold the workspace's round lock for the duration of a round.

    An OS file lock, so a killed round releases it with its process and a crash never leaves the workspace locked.
    """
    workspace.state.mkdir(parents=True, exist_ok=True)
    path = workspace.state / "round.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = path.read_text().strip() or "unknown process"
            raise WorkspaceBusy(
                f"{workspace.root}: another flywheel round is running in this workspace ({holder}); "
                "wait for it to finish or run with --wait"
            ) from None
        os.ftruncate(fd, 0)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} since {stamp}".encode())
        yield
    finally:
        os.close(fd)
