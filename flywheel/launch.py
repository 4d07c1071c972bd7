"""Multi-process training through ``accelerate launch``: one ``flywheel.training.train`` per process.

The training task writes a :class:`LaunchSpec` (a JSON file) and calls :func:`launch_training`, which runs
``python -m accelerate.commands.launch ... -m flywheel.launch SPEC.json`` as a subprocess; every process it starts
runs :func:`main`, and the main process (rank 0) writes the :class:`~flywheel.training.TrainedModel` JSON to
``spec.result_path``. Strategies: the accelerate configs in ``infra/accelerate/`` (DDP, FSDP2, DeepSpeed ZeRO-3);
``cpu=True`` runs data-parallel on the CPU with gloo (used by the tests, and a machine without GPUs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from flywheel.config import TrainingConfig
from flywheel.training import MetricSink, TrainedModel

Strategy = Literal["ddp", "fsdp", "deepspeed-zero3"]
STRATEGIES: tuple[Strategy, ...] = ("ddp", "fsdp", "deepspeed-zero3")


class LaunchError(RuntimeError):
    pass


class LaunchSpec(BaseModel):
    """Everything ``flywheel.training.train`` takes, as a file each launched process can read."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    base_dir: Path
    rows_path: Path = Field(description="The training rows: .parquet or .jsonl (one JSON object a line).")
    config: TrainingConfig
    output_dir: Path
    result_path: Path = Field(description="Where the main process writes the TrainedModel JSON.")
    seed: int = 0
    metadata: dict = Field(default_factory=dict)
    checkpoint_dir: Path | None = None
    method_options: dict = Field(default_factory=dict)
    metrics_path: Path | None = Field(None, description="Where the main process appends one JSON line per logged "
                                                        "step ({'step': N, 'metrics': {...}}); None: not kept.")


# --- the parent side --------------------------------------------------------------------------------------------

def repository_root() -> Path:
    """The checkout this package runs from (``flywheel/`` sits at its top)."""
    return Path(__file__).resolve().parent.parent


def accelerate_config_for(strategy: Strategy) -> Path:
    if strategy not in STRATEGIES:
        raise LaunchError(f"unknown training strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    path = repository_root() / "infra" / "accelerate" / f"{strategy}.yaml"
    if not path.is_file():
        # An installed wheel has no infra/ folder: the configs ship with the repository checkout only.
        raise LaunchError(f"accelerate config {path} is missing: infra/accelerate/ comes with the repository "
                          "checkout, not the installed package; pass accelerate_config explicitly")
    return path


def write_rows(rows: Sequence[Mapping], path: Path) -> Path:
    """Rows as JSONL, atomically, for :attr:`LaunchSpec.rows_path`."""
    from flywheel.models import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(dict(row), sort_keys=True, default=str) + "\n" for row in rows))
    return path


def build_command(spec_path: Path, *, processes: int, accelerate_config: Path | None, cpu: bool = False) -> list[str]:
    """The ``accelerate launch`` command line (pure: nothing runs)."""
    if processes < 1:
        raise LaunchError(f"processes must be at least 1, got {processes}")
    if cpu and accelerate_config is not None:
        # The infra/accelerate configs are GPU configs (bf16, MULTI_GPU/FSDP/DEEPSPEED); mixing them with a CPU run
        # would silently pick one or the other.
        raise LaunchError("a CPU launch takes no accelerate config: the configs in infra/accelerate are for GPUs")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1",
               # 0: accelerate picks a free port, so two launches on one machine (or a stale one) never collide.
               "--main_process_port", "0"]
    if accelerate_config is not None:
        command += ["--config_file", str(accelerate_config)]
    if cpu:
        # `accelerate launch --cpu` starts ONE process unless it is given an MPI hostfile (its simple launcher
        # never forks). Several CPU processes come from the torchrun launcher (--multi_gpu); each child then finds
        # no GPU, its TrainingArguments(use_cpu=True) asks for a CPU state, and accelerate joins them with gloo.
        command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
        command += ["--multi_gpu"] if processes > 1 else ["--cpu"]
    command += ["-m", "flywheel.launch", str(spec_path)]
    return command


