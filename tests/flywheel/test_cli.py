"""The CLI fails fast, in one line naming the file and field, on bad input (before any Prefect or model work)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flywheel.cli import app


@pytest.mark.parametrize(("text", "expected"), [
    ("trainig: {}\n", "trainig: unknown key"),
    ("training: {method: ppo}\n", "training.method"),
    ("generation: {samples_per_prompt: 1}\n", "samples_per_prompt >= 2"),
    ("model: [1, 2\n", "malformed YAML at line"),
    ("prompts: {source: missing.jsonl}\n", "prompts.source: file not found"),
])
def test_run_rejects_bad_config(tmp_path, text, expected):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = CliRunner().invoke(app, ["run", "--config", str(recipe), "--workspace", str(tmp_path)])
    assert result.exit_code == 2
    assert str(recipe) in result.stderr and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".flywheel" / "mlflow.db").exists()  # nothing was written to the registry


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(app, ["status", "--config", str(tmp_path / "nope.yaml"), "--workspace", str(tmp_path)])
    assert result.exit_code == 2 and "config file not found" in result.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(url, timeout=5).status == 200
    except OSError:
        return False


def test_ui_starts_prefect_and_mlflow_on_loopback_and_stops_them(tmp_path):
    import subprocess
    import time

    from cli import cli_env, flywheel_cmd

    prefect_port, mlflow_port = _free_port(), _free_port()
    prefect_health = f"http://127.0.0.1:{prefect_port}/api/health"
    mlflow_health = f"http://127.0.0.1:{mlflow_port}/health"
    log = tmp_path / "ui.log"
    with log.open("w") as handle:
        process = subprocess.Popen(
            flywheel_cmd("ui", "--workspace", str(tmp_path), "--prefect-port", str(prefect_port),
                         "--mlflow-port", str(mlflow_port)),
            cwd=tmp_path, env=cli_env(tmp_path), stdout=handle, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while "MLflow UI:" not in log.read_text():
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert f"http://127.0.0.1:{prefect_port}" in log.read_text()
        assert _answers(prefect_health) and _answers(mlflow_health)
    finally:
        process.terminate()
        process.wait(timeout=60)
    time.sleep(2)
    assert not _answers(prefect_health) and not _answers(mlflow_health), "servers outlived `flywheel ui`"



def test_summary_shows_each_gain_with_its_interval():
    from types import SimpleNamespace as NS

    from flywheel.cli import summary_rows
    from flywheel.evaluation import Evaluation, ModelScores, paired_gain

    def scores(accuracy):
        return ModelScores(prompts=4, prompt_accuracy=accuracy, constraint_accuracy=accuracy, per_type={},
                           truncated_share=0.0, mean_tokens=5.0)

    prompt_gain = paired_gain([(1, 0, 1), (1, 0, 1), (1, 1, 0), (1, 0, 0)])
    evaluation = Evaluation(candidate=scores(0.5), champion=scores(0.25), win_rate=0.6, accuracy_gain=0.25,
                            prompt_gain=prompt_gain, instruction_gain=paired_gain([(3, 0, 2), (3, 1, 0)]))
    record = NS(status="completed", parent_version="1", prompts=NS(round_prompts=4), judged=NS(rows=16, pass_rate=0.25),
                quality=NS(clean=NS(pairs=2, sft=3), quarantined=0), review=NS(approved=True, reviewer="policy:auto"),
                trained=NS(train_loss=0.69), evaluation=evaluation, registration=NS(version="2"),
                promotion=NS(promoted=False), dataset=NS(tag="round-0001"))
    rows = summary_rows(record)
    assert rows["prompt gain (95% CI)"] == (f"+0.250 ({prompt_gain.ci_low:+.3f} to {prompt_gain.ci_high:+.3f}), "
                                            f"p=0.50")
    assert rows["instruction gain (95% CI)"].startswith("+0.167 (")
    assert "prompt gain (95% CI)" not in summary_rows(NS(**{**vars(record), "evaluation": None, "trained": None}))
    assert "answers copying their instructions" not in rows  # a record made before they were counted
    counted = NS(**{**vars(record), "evaluation": evaluation.model_copy(update={"candidate_echoes": 4,
                                                                                "champion_echoes": 9})})
    assert summary_rows(counted)["answers copying their instructions"] == "4 (champion 9)"
    assert "answers repeating themselves" not in summary_rows(counted)
    looped = NS(**{**vars(record), "evaluation": evaluation.model_copy(update={"candidate_repetitive": 2,
                                                                               "champion_repetitive": 0})})
    assert summary_rows(looped)["answers repeating themselves"] == "2 (champion 0)"


def test_run_reports_an_api_server_that_fails_to_start_in_one_line(tmp_path, monkeypatch):
    from flywheel import cli, preflight, temporary_api

    for key in ("MLFLOW_TRACKING_URI", "PREFECT_HOME", "FLYWHEEL_WORKSPACE"):
        monkeypatch.setenv(key, str(tmp_path / "restored-after-the-test"))  # the CLI points these at the workspace

    class FailingAPI:
        def wait(self):
            raise temporary_api.TemporaryAPIError("Prefect's temporary API server exited with code 1 before it "
                                                  "answered (its error is printed above)")

    monkeypatch.setattr(preflight, "preflight", lambda config, workspace: None)
    monkeypatch.setattr(temporary_api, "start_temporary_api", FailingAPI)
    monkeypatch.setattr(cli, "_import_round_libraries", lambda: None)
    result = CliRunner().invoke(cli.app, ["run", "--workspace", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: Prefect's temporary API server exited with code 1 before it answered (its error is printed above)"]


@pytest.mark.parametrize(("args", "status"), [(["--help"], 0), (["run", "--config", "missing.yaml"], 2)])
def test_the_command_ends_after_the_exit_handlers_without_the_interpreter_teardown(tmp_path, args, status):
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import atexit, sys
        from pathlib import Path
        from flywheel import cli

        marks = Path(sys.argv[1])

        class Witness:  # a module global: deleted only by the interpreter's teardown
            def __del__(self):
                marks.with_suffix(".teardown").write_text("torn down")

        witness = Witness()
        sys.argv = ["flywheel", *sys.argv[2:]]
        command = cli.app

        def app():
            # Registered while the command runs, as Prefect's drains and the temporary API's stop are: they run.
            atexit.register(lambda: marks.with_suffix(".handler").write_text("ran"))
            command()

        cli.app = app
        cli.main()
    """)
    marks = tmp_path / "marks"
    done = subprocess.run([sys.executable, "-c", script, str(marks), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert marks.with_suffix(".handler").read_text() == "ran"
    assert not marks.with_suffix(".teardown").exists()
    if status == 0:
        assert "Run flywheel rounds" in done.stdout and done.stdout.rstrip().endswith("─╯")  # the whole help
    else:
        assert done.stderr.strip() == "error: missing.yaml: config file not found"
