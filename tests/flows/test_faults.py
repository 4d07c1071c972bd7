"""Fault injection: a round killed (SIGKILL, whole process group) at every stage boundary and in the middle of
generation and training, re-run each time, ends exactly as an uninterrupted round: one model version, the same
dataset hash, the champion untouched until the promotion, and no truncated file in the model store or DVC cache."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
from cli import run_cli
from helpers import tiny_recipe, write_recipe

from flywheel import registry
from flywheel.faults import FAULT_ENV
from flywheel.models import METADATA_FILE, verify_model
from flywheel.versioning import dvc_md5, git

# In flow order; each kill happens in a run that resumed after the previous one.
FAULT_POINTS = [
    "after:prompts", "during:generate", "after:generate", "after:judge", "after:build", "after:quality",
    "after:review", "after:version", "during:train", "after:train", "after:evaluate", "after:register",
    "after:promote",
]
NAME = "tiny-policy"


def _recipe(tiny_model_dir) -> dict:
    # Enough steps for a checkpoint before the kill in the middle of training.
    return tiny_recipe(tiny_model_dir, training__max_steps=4, training__checkpoint_steps=2,
                       training__batch_size=1)


def _uri(workspace: Path) -> str:
    return f"sqlite:///{workspace / '.flywheel' / 'mlflow.db'}"


def _run(workspace: Path, recipe: Path, fault: str | None = None):
    env = {FAULT_ENV: fault} if fault else {}
    return run_cli(workspace, "run", "--config", str(recipe), "--workspace", str(workspace), check=fault is None,
                   env=env)


def _dvc_cache_intact(workspace: Path) -> int:
    """Every DVC cache file's content hashes to its own name (content-addressed): none is truncated."""
    cache = workspace / ".dvc" / "cache" / "files" / "md5"
    checked = 0
    for path in cache.rglob("*"):
        if path.is_file():
            expected = path.parent.name + path.name.removesuffix(".dir")
            assert hashlib.md5(path.read_bytes()).hexdigest() == expected, path
            checked += 1
    return checked


def _model_store_intact(workspace: Path) -> int:
    folders = [p.parent for p in (workspace / ".flywheel" / "models").rglob(METADATA_FILE)]
    for folder in folders:
        verify_model(folder)
    return len(folders)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("uninterrupted")
    recipe = write_recipe(workspace / "recipe.yaml", _recipe(tiny_model_dir))
    _run(workspace, recipe)
    return workspace


def test_a_round_killed_at_every_stage_ends_as_an_uninterrupted_one(tiny_model_dir, tmp_path, reference):
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model_dir))
    promoted = False
    for point in FAULT_POINTS:
        result = _run(tmp_path, recipe, point)
        assert result.returncode == -signal.SIGKILL, f"{point}: exit {result.returncode}\n{result.stderr[-3000:]}"
        versions = registry.list_versions(_uri(tmp_path), NAME)
        assert len(versions) <= 2, f"{point}: {[v.version for v in versions]}"
        promoted = promoted or point == "after:promote"
        champion = registry.get_version(_uri(tmp_path), NAME, "champion").version
        assert champion == ("2" if promoted else "1"), f"{point}: champion moved to v{champion} before promotion"
        assert not (tmp_path / ".flywheel" / "rounds" / "round-0001.json").exists(), point
        _model_store_intact(tmp_path)
        _dvc_cache_intact(tmp_path)

    result = _run(tmp_path, recipe)
    assert "finished in an earlier attempt" in result.stdout + result.stderr

    record = json.loads((tmp_path / ".flywheel" / "rounds" / "round-0001.json").read_text())
    expected = json.loads((reference / ".flywheel" / "rounds" / "round-0001.json").read_text())
    assert record["status"] == "completed" and record["registration"]["version"] == "2"
    assert record["promotion"]["promoted"] == expected["promotion"]["promoted"] is True
    assert [v.version for v in registry.list_versions(_uri(tmp_path), NAME)] == ["1", "2"]
    assert git(tmp_path, "tag", "--list").split() == ["round-0001"]
    # The same data as the uninterrupted round, byte for byte: nothing lost, nothing doubled.
    assert dvc_md5(tmp_path, "round-0001") == dvc_md5(reference, "round-0001")
    counts = {key: value for key, value in record["quality"]["clean"].items() if not key.endswith("_path")}
    assert counts == {key: value for key, value in expected["quality"]["clean"].items() if not key.endswith("_path")}
    assert _model_store_intact(tmp_path) >= 2
    assert _dvc_cache_intact(tmp_path) > 0
    # Training resumed from its checkpoint rather than from scratch; the checkpoints are gone once saved.
    assert not (tmp_path / ".flywheel" / "work" / "round-0001" / "checkpoints").exists()

    # The next round starts normally from the promoted champion.
    _run(tmp_path, recipe)
    assert registry.get_version(_uri(tmp_path), NAME, "candidate").tags["flywheel.parent_version"] == "2"