def launch_training(
    spec: LaunchSpec,
    *,
    processes: int,
    accelerate_config: Path | None,
    cpu: bool = False,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    metrics: MetricSink | None = None,
) -> TrainedModel:
    """Run ``train`` in ``processes`` processes through ``accelerate launch`` and return the main process's result.

    The child's output goes to ``log_path`` (default: next to ``spec.result_path``); a failure raises a one-line
    :class:`LaunchError` naming it. ``metrics``: replayed from ``spec.metrics_path`` once the run has finished
    (the children cannot call back into this process).
    """
    from flywheel.models import atomic_write_text

    result_path = Path(spec.result_path)
    log_path = Path(log_path) if log_path is not None else result_path.with_suffix(".log")
    spec_path = result_path.with_suffix(".spec.json")
    if metrics is not None and spec.metrics_path is None:
        spec = spec.model_copy(update={"metrics_path": result_path.with_suffix(".metrics.jsonl")})
    # A result or metrics file left by an earlier run must never be read as this run's.
    result_path.unlink(missing_ok=True)
    if spec.metrics_path is not None:
        Path(spec.metrics_path).unlink(missing_ok=True)
    atomic_write_text(spec_path, spec.model_dump_json(indent=2))
    command = build_command(spec_path, processes=processes, accelerate_config=accelerate_config, cpu=cpu)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if cpu:
        # Hide any GPU so device "auto" resolves to the CPU in every child, as the gloo group expects.
        child_env.update({"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"})
    child_env.update(env or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=child_env, check=False).returncode
        except OSError as error:
            raise LaunchError(f"could not start accelerate launch ({error}); log: {log_path}") from error
    if code != 0:
        raise LaunchError(f"training launch ({processes} processes) failed with exit code {code}: "
                          f"{last_error_line(log_path)} (log: {log_path})")
    if not result_path.is_file():
        raise LaunchError(f"training launch exited cleanly but wrote no result {result_path} (log: {log_path})")
    if metrics is not None and spec.metrics_path is not None and Path(spec.metrics_path).is_file():
        for line in Path(spec.metrics_path).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            metrics(record["metrics"], record["step"])
    return TrainedModel.model_validate_json(result_path.read_text(encoding="utf-8"))


# Lines a Python traceback ends with ("flywheel.training.TrainingError: ..."), possibly prefixed by torchrun's
# "[rank1]: ". The launchers' own wrappers only say that a child failed, so they are skipped.
_ERROR_LINE = re.compile(r"^(?:\[(?:rank|default)\d+\]:\s*)?([\w.]*(?:Error|Exception|Interrupt|Exit)\b.*)$")
_WRAPPERS = ("ChildFailedError", "CalledProcessError")


def last_error_line(log_path: Path) -> str:
    """The last exception line of a child's traceback in the log, else its last non-blank line."""
    try:
        lines = Path(log_path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        return f"(log unreadable: {error})"
    for line in reversed(lines):
        match = _ERROR_LINE.match(line.strip())
        if match and not any(wrapper in match.group(1) for wrapper in _WRAPPERS):
            return match.group(1)[:500]
    tail = [line.strip() for line in lines if line.strip()]
    return tail[-1][:500] if tail else "(empty log)"


# --- the child side ---------------------------------------------------------------------------------------------

def read_rows(path: Path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        # to_pylist gives plain Python values (lists, not numpy arrays) for the trainers' datasets.
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    raise LaunchError(f"{path}: training rows must be .parquet or .jsonl")


def _is_main_process() -> bool:
    from accelerate import PartialState

    # Asked after train(): TrainingArguments resets and re-creates accelerate's shared state (with the CPU/GPU
    # choice of the config), so a PartialState made before it could disagree about the process group.
    return PartialState().is_main_process


def _metrics_writer(path: Path) -> MetricSink:
    def write(values: dict[str, float], step: int) -> None:
        # The trainer logs in every process (the same, already reduced values): only the main one keeps them.
        if _is_main_process():
            with Path(path).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": step, "metrics": values}, sort_keys=True) + "\n")

    return write


def run_spec(spec: LaunchSpec) -> TrainedModel:
    """What each launched process does: train, and on the main process write the result atomically."""
    from flywheel.models import atomic_write_text
    from flywheel.training import train

    result = train(
        Path(spec.base_dir), read_rows(spec.rows_path), spec.config, Path(spec.output_dir), seed=spec.seed,
        metrics=_metrics_writer(spec.metrics_path) if spec.metrics_path is not None else None,
        metadata=spec.metadata or None, checkpoint_dir=spec.checkpoint_dir, method_options=spec.method_options or None,
    )
    if _is_main_process():
        atomic_write_text(Path(spec.result_path), result.model_dump_json(indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m flywheel.launch SPEC.json", file=sys.stderr)
        return 2
    spec = LaunchSpec.model_validate_json(Path(args[0]).read_text(encoding="utf-8"))
    run_spec(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
