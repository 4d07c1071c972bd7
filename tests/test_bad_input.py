"""Bad input, table-driven: every kind fails through the real CLI with one clear line naming its source, and writes
nothing to the registry or the data store.

Each row runs ``flywheel ...`` in a child process and checks (a) exit status 2, no traceback, and a last stderr line
``error: ...`` that names the file, field, folder, URL or version concerned, and (b) that the workspace's MLflow
registry (versions, aliases, version tags), its git tags, DVC cache and remote, round data and round records are
exactly what they were before. Rows either get a fresh empty workspace or share one where a base model is already
registered as version 1 (``champion``); the review row shares a round paused for review.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from cli import cli_env, flywheel_cmd
from helpers import tiny_recipe, write_recipe

NAME = "tiny-policy"


# --- what "nothing written" means ------------------------------------------------------------------------------

def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def snapshot(ws: Path) -> dict:
    """Everything a round or a registry command could write to the registry or the data store."""
    state = {"registry": None, "tags": None, "dvc_cache": _files(ws / ".dvc" / "cache"),
             "dvc_remote": _files(ws / ".flywheel" / "dvc-remote"), "round_data": _files(ws / "data" / "rounds"),
             "round_records": _files(ws / ".flywheel" / "rounds"), "data.dvc": None}
    db = ws / ".flywheel" / "mlflow.db"
    if db.is_file():
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("select name from sqlite_master where type = 'table'")}
            if "model_versions" in tables:
                state["registry"] = {name: con.execute(query).fetchall() for name, query in {
                    "versions": "select name, version, status from model_versions order by 1, 2",
                    "aliases": "select name, alias, version from registered_model_aliases order by 1, 2",
                    "tags": "select name, version, key, value from model_version_tags order by 1, 2, 3",
                }.items()}
    if (ws / ".git").exists():
        state["tags"] = subprocess.run(["git", "-C", str(ws), "tag", "-l"], capture_output=True, text=True).stdout
    if (ws / "data.dvc").is_file():
        state["data.dvc"] = (ws / "data.dvc").read_text()
    return state


# --- tmpfs: a full disk and a read-only workspace, for real ------------------------------------------------------

@contextmanager
def tmpfs(path: Path, size: str = "1m", read_only: bool = False, fill: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a tmpfs mount (root): {mounted.stderr.strip()}")
    try:
        if fill:
            with (path / "filler").open("wb", buffering=0) as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                except OSError:
                    pass
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


# --- shared fixtures ----------------------------------------------------------------------------------------------

def _recipe(model_dir: Path, **overrides) -> dict:
    return tiny_recipe(model_dir, **overrides)


@pytest.fixture(scope="module")
def paused_round(tiny_model_dir, tmp_path_factory):
    """A real tiny round paused for review, started first so it reaches its pause while other rows run."""
    from flywheel.config import QualityConfig

    ws = tmp_path_factory.mktemp("paused")
    overrides = dict(review__mode="required", review__timeout_s=900, review__sample_size=3, prompts__per_round=6)
    if "max_truncated_share" in QualityConfig.model_fields:  # a random tiny model always runs to its token limit
        overrides["quality__max_truncated_share"] = 1.0
    recipe = write_recipe(ws / "recipe.yaml", _recipe(tiny_model_dir, **overrides))
    log = ws.parent / "paused-round.log"
    with log.open("w") as handle:
        # Its own process group, so that teardown can stop the round and the Prefect server it started, and only them.
        process = subprocess.Popen(flywheel_cmd("run", "--config", str(recipe)), cwd=ws, env=cli_env(ws),
                                   stdout=handle, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    yield {"ws": ws, "recipe": recipe, "process": process, "log": log}
    if process.poll() is None:  # the round and the Prefect server it started: its own group, nothing else
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


PAUSED = "Pausing flow, execution will continue"  # Prefect's log line when pause_flow_run takes effect


def wait_for_pause(state: dict, timeout: float = 420) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if PAUSED in state["log"].read_text():
            time.sleep(2)  # the line comes just before the run's state turns PAUSED
            return
        if state["process"].poll() is not None:
            raise AssertionError(f"round exited before pausing:\n{state['log'].read_text()[-6000:]}")
        time.sleep(1)
    raise AssertionError(f"round never paused:\n{state['log'].read_text()[-6000:]}")


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tmp_path_factory, paused_round):
    """A workspace whose registry holds the tiny base model as version 1, alias champion (no promotion yet)."""
    from flywheel import stages
    from flywheel.config import parse_config
    from flywheel.workspace import Workspace

    ws = tmp_path_factory.mktemp("shared")
    recipe = write_recipe(ws / "recipe.yaml", _recipe(tiny_model_dir))
    config = parse_config(yaml.safe_load(recipe.read_text()))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        workspace = Workspace.from_config(config, ws)
        stages.prepare_workspace(config, workspace)
        champion = stages.resolve_champion(config, workspace)
    assert champion.version == "1"
    return {"ws": ws, "recipe": recipe, "store": Path(champion.path)}


# --- the table ----------------------------------------------------------------------------------------------------

@dataclass
class Env:
    """What a row may use: its own folder, a fresh workspace (or the shared one), the tiny model."""

    row_dir: Path
    ws: Path
    model: Path
    shared: dict | None
    extra_env: dict[str, str] = field(default_factory=dict)
    mounts: object = None  # an ExitStack: tmpfs mounts made by the row, undone after it

    def recipe(self, recipe: dict | str, name: str = "recipe.yaml") -> str:
        path = self.row_dir / name
        if isinstance(recipe, str):
            path.write_text(recipe)
        else:
            write_recipe(path, recipe)
        return str(path)

    def tiny(self, **overrides) -> str:
        return self.recipe(_recipe(self.model, **overrides))

    def prompts(self, name: str, content: bytes | str) -> str:
        path = self.row_dir / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)


@dataclass(frozen=True)
class Row:
    id: str
    build: Callable[[Env], list[str]]  # the CLI arguments (it may write the files they name)
    expect: Callable[[Env], list[str]]  # substrings of the one error line: what went wrong and where
    where: str = "fresh"  # "fresh", "shared" or "paused"


def _line(prompt_id: str, prompt: str = "Write a haiku.", constraints=None) -> str:
    constraints = constraints if constraints is not None else [{"type": "all_lowercase", "args": {}}]
    return json.dumps({"id": prompt_id, "prompt": prompt, "constraints": constraints})


def _good_lines(count: int) -> list[str]:
    return [_line(f"p{i}", f"Write note number {i} about the weather.") for i in range(count)]


def _run_prompts(env: Env, name: str, content: bytes | str) -> list[str]:
    return ["run", "--config", env.tiny(prompts__source=env.prompts(name, content))]


def _corrupt_parquet(env: Env) -> list[str]:
    import pandas as pd

    path = env.row_dir / "prompts.parquet"
    pd.DataFrame({"id": ["a", "b"], "prompt": ["x", "y"], "constraints": ["[]", "[]"]}).to_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # cut in half: the footer is gone
    return ["run", "--config", env.tiny(prompts__source=str(path))]


def _model_without_weights(env: Env) -> list[str]:
    folder = Path(shutil.copytree(env.model, env.row_dir / "model"))
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    return ["run", "--config", env.recipe(_recipe(folder))]


def _model_with_changed_tokenizer(env: Env) -> list[str]:
    from flywheel.models import write_metadata

    folder = Path(shutil.copytree(env.model, env.row_dir / "model"))
    write_metadata(folder, source="tests")  # checksums recorded, as in the model store or an exported folder
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["added_tokens"][0]["content"] = "<|swapped|>"  # another tokenizer: same files, different bytes
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return ["run", "--config", env.recipe(_recipe(folder))]


def _tampered_champion_export(env: Env) -> list[str]:
    tokenizer = env.shared["store"] / "tokenizer.json"
    env.shared["restore"] = (tokenizer, tokenizer.read_bytes())
    tokenizer.write_bytes(tokenizer.read_bytes().replace(b"<|im_end|>", b"<|im_END|>", 1))
    return ["export", "champion", str(env.row_dir / "exported"), "--config", str(env.shared["recipe"])]


def _on_full_disk(env: Env, state_only: bool) -> list[str]:
    disk = env.row_dir / "disk"
    env.mounts.enter_context(tmpfs(disk, size="1m", fill=True))
    if state_only:
        return ["run", "--config", env.tiny(storage__state_dir=str(disk / "state"))]
    env.ws = disk / "ws"  # the workspace itself is on the full disk; the recipe stays outside it
    return ["run", "--config", env.tiny(), "--workspace", str(env.ws)]


def _read_only_workspace(env: Env) -> list[str]:
    disk = env.row_dir / "ro"
    env.mounts.enter_context(tmpfs(disk, size="1m", read_only=True))
    env.ws = disk
    return ["run", "--config", env.tiny(), "--workspace", str(disk)]


def _eval_missing_alias(env: Env) -> list[str]:
    from flywheel.cli import app

    names = {info.name or info.callback.__name__.replace("_", "-") for info in app.registered_commands}
    command = next((name for name in ("eval", "evaluate") if name in names), None)
    if command is None:
        pytest.skip("the CLI has no eval command (yet)")
    return [command, "nosuch", "--config", str(env.shared["recipe"])]


def _teacher_round(reply) -> Callable[[Env], list[str]]:
    """A round in the shared workspace whose teacher judge is a fake OpenAI-compatible server answering ``reply``."""
    from fake_openai import fake_openai

    def build(env: Env) -> list[str]:
        server = env.mounts.enter_context(fake_openai(reply))
        env.extra_env["TEACHER_URL"] = server.url
        teacher = {"base_url": server.url, "model": "teacher", "timeout_s": 1.0, "retries": 1, "backoff_s": 0.0}
        recipe = env.recipe(_recipe(env.model, feedback__judges=["verifier", "teacher"], feedback__llm_scope="all",
                                    feedback__teacher=teacher))
        # --restart: each row is a new attempt at the shared workspace's first round, with its own recipe.
        return ["run", "--config", recipe, "--restart"]

    return build


def _teacher_hangs(body, call):
    from fake_openai import Hang

    return Hang(3.0)


def _teacher_garbage(body, call):
    return "<html>502 Bad Gateway, but with status 200</html>"


def _teacher_without_verdict(body, call):
    from fake_openai import chat_answer

    return chat_answer(["The answer looks fine to me."] * body.get("n", 1))


def _shared(*args: str) -> Callable[[Env], list[str]]:
    return lambda env: [*args, "--config", str(env.shared["recipe"])]


ROWS = [
    # -- the registry (a workspace with version 1 as champion) --
    Row("promote-missing-alias", _shared("promote", "nosuch"), lambda e: [NAME, "no version or alias 'nosuch'"],
        "shared"),
    Row("promote-missing-version", _shared("promote", "99"), lambda e: [NAME, "no version or alias '99'"], "shared"),
    Row("lineage-missing-alias", _shared("lineage", "candidate"), lambda e: [NAME, "no version or alias 'candidate'"],
        "shared"),
    Row("eval-missing-alias", _eval_missing_alias, lambda e: [NAME, "'nosuch'"], "shared"),
    Row("rollback-without-previous-champion", _shared("rollback"),
        lambda e: ["champion version 1", "nothing to roll back to"], "shared"),
    Row("checkout-missing-round", _shared("checkout", "--round", "99"), lambda e: ["round-0099", str(e.ws)], "shared"),
    Row("export-tampered-champion", _tampered_champion_export,
        lambda e: [str(e.shared["store"]), "tokenizer.json", "checksum"], "shared"),
    # -- the recipe --
    Row("malformed-yaml", lambda e: ["run", "--config", e.recipe("model: [1, 2\n")],
        lambda e: [str(e.row_dir / "recipe.yaml"), "malformed YAML at line"]),
    Row("unknown-key", lambda e: ["run", "--config", e.recipe("trainig: {}\n")],
        lambda e: [str(e.row_dir / "recipe.yaml"), "trainig: unknown key"]),
    Row("unknown-nested-key", lambda e: ["run", "--config", e.tiny(training__lr=0.1)],
        lambda e: [str(e.row_dir / "recipe.yaml"), "training.lr: unknown key"]),
    Row("wrong-type", lambda e: ["run", "--config", e.tiny(generation__batch_size="big")],
        lambda e: [str(e.row_dir / "recipe.yaml"), "generation.batch_size", "'big'"]),
    Row("cross-field-check", lambda e: ["run", "--config", e.tiny(generation__samples_per_prompt=1)],
        lambda e: [str(e.row_dir / "recipe.yaml"), "samples_per_prompt >= 2"]),
    Row("recipe-not-a-mapping", lambda e: ["run", "--config", e.recipe("- model\n- prompts\n")],
        lambda e: [str(e.row_dir / "recipe.yaml"), "must be a mapping"]),
    Row("recipe-not-utf8", lambda e: ["run", "--config", e.prompts("recipe.yaml", b"name: caf\xe9\n")],
        lambda e: [str(e.row_dir / "recipe.yaml"), "not UTF-8"]),
    Row("unknown-generation-engine", lambda e: ["run", "--config", e.tiny(generation__engine="warp-drive")],
        lambda e: [str(e.row_dir / "recipe.yaml"), "generation.engine", "'warp-drive'"]),
    Row("base-model-folder-missing", lambda e: ["run", "--config", e.recipe(_recipe(e.row_dir / "no-such-model"))],
        lambda e: [str(e.row_dir / "recipe.yaml"), "model.base", str(e.row_dir / "no-such-model")]),
    # -- the prompt file --
    Row("prompts-empty", lambda e: _run_prompts(e, "prompts.jsonl", b""),
        lambda e: [str(e.row_dir / "prompts.jsonl"), "file is empty"]),
    Row("prompts-not-utf8", lambda e: _run_prompts(e, "prompts.jsonl", _line("a").encode() + b"\n\xff\xfe\n"),
        lambda e: [str(e.row_dir / "prompts.jsonl"), "not valid UTF-8"]),
    Row("prompts-missing-columns", lambda e: _run_prompts(e, "prompts.csv", "id,prompt\na,Write a haiku.\n"),
        lambda e: [str(e.row_dir / "prompts.csv"), "missing column(s): constraints"]),
    Row("prompts-duplicate-ids", lambda e: _run_prompts(e, "prompts.jsonl", "\n".join(_good_lines(6) + [_line("p2")])),
        lambda e: [str(e.row_dir / "prompts.jsonl"), "row 7", "duplicate id 'p2' (first at row 3)"]),
    Row("prompts-1mb-prompt", lambda e: _run_prompts(e, "prompts.jsonl",
                                                     "\n".join(_good_lines(6) + [_line("big", "x" * 1_000_000)])),
        lambda e: [str(e.row_dir / "prompts.jsonl"), "row 7", "1000000 characters; at most 20000"]),
    Row("prompts-corrupt-parquet", _corrupt_parquet,
        lambda e: [str(e.row_dir / "prompts.parquet"), "not a readable Parquet file"]),
    Row("prompts-unknown-constraint", lambda e: _run_prompts(e, "prompts.jsonl", _line("a", constraints=[
        {"type": "rhymes_with_orange", "args": {}}])), lambda e: [str(e.row_dir / "prompts.jsonl"), "row 1",
                                                                   "invalid constraint 1"]),
    Row("prompts-too-few-to-split", lambda e: _run_prompts(e, "prompts.jsonl", _line("only")),
        lambda e: [str(e.row_dir / "prompts.jsonl"), "both sides need at least one", "prompts.eval_fraction"]),
    # -- the model --
    Row("model-without-weights", _model_without_weights, lambda e: [str(e.row_dir / "model"), "no weights"]),
    Row("model-tokenizer-changed", _model_with_changed_tokenizer,
        lambda e: [str(e.row_dir / "model"), "tokenizer.json", "checksum"]),
    # -- storage --
    Row("dvc-remote-not-a-folder", lambda e: ["run", "--config", e.tiny(
        storage__dvc_remote=e.prompts("a-file", "not a folder") + "/remote")],
        lambda e: ["storage.dvc_remote", str(e.row_dir / "a-file" / "remote"), "is not a folder"]),
    Row("dvc-remote-read-only", lambda e: (e.mounts.enter_context(tmpfs(e.row_dir / "ro", read_only=True)),
                                           ["run", "--config", e.tiny(storage__dvc_remote=str(e.row_dir / "ro/r"))])[1],
        lambda e: ["storage.dvc_remote", str(e.row_dir / "ro" / "r"), "read-only file system"]),
    Row("dvc-remote-unresolvable-host", lambda e: ["run", "--config", e.tiny(
        storage__dvc_remote="https://dvc.no-such-host.invalid/flywheel")],
        lambda e: ["storage.dvc_remote", "https://dvc.no-such-host.invalid/flywheel", "does not resolve"]),
    # an s3 remote: without the dvc-s3 plugin that is the message; with it, the endpoint's host does not resolve
    Row("dvc-remote-s3", lambda e: (e.extra_env.update(AWS_ENDPOINT_URL="https://s3.no-such-host.invalid"),
                                    ["run", "--config", e.tiny(storage__dvc_remote="s3://flywheel-data/rounds")])[1],
        lambda e: ["storage.dvc_remote", "s3://flywheel-data/rounds"]),
    Row("disk-full-workspace", lambda e: _on_full_disk(e, state_only=False),
        lambda e: [str(e.row_dir / "disk" / "ws"), "disk is full"]),
    Row("disk-full-state-dir", lambda e: _on_full_disk(e, state_only=True),
        lambda e: [str(e.row_dir / "disk" / "state"), "disk is full"]),
    Row("workspace-read-only", _read_only_workspace, lambda e: [str(e.row_dir / "ro"), "read-only file system"]),
    # -- judges (a round whose teacher is a fake OpenAI-compatible server) --
    Row("teacher-endpoint-times-out", _teacher_round(_teacher_hangs),
        lambda e: ["teacher judge", e.extra_env["TEACHER_URL"], "no answer within the timeout"], "shared"),
    Row("teacher-endpoint-returns-garbage", _teacher_round(_teacher_garbage),
        lambda e: [e.extra_env["TEACHER_URL"], "not JSON"], "shared"),
    Row("judge-returns-no-verdict", _teacher_round(_teacher_without_verdict),
        lambda e: ["teacher", "no verdict"], "shared"),
    # -- the review gate (a round paused for review) --
    Row("review-unknown-row-ids", lambda e: ["review", "--config", str(e.shared["recipe"]), "--approve",
                                             "--reviewer", "alice", "--drop", "no-such-row"],
        lambda e: ["unknown row ids: no-such-row"], "paused"),
    Row("review-unknown-run", lambda e: ["review", "--config", str(e.shared["recipe"]), "--run", "no-such-run",
                                         "--approve", "--reviewer", "alice"],
        lambda e: ["flow run no-such-run is not a round waiting for review"], "paused"),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_fails_in_one_line_and_writes_nothing(row: Row, request, tmp_path, tiny_model_dir):
    from contextlib import ExitStack

    with ExitStack() as mounts:
        row_dir = tmp_path / "row"
        row_dir.mkdir()
        shared_state = None
        if row.where == "shared":
            shared_state = request.getfixturevalue("shared")
            ws = shared_state["ws"]
        elif row.where == "paused":
            shared_state = request.getfixturevalue("paused_round")
            wait_for_pause(shared_state)
            ws = shared_state["ws"]
        else:
            ws = tmp_path / "ws"
            ws.mkdir()
        env = Env(row_dir=row_dir, ws=ws, model=tiny_model_dir, shared=shared_state, mounts=mounts)
        try:
            args = row.build(env)
            before = snapshot(env.ws)
            cli = [*args] if "--workspace" in args else [*args, "--workspace", str(env.ws)]
            started = time.monotonic()
            result = subprocess.run(flywheel_cmd(*cli), cwd=row_dir, env={**cli_env(env.ws), **env.extra_env},
                                    capture_output=True, text=True, timeout=300)
            seconds = time.monotonic() - started
            after = snapshot(env.ws)
        finally:
            restore = (shared_state or {}).pop("restore", None)
            if restore:
                restore[0].write_bytes(restore[1])
        output = f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
        assert result.returncode == 2, output
        assert "Traceback" not in result.stderr, output
        lines = result.stderr.strip().splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], output  # one error line, and it is the last
        for expected in row.expect(env):
            assert expected in errors[0], f"{expected!r} not in {errors[0]!r}"
        assert after == before, "bad input changed the registry or the data store"
        if row.where == "fresh":
            assert seconds < 30, f"preflight took {seconds:.0f} s"
        if row.id == "export-tampered-champion":
            assert not (row_dir / "exported").exists()


def test_table_covers_at_least_twenty_kinds():
    assert len({row.id for row in ROWS}) == len(ROWS) >= 20


def test_a_disk_that_fills_up_mid_round_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """Past preflight, a full disk can still strike (another process fills it): the CLI names the file, no traceback."""
    import errno

    import flows.flywheel
    from typer.testing import CliRunner

    from flywheel import cli, preflight, temporary_api

    for key in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "FLYWHEEL_WORKSPACE"):
        monkeypatch.setenv(key, str(tmp_path / "restored-after-the-test"))  # the CLI points these at the workspace
    monkeypatch.setattr(temporary_api, "start_temporary_api", lambda: None)  # the flow below needs no API
    target = tmp_path / "data" / "rounds" / "round-0001" / "samples.parquet"

    def disk_fills_up(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(preflight, "preflight", lambda config, workspace: None)
    monkeypatch.setattr(flows.flywheel, "flywheel", disk_fills_up)
    result = CliRunner().invoke(cli.app, ["run", "--workspace", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {target}: disk is full"), result.stderr
