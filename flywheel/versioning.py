"""DVC + git: every round's dataset is added to ``data.dvc``, committed, tagged and pushed to the DVC remote."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydantic import BaseModel, ConfigDict

FALLBACK_IDENTITY = ("flywheel", "flywheel@localhost")


class VersioningError(RuntimeError):
    pass


class DatasetVersion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: str
    commit: str
    dvc_md5: str
    remote: str


def git(root: Path, *args: str, check: bool = True) -> str:
    identity: list[str] = []
    if args and args[0] in {"commit", "tag"}:
        # A fresh machine may have no git identity; the flywheel's own commits must still work there.
        for key, value in zip(("user.name", "user.email"), FALLBACK_IDENTITY):
            if subprocess.run(["git", "-C", str(root), "config", key], capture_output=True).returncode != 0:
                identity += ["-c", f"{key}={value}"]
    result = subprocess.run(["git", *identity, "-C", str(root), *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        message = (result.stderr or result.stdout).strip().splitlines()
        raise VersioningError(f"git {' '.join(args)} failed in {root}: {message[-1] if message else 'no output'}")
    return result.stdout.strip()


def ensure_repository(root: Path, remote: str) -> None:
    """Make ``root`` a git + DVC repository with ``data/`` tracked and the remote configured (idempotent)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["git", "-C", str(root), "rev-parse", "--git-dir"], capture_output=True).returncode != 0:
        git(root, "init", "-q")
    from dvc.repo import Repo

    if not (root / ".dvc").is_dir():
        Repo.init(str(root))
        git(root, "add", ".dvc", ".dvcignore")
        git(root, "commit", "-q", "-m", "Initialize DVC", "--", ".dvc", ".dvcignore")
    # The remote lives in config.local: a remote committed after a round would be unknown at that round's tag.
    if "://" not in remote:
        Path(remote).mkdir(parents=True, exist_ok=True)
    with Repo(str(root)).config.edit("local") as conf:
        conf["remote"]["flywheel"] = {"url": remote}
        conf["core"]["remote"] = "flywheel"
        conf["core"]["autostage"] = True
    (root / "data").mkdir(exist_ok=True)


def tag_commit(root: Path, tag: str) -> str | None:
    result = subprocess.run(["git", "-C", str(root), "rev-list", "-n", "1", tag], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def dvc_md5(root: Path, rev: str | None = None) -> str:
    import yaml

    text = git(root, "show", f"{rev}:data.dvc") if rev else (Path(root) / "data.dvc").read_text()
    outs = yaml.safe_load(text)["outs"]
    return outs[0]["md5"]


def version_dataset(root: Path, tag: str, message: str) -> DatasetVersion:
    """dvc add data, commit data.dvc, tag the commit, push the data. Re-running after success changes nothing."""
    from dvc.repo import Repo

    root = Path(root)
    existing = tag_commit(root, tag)
    repo = Repo(str(root))
    try:
        repo.add(str(root / "data"))  # absolute: DVC resolves a relative path against the cwd, not the repo
        md5 = dvc_md5(root)
        if existing is not None:
            if dvc_md5(root, tag) != md5:
                raise VersioningError(f"tag {tag} exists with different data; refusing to move it")
        else:
            paths = ["data.dvc"] + ([".gitignore"] if _changed(root, ".gitignore") else [])
            git(root, "add", *paths)
            if _changed(root, "data.dvc", staged=True):
                git(root, "commit", "-q", "-m", message, "--", *paths)
            git(root, "tag", "-a", tag, "-m", message)
        repo.push()
        remote = repo.config["remote"][repo.config["core"]["remote"]]["url"]
    finally:
        repo.close()
    return DatasetVersion(tag=tag, commit=tag_commit(root, tag) or "", dvc_md5=md5, remote=remote)


def _changed(root: Path, path: str, staged: bool = False) -> bool:
    args = ["diff", "--cached", "--quiet", "--", path] if staged else ["status", "--porcelain", "--", path]
    result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    return result.returncode != 0 if staged else bool(result.stdout.strip())


def head_commit(root: Path) -> str:
    return git(root, "rev-parse", "HEAD", check=False) or "unknown"


def checkout_round(root: Path, tag: str) -> str:
    """Bring ``data/`` back to exactly what a round trained on: data.dvc from its tag, then DVC checkout/pull."""
    from dvc.repo import Repo

    if tag_commit(root, tag) is None:
        raise VersioningError(f"no round tag {tag!r} in {root}")
    git(root, "checkout", tag, "--", "data.dvc")
    with Repo(str(root)) as repo:
        repo.pull(force=True)
    return dvc_md5(root)
