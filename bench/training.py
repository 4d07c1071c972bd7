"""Training tokens/s of SFT and DPO, fp32 and bf16, full and LoRA, through ``flywheel.training.train`` on the real
default model for a few steps, next to a compute ceiling measured in the same run.

Tokens are the real (unpadded) tokens of the sequences the steps consumed: prompt + completion for SFT, prompt +
chosen and prompt + rejected for DPO. Time is the trainer's own ``train_runtime`` (model loading, saving and dataset
preparation excluded). FLOPs per token assumed: full fine-tuning 6 x parameters (forward 2, backward 4); LoRA
4 x parameters (the backward pass still computes activation gradients through every frozen weight, 2, but no weight
gradients, adapters being negligible); DPO adds the reference model's forward pass, 2 x parameters, per token.
These are model FLOPs: TRL turns gradient checkpointing on by default, so the hardware also recomputes each forward
pass (2 x parameters more per token) that the ratio does not credit.
bf16 is asked of ``flywheel.training`` as a recipe would ask it; where it refuses, the table says so.

    .venv/bin/python bench/training.py [--steps 3] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402


def make_rows(method: str, count: int) -> list[dict]:
    """Answer-shaped rows built from the builtin prompts: fixed text, so every run trains on the same tokens."""
    from flywheel.prompts import default_prompts

    rows = []
    for k, prompt in enumerate(default_prompts()[:count]):
        good = f"here is a short answer about {prompt.topic or 'the topic'}, written in plain lowercase words. " * 2
        bad = f"HERE IS A SHORT ANSWER, NUMBER {k}, THAT IGNORES THE INSTRUCTIONS."
        rows.append({"prompt": prompt.prompt, "chosen": good.strip(), "rejected": bad} if method == "dpo"
                    else {"prompt": prompt.prompt, "completion": good.strip()})
    return rows


def count_tokens(tokenizer, rows: list[dict], method: str) -> int:
    def length(prompt: str, answer: str) -> int:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        encoded = tokenizer.apply_chat_template(messages)
        return len(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    if method == "dpo":
        return sum(length(r["prompt"], r["chosen"]) + length(r["prompt"], r["rejected"]) for r in rows)
    return sum(length(r["prompt"], r["completion"]) for r in rows)


def flops_per_token(n_params: int, method: str, lora: bool) -> int:
    policy = (4 if lora else 6) * n_params
    return policy + (2 * n_params if method == "dpo" else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--methods", default="sft,dpo")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core this process can use)")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    import torch

    from flywheel.ct2_engine import default_threads

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)  # the ceiling below is measured on the same threads

    from flywheel.config import LoraConfig, TrainingConfig
    from flywheel.models import load_tokenizer
    from flywheel.training import train

    model_dir = common.real_model()
    n_params = common.parameter_count(model_dir)
    tokenizer = load_tokenizer(model_dir)
    load_before = common.machine_load()
    print(f"model {model_dir} ({n_params / 1e6:.1f} M parameters), {threads} threads; "
          f"{common.load_note(load_before)}")
    ceiling_before = common.ceilings()
    rows_out = []
    for method in args.methods.split(","):
        # Exactly steps x batch rows for one epoch: every row is consumed once, so the token count is exact.
        rows = make_rows(method, args.steps * args.batch_size)
        tokens = count_tokens(tokenizer, rows, method)
        for precision in args.precisions.split(","):
            for lora in (False, True):
                config = TrainingConfig(method=method, epochs=1, max_steps=args.steps, batch_size=args.batch_size,
                                        learning_rate=1e-5, device="cpu", precision=precision,
                                        lora=LoraConfig(enabled=lora))
                label = f"{method} {'lora' if lora else 'full'} {precision}"
                row = {"method": method, "mode": "lora" if lora else "full", "precision": precision,
                       "steps": args.steps, "batch_size": args.batch_size, "tokens": tokens,
                       "flops_per_token": flops_per_token(n_params, method, lora)}
                logged: dict = {}
                scratch = Path(tempfile.mkdtemp(prefix="flywheel-bench-train-"))
                try:
                    result = train(model_dir, rows, config, scratch / "model", seed=0,
                                   metrics=lambda m, step: logged.update(m))
                    timed_by = "train_runtime" if "train_runtime" in logged else "train() wall time"
                    seconds = logged.get("train_runtime", result.seconds)
                    row.update(seconds=seconds, tokens_per_s=tokens / seconds, train_loss=result.train_loss,
                               note=f"timed by {timed_by}")
                except Exception as error:  # a refusal (bf16 on CPU) is a result to report, not a crash
                    row.update(seconds=None, tokens_per_s=None, note=f"refused: {str(error).splitlines()[0]}")
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                rows_out.append(row)
                shown = f"{row['tokens_per_s']:.1f} tokens/s" if row["tokens_per_s"] else row["note"]
                print(f"  {label:18}: {shown}", flush=True)
    ceiling_after = common.ceilings()
    load_after = common.machine_load()
    fp32 = (ceiling_before["fp32_flops"] + ceiling_after["fp32_flops"]) / 2
    bf16 = (ceiling_before["bf16_flops"] + ceiling_after["bf16_flops"]) / 2
    for row in rows_out:
        flops = fp32 if row["precision"] == "fp32" else bf16
        row["ceiling_tokens_per_s"] = flops / row["flops_per_token"]
        row["ratio"] = row["tokens_per_s"] / row["ceiling_tokens_per_s"] if row["tokens_per_s"] else None

    print(f"\nceiling: fp32 matmul {fp32 / 1e9:.1f} GFLOP/s, bf16 matmul {bf16 / 1e9:.1f} GFLOP/s "
          f"(bf16 {'native' if ceiling_before['bf16_native'] else 'emulated: no AVX512-BF16/AMX'})")
    print(f"load: before {common.load_note(load_before)}; after {common.load_note(load_after)}\n")
    table = common.print_table(rows_out, [
        ("method", "method", ""), ("mode", "mode", ""), ("precision", "precision", ""),
        ("tokens_per_s", "tokens/s", ".1f"), ("ceiling_tokens_per_s", "ceiling tokens/s", ".0f"),
        ("ratio", "of ceiling", ".1%"), ("note", "note", ""),
    ])
    report = {"model": str(model_dir), "parameters": n_params, "steps": args.steps, "batch_size": args.batch_size,
              "threads": threads,
              "fp32_flops": fp32, "bf16_flops": bf16, "ceilings": {"before": ceiling_before, "after": ceiling_after},
              "load": {"before": load_before, "after": load_after}, "rows": rows_out, "table": table}
    json_path = common.write_json("training", report)
    png_path = plot(rows_out, load_before, threads, common.OUT / "training.png")
    print(f"wrote {json_path} and {png_path}")
    if not args.no_mlflow:
        run_id = common.log_to_mlflow("training", rows_out, {
            "model": model_dir.name, "parameters": n_params, "steps": args.steps, "batch_size": args.batch_size,
            "threads": threads,
            "fp32_gflops": round(fp32 / 1e9, 1), "bf16_gflops": round(bf16 / 1e9, 1),
            "load_before": load_before, "load_after": load_after,
        }, [json_path, png_path])
        print(f"logged MLflow run {run_id} in experiment {common.EXPERIMENT}")


def plot(rows: list[dict], load: dict, threads: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']} {r['mode']}\n{r['precision']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 5))
    positions = range(len(rows))
    ax.bar([p - 0.2 for p in positions], [r["tokens_per_s"] or 0 for r in rows], width=0.4, label="measured")
    ax.bar([p + 0.2 for p in positions], [r["ceiling_tokens_per_s"] for r in rows], width=0.4, alpha=0.4,
           label="ceiling")
    for p, r in zip(positions, rows):
        if r["tokens_per_s"] is None:
            ax.text(p, 0, "refused", rotation=90, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"SmolLM2-135M training on CPU ({threads} of {load['cores']} cores, load {load['load_1m']})")
    ax.legend()
    return common.save_figure(fig, path)


if __name__ == "__main__":
    main()
