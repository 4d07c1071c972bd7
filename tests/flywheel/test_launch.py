import json
import sys
from pathlib import Path

import pytest

from flywheel.config import TrainingConfig
from flywheel.launch import (
    LaunchError, LaunchSpec, accelerate_config_for, build_command, last_error_line, launch_training, main, read_rows,
    repository_root, write_rows,
)
from flywheel.training import TrainedModel

DPO_ROWS = [
    {"prompt": "Describe tea. Answer in lowercase.", "chosen": "green tea is calm.", "rejected": "Green Tea Is Calm."},
    {"prompt": "Name a fruit without commas.", "chosen": "a ripe apple", "rejected": "apple, pear, plum"},
    {"prompt": "Say hello in capitals.", "chosen": "HELLO THERE", "rejected": "hello there"},
    {"prompt": "End with a question.", "chosen": "is that all?", "rejected": "that is all."},
]
TINY = dict(method="dpo", max_steps=1, batch_size=1, learning_rate=1e-3, checkpoint_steps=0, max_length=128,
            device="cpu")


def _spec(tmp_path: Path, base_dir: Path, rows: list[dict], **overrides) -> LaunchSpec:
    return LaunchSpec(base_dir=base_dir, rows_path=write_rows(rows, tmp_path / "rows.jsonl"),
                      config=TrainingConfig(**TINY), output_dir=tmp_path / "out", result_path=tmp_path / "result.json",
                      seed=3, metadata={"round": 2}, **overrides)


# --- pure ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed-zero3"])
def test_the_command_for_each_config_is_accelerates_own(strategy, tmp_path):
    from accelerate.commands.launch import launch_command_parser

    config = accelerate_config_for(strategy)
    assert config == repository_root() / "infra" / "accelerate" / f"{strategy}.yaml" and config.is_file()
    command = build_command(tmp_path / "spec.json", processes=4, accelerate_config=config)
    assert command == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4",
                       "--num_machines", "1", "--main_process_port", "0", "--config_file", str(config),
                       "-m", "flywheel.launch", str(tmp_path / "spec.json")]
    # accelerate's own parser reads it as meant: the flags exist, and flywheel.launch is the module it runs.
    args = launch_command_parser().parse_args(command[3:])
    assert (args.num_processes, args.config_file, args.main_process_port) == (4, str(config), 0)
    assert args.module and args.training_script == "flywheel.launch"
    assert args.training_script_args == [str(tmp_path / "spec.json")]
    assert not args.cpu


def test_a_cpu_command_forks_through_torchrun_not_the_single_process_cpu_launcher(tmp_path):
    spec = tmp_path / "spec.json"
    two = build_command(spec, processes=2, accelerate_config=None, cpu=True)
    # `--cpu` would take accelerate's simple launcher: one process (it forks only through an MPI hostfile).
    assert "--multi_gpu" in two and "--cpu" not in two and "--config_file" not in two
    assert two[two.index("--mixed_precision") + 1] == "no"
    assert two[-3:] == ["-m", "flywheel.launch", str(spec)]
    one = build_command(spec, processes=1, accelerate_config=None, cpu=True)
    assert "--cpu" in one and "--multi_gpu" not in one  # accelerate refuses --multi_gpu with one process
    with pytest.raises(LaunchError, match="takes no accelerate config"):
        build_command(spec, processes=2, accelerate_config=accelerate_config_for("ddp"), cpu=True)
    with pytest.raises(LaunchError, match="at least 1"):
        build_command(spec, processes=0, accelerate_config=None)


def test_a_missing_or_unknown_config_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(LaunchError, match="unknown training strategy 'zero2'"):
        accelerate_config_for("zero2")
    monkeypatch.setattr("flywheel.launch.repository_root", lambda: tmp_path)
    with pytest.raises(LaunchError, match=r"fsdp\.yaml is missing: infra/accelerate/ comes with the repository"):
        accelerate_config_for("fsdp")


def test_rows_read_from_jsonl_and_parquet_and_the_spec_round_trips(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "constraints": ["a", "b"]}, {"prompt": "q", "constraints": []}]
    assert read_rows(write_rows(rows, tmp_path / "rows.jsonl")) == rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    assert read_rows(tmp_path / "rows.parquet") == rows  # plain lists, not numpy arrays
    with pytest.raises(LaunchError, match=r"must be \.parquet or \.jsonl"):
        read_rows(tmp_path / "rows.csv")
    spec = _spec(tmp_path, tmp_path / "base", rows, checkpoint_dir=tmp_path / "ckpt", method_options={"k": 1})
    assert LaunchSpec.model_validate_json(spec.model_dump_json()) == spec
    assert main([]) == 2


def test_the_last_error_line_is_the_childs_exception_not_the_launchers(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("\n".join([
        "[rank1]: Traceback (most recent call last):",
        '[rank1]:   File "x.py", line 1, in <module>',
        "[rank1]: flywheel.training.TrainingError: no training rows for method 'dpo'",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "  exitcode  : 1 (pid: 7)",
    ]))
    assert last_error_line(log) == "flywheel.training.TrainingError: no training rows for method 'dpo'"
    log.write_text("nothing went wrong here\nKilled\n\n")
    assert last_error_line(log) == "Killed"
    assert last_error_line(tmp_path / "absent.log").startswith("(log unreadable:")


# --- real launches: 2 CPU processes joined with gloo ----------------------------------------------------------------

def test_a_failing_child_is_a_one_line_error_naming_the_log(tiny_model_dir, tmp_path):
    spec = _spec(tmp_path, tiny_model_dir, [])  # no rows: train() refuses in every process, before loading a model
    (tmp_path / "result.json").write_text("{}")  # a stale result must not be read as this run's
    with pytest.raises(LaunchError) as raised:
        launch_training(spec, processes=2, accelerate_config=None, cpu=True, log_path=tmp_path / "logs" / "t.log")
    message = str(raised.value)
    assert "\n" not in message
    assert "failed with exit code 1" in message
    assert "TrainingError: no training rows for method 'dpo'" in message
    assert f"(log: {tmp_path / 'logs' / 't.log'})" in message
    assert not (tmp_path / "result.json").exists()
    assert "flywheel.launch" in (tmp_path / "logs" / "t.log").read_text().splitlines()[0]


@pytest.mark.slow
def test_two_cpu_processes_train_one_model(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    seen: list[tuple[dict, int]] = []
    spec = _spec(tmp_path, tiny_model_dir, DPO_ROWS)  # 4 pairs: 2 per process, one step of batch 1 each
    result = launch_training(spec, processes=2, accelerate_config=None, cpu=True,
                             metrics=lambda values, step: seen.append((values, step)))
    assert result == TrainedModel.model_validate_json((tmp_path / "result.json").read_text())
    assert Path(result.path) == tmp_path / "out"
    assert (result.method, result.rows, result.rows_used, result.steps) == ("dpo", 4, 4, 1)
    assert result.device == "cpu" and result.changed_parameters > 0
    meta = json.loads((tmp_path / "out" / "flywheel-model.json").read_text())
    assert meta["sha256"] == result.sha256 and meta["round"] == 2
    trained, base = load_file(tmp_path / "out" / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[name], base[name]) for name in base)
    # The main process's log lines came back once each (not once per process).
    assert [step for values, step in seen if "loss" in values] == [1]
