import shutil
import subprocess
from pathlib import Path

import pytest

from flywheel.versioning import (
    FALLBACK_IDENTITY,
    VersioningError,
    checkout_round,
    dvc_md5,
    ensure_repository,
    head_commit,
    tag_commit,
    version_dataset,
)


@pytest.fixture(autouse=True)
def no_git_identity(tmp_path, monkeypatch):
    """A machine with no git or DVC configuration at all: no identity, no global or system config."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL",
                "GIT_CONFIG_GLOBAL", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(key, raising=False)


def run_git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> tuple[Path, Path]:
    root, remote = tmp_path / "ws", tmp_path / "remote"
    ensure_repository(root, str(remote))
    return root, remote


def write_round(root: Path, name: str, content: str) -> Path:
    folder = root / "data" / "rounds" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pairs.parquet").write_text(content)
    return folder


def remote_files(remote: Path) -> set[str]:
    return {str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()}


def test_ensure_repository_on_an_empty_folder(repo):
    root, remote = repo
    assert (root / ".git").is_dir() and (root / ".dvc").is_dir() and (root / "data").is_dir()
    assert remote.is_dir()
    from dvc.repo import Repo

    with Repo(str(root)) as dvc_repo:
        local = dvc_repo.config.read("local")
        committed = dvc_repo.config.read("repo")
        autostage = dvc_repo.config["core"]["autostage"]  # validated: a real bool
    assert local["remote"]["flywheel"]["url"] == str(remote)
    assert local["core"]["remote"] == "flywheel"
    assert "autostage" in local["core"] and autostage is True
    assert "remote" not in committed.get("core", {}) and not committed.get("remote")
    # The remote is machine-local: it is not in the committed config.
    assert "flywheel" not in (root / ".dvc" / "config").read_text()
    assert "config.local" in (root / ".dvc" / ".gitignore").read_text()
    # Committed although this machine has no git identity, under the fallback one.
    assert run_git(root, "log", "--format=%an <%ae>|%s") == f"{FALLBACK_IDENTITY[0]} <{FALLBACK_IDENTITY[1]}>|Initialize DVC"
    assert set(run_git(root, "ls-files").splitlines()) == {".dvc/.gitignore", ".dvc/config", ".dvcignore"}
    assert run_git(root, "status", "--porcelain") == ""


def test_ensure_repository_is_idempotent(repo, tmp_path):
    root, remote = repo
    head = head_commit(root)
    config_local = (root / ".dvc" / "config.local").read_text()
    ensure_repository(root, str(remote))
    assert head_commit(root) == head
    assert run_git(root, "rev-list", "--count", "HEAD") == "1"
    assert (root / ".dvc" / "config.local").read_text() == config_local
    # A second call with another remote re-points it.
    other = tmp_path / "other-remote"
    ensure_repository(root, str(other))
    assert str(other) in (root / ".dvc" / "config.local").read_text() and other.is_dir()
    assert head_commit(root) == head


def test_version_dataset_commits_tags_and_pushes(repo):
    root, remote = repo
    write_round(root, "round-0001", "first")
    (root / "notes.txt").write_text("unrelated work in progress")
    run_git(root, "add", "notes.txt")
    before = head_commit(root)

    version = version_dataset(root, "round-0001", "dataset of round 1")

    assert version.tag == "round-0001"
    assert version.commit == head_commit(root) != before
    assert version.remote == str(remote)
    assert version.dvc_md5 == dvc_md5(root) == dvc_md5(root, "round-0001")
    assert version.dvc_md5.endswith(".dir")
    changed = set(run_git(root, "show", "--name-only", "--format=", "HEAD").splitlines())
    assert changed == {"data.dvc", ".gitignore"}
    assert run_git(root, "log", "-1", "--format=%s") == "dataset of round 1"
    # The unrelated staged file was neither committed nor unstaged.
    assert run_git(root, "diff", "--cached", "--name-only") == "notes.txt"
    assert run_git(root, "cat-file", "-t", "round-0001") == "tag"  # annotated
    assert tag_commit(root, "round-0001") == version.commit
    assert run_git(root, "tag", "-l", "--format=%(contents:subject)", "round-0001") == "dataset of round 1"
    # Pushed: the directory manifest and the file's content are in the remote.
    pushed = remote_files(remote)
    assert any(p.endswith(".dir") for p in pushed)
    assert len(pushed) >= 2
    assert any((remote / p).read_bytes() == b"first" for p in pushed)


def test_version_dataset_is_idempotent(repo):
    root, remote = repo
    write_round(root, "round-0001", "first")
    first = version_dataset(root, "round-0001", "round 1")
    pushed = remote_files(remote)
    again = version_dataset(root, "round-0001", "round 1")
    assert again == first
    assert head_commit(root) == first.commit
    assert run_git(root, "rev-list", "--count", "HEAD") == "2"
    assert run_git(root, "tag", "-l") == "round-0001"
    assert remote_files(remote) == pushed


def test_version_dataset_refuses_to_move_a_tag(repo):
    root, _ = repo
    write_round(root, "round-0001", "first")
    first = version_dataset(root, "round-0001", "round 1")
    write_round(root, "round-0001", "changed afterwards")
    with pytest.raises(VersioningError, match="tag round-0001 exists with different data"):
        version_dataset(root, "round-0001", "round 1")
    assert tag_commit(root, "round-0001") == first.commit == head_commit(root)


def test_checkout_round_restores_older_data_from_the_remote(repo):
    root, _ = repo
    write_round(root, "round-0001", "first")
    one = version_dataset(root, "round-0001", "round 1")
    write_round(root, "round-0001", "first")
    write_round(root, "round-0002", "second")
    two = version_dataset(root, "round-0002", "round 2")
    assert two.dvc_md5 != one.dvc_md5 and two.commit != one.commit
    # Lose the data and the local cache: only the remote still has it.
    shutil.rmtree(root / "data")
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)

    assert checkout_round(root, "round-0001") == one.dvc_md5
    assert (root / "data" / "rounds" / "round-0001" / "pairs.parquet").read_text() == "first"
    assert not (root / "data" / "rounds" / "round-0002").exists()

    assert checkout_round(root, "round-0002") == two.dvc_md5
    assert (root / "data" / "rounds" / "round-0002" / "pairs.parquet").read_text() == "second"


def test_checkout_unknown_round(repo):
    root, _ = repo
    with pytest.raises(VersioningError, match="no round tag 'round-0042'"):
        checkout_round(root, "round-0042")
