"""Helpers the benchmarks share: the real default model, a compute ceiling measured in the same run, the machine's
load, and one way to record a table (JSON under bench/out/, and an MLflow run in the ``flywheel-bench`` experiment).

MLflow goes to ``sqlite:///bench/out/mlflow.db`` (artifacts in bench/out/mlartifacts) unless MLFLOW_TRACKING_URI
is set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
EXPERIMENT = "flywheel-bench"
GRACE_S = 120  # for a stopped round to finish its training step and stop its server


def real_model() -> Path:
    """SmolLM2-135M-Instruct as a checksummed Hugging Face folder, provisioned once under bench/out/models."""
    from flywheel.config import DEFAULT_BASE_MODEL
    from flywheel.models import provision_base

    return Path(provision_base(DEFAULT_BASE_MODEL, OUT / "models").path)


def parameter_count(model_dir: Path) -> int:
    """Parameters as the forward pass uses them (tied embeddings counted once: they are the output projection)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def cpu_model() -> str:
    """The CPU's model name and its vector extensions that matter to torch's kernels. Benchmarks record it because
    timings compare only on one CPU, and because another CPU's kernels may round differently, so a seed's draws
    repeating across CPUs is a thing to check, not assume."""
    import platform

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    vector = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if flag in flags]
    return f"{fields.get('model name', platform.machine())} ({', '.join(vector) or 'no AVX2'})"


def machine_load() -> dict:
    one, five, fifteen = os.getloadavg()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"load_1m": round(one, 2), "load_5m": round(five, 2), "load_15m": round(fifteen, 2), "cores": cores,
            "cpu": cpu_model(), "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def load_note(load: dict) -> str:
    busy = " (other work shares these cores: figures are lower than an idle machine gives)" \
        if load["load_1m"] > 0.5 * load["cores"] else ""
    return (f"load average {load['load_1m']} / {load['load_5m']} / {load['load_15m']} on {load['cores']} cores "
            f"of {load['cpu']}{busy}")


def matmul_flops(dtype: str, size: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a square matmul in torch on this process's threads: the hardware's practical ceiling."""
    import torch

    kind = getattr(torch, dtype)
    a, b = torch.randn(size, size, dtype=kind), torch.randn(size, size, dtype=kind)
    a @ b  # warm-up: the first call allocates and picks kernels
    reps, started = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2 * size**3 * reps / elapsed


def ceilings() -> dict:
    """fp32 and bf16 matmul FLOP/s. bf16 runs at a smaller size: without AVX512-BF16/AMX it is emulated and slow."""
    from flywheel.generation import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    return {"fp32_flops": matmul_flops("float32"),
            "bf16_flops": matmul_flops("bfloat16", size=2048 if native_bf16 else 512),
            "bf16_native": native_bf16}


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def save_figure(fig, path: Path) -> Path:
    """Lay the figure out and write it as a PNG at ``path`` (its folder created): every benchmark's plot."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns``: (key, header, format spec). Returns the text it printed (a Markdown table)."""
    header = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = []
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else (format(value, spec) if spec else str(value)))
        body.append("| " + " | ".join(cells) + " |")
    text = "\n".join([header, rule, *body])
    print(text)
    return text


def log_to_mlflow(name: str, rows: list[dict], params: dict, files: list[Path], metrics: dict | None = None) -> str:
    """One run in the ``flywheel-bench`` experiment: the table as a table artifact, the files, the parameters."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    OUT.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{OUT / 'mlflow.db'}")
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # A local artifact root next to the database: the default (./mlruns) would land wherever the bench ran from.
        mlflow.create_experiment(EXPERIMENT, artifact_location=(OUT / "mlartifacts").as_uri())
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        if rows:
            columns = sorted({k for row in rows for k in row})
            mlflow.log_table({c: [row.get(c) for row in rows] for c in columns}, artifact_file=f"{name}_table.json")
        for path in files:
            mlflow.log_artifact(str(path))
        return run.info.run_id


class StoppedBySignal(SystemExit):
    """This benchmark was asked to stop (SIGTERM) and has stopped its child first; exits with status 143."""


@contextmanager
def passing_sigterm_to(process) -> Iterator[None]:
    """While the block runs, a SIGTERM to this process goes to ``process`` (a round, which stops its Prefect server
    on the way out) instead of ending this one at once and orphaning it; after the block, this process exits too.
    Any other way out of the block (Ctrl-C, an error) gives the child ``GRACE_S`` to stop before it is killed."""
    import signal
    import subprocess

    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        yield
    except BaseException:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        raise StoppedBySignal(128 + received[0])


def run_child(command: list[str], **popen_options) -> int:
    """``subprocess.run(command, check=True)`` that stops the child, rather than orphaning it, when this benchmark
    is stopped (:func:`passing_sigterm_to`). Returns the exit code; a non-zero one raises ``CalledProcessError``."""
    import subprocess

    process = subprocess.Popen(command, **popen_options)
    with passing_sigterm_to(process):
        code = process.wait()
    if code:
        raise subprocess.CalledProcessError(code, command)
    return code


def run_measured(command: list[str], *, env: dict[str, str], cwd: Path, log: Path, poll_s: float = 0.5) -> dict:
    """Run ``command`` as a child process, its output into ``log``; returns its wall seconds, exit code and two
    memory peaks, in MiB.

    ``peak_rss_mib``: the kernel's high-water mark of resident memory of the largest single process of the child's
    tree (``os.wait4``'s ru_maxrss for this one child: exact, never a sample, and fresh for every child, unlike
    ``getrusage(RUSAGE_CHILDREN)``, which keeps the maximum over every child this process ever waited for).
    ``peak_tree_rss_mib``: the largest sum of RSS over the child and all its descendants (embedded servers, git and
    DVC subprocesses), sampled every ``poll_s`` with psutil: it counts the whole tree but can miss a shorter spike.
    """
    import subprocess
    import threading

    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    peak_tree = 0
    done = threading.Event()

    def sample(pid: int) -> None:
        nonlocal peak_tree
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:  # the child has exited (or is exiting)
                return
            total = 0
            for process in tree:
                try:
                    total += process.memory_info().rss
                except psutil.Error:  # a short-lived descendant ended between the listing and the read
                    continue
            peak_tree = max(peak_tree, total)
            done.wait(poll_s)

    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
        sampler = threading.Thread(target=sample, args=(process.pid,), daemon=True)
        sampler.start()
        try:
            with passing_sigterm_to(process):
                _, status, usage = os.wait4(process.pid, 0)
        finally:
            done.set()
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    seconds = time.perf_counter() - started
    sampler.join()
    return {"seconds": seconds, "returncode": process.returncode, "peak_rss_mib": usage.ru_maxrss / 1024,
            "peak_tree_rss_mib": peak_tree / 2**20}


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path``, as ``du -s`` counts them (blocks, a hard-linked file once); 0 if absent."""
    path = Path(path)
    if not path.exists():
        return 0
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in [".", *dirs, *files]:
            info = os.lstat(os.path.join(folder, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total
