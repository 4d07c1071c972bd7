"""Tokens/s of batched generation per engine and batch size on the real default model, next to a compute ceiling
measured in the same run, and whether each engine's greedy outputs equal plain transformers generation.

Each batch size answers that many prompts (greedy, one sample each, up to --new-tokens tokens) in one batch; the
figure is generated tokens (EOS excluded) over wall time. The ceiling is matmul FLOP/s (fp32, bf16) divided by the
FLOPs one generated token needs, 2 x parameters (prompt processing and attention over the cache are not counted, so
no engine can reach 100%); each row's fp32 ratio uses the mean of fp32 matmul measurements taken right before and
right after that row, as this host's speed drifts within minutes. A second ratio counts the prompt tokens too (2 x
parameters for every token the model processes, prompt and answer: model FLOPs utilization, attention still left
out); the first is the headline figure.

With ``--samples K`` each batch of B rows answers B / K prompts K times with the round's sampling (temperature,
top_p 0.95, seed 0), the workload of a round's generate stage. ``transformers`` is the engine (its own decode loop:
each prompt pre-filled once for its K samples and its keys and values read once a step for all of them, KV cache
written in place, finished rows leave the batch); ``transformers-copied`` is the same loop with the prompt's cache
copied to each sample's row (the engine before shared prompts: sdpa over each row's whole sequence);
``transformers-plain`` is plain ``model.generate`` (every row pre-fills, transformers' DynamicCache, rows run until
the batch's longest answer ends), the reference: the identity check compares each engine's answers with
``transformers-plain``'s, greedy and sampled. Both draw with the engine's ``NucleusSampler``;
``transformers-warpers`` is plain ``model.generate`` with transformers' own top-p warper and multinomial (the
engine before the sampler): the same distribution, other draws, so its identity count is expected to be near 0.
Prints a Markdown table; writes bench/out/generation.json and bench/out/generation.png;
logs them to MLflow (see bench/common.py).

    .venv/bin/python bench/generation.py [--batch-sizes 1,2,4,8,16,32,64] [--engines transformers,ctranslate2,...]
        [--samples 4 --engines transformers,transformers-plain]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

# name -> (make_engine name, compute_type); "transformers-plain" is plain model.generate, the reference every other
# engine's answers are compared with.
ENGINES = {
    "transformers": ("transformers", "float32"),
    "transformers-copied": ("transformers", "float32"),  # the loop, each sample's row with its own prompt cache
    "transformers-plain": ("transformers", "float32"),
    "transformers-warpers": ("transformers", "float32"),  # transformers' top-p sort and multinomial
    "transformers-bf16": ("transformers", "bfloat16"),  # generation.precision: bf16 (CPUs with native bf16)
    "ctranslate2": ("ctranslate2", "float32"),
    "ctranslate2-int8": ("ctranslate2", "int8"),
}


def build(engine: str, model_dir: Path, batch_size: int, threads: int):
    from flywheel.generation import make_engine

    name, compute_type = ENGINES[engine]
    if name == "transformers":
        built = make_engine(name, model_dir, "cpu", batch_size,
                            precision="bf16" if compute_type == "bfloat16" else "fp32")
        built.decoder = "generate" if engine in ("transformers-plain", "transformers-warpers") else "flywheel"
        built.fast_sampling = engine != "transformers-warpers"
        built.shared_prompts = built.shared_prompts and engine != "transformers-copied"
        return built
    built = make_engine(name, model_dir, "cpu", batch_size, compute_type=compute_type, threads=threads,
                        cache_dir=common.OUT / "ctranslate2")
    return built


def timed(engine, requests, samples, params) -> tuple[list, float]:
    started = time.perf_counter()
    completions = engine.generate(requests, samples, params)
    return completions, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--engines", default="",
                        help="default: transformers, transformers-plain (plain model.generate, the reference for the "
                             "identity check), ctranslate2, ctranslate2-int8, and transformers-bf16 where the CPU "
                             "has native bf16")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="0: every core this process can use")
    parser.add_argument("--samples", type=int, default=1,
                        help="samples per prompt: a batch of B rows answers B / samples prompts (the round's "
                             "workload: configs/default.yaml draws 4); above 1, --temperature applies (0: greedy, "
                             "the samples of a prompt then all equal plain generate's answer)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    parser.add_argument("--prompts", type=int, default=0,
                        help="prompts every batch size answers (0: one batch's worth, batch / samples): with "
                             "--prompts 64 --samples 4 each size runs the default round's whole generate workload")
    parser.add_argument("--profile", action="store_true",
                        help="after the timings, run each engine's first batch once more under torch's profiler and "
                             "print where its time went (ops by CPU time, and the matrix products' GFLOP/s)")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    import torch

    from flywheel.ct2_engine import default_threads
    from flywheel.generation import SamplingParams, user_request
    from flywheel.prompts import default_prompts

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    from flywheel.generation import cpu_has_native_bf16

    engines = [e for e in args.engines.split(",") if e] or [
        "transformers", "transformers-plain", *(["transformers-bf16"] if cpu_has_native_bf16() else []), "ctranslate2",
        "ctranslate2-int8"]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown} (available: {', '.join(ENGINES)})")
    model_dir = common.real_model()
    n_params = common.parameter_count(model_dir)
    flops_per_token = 2 * n_params
    load_before = common.machine_load()
    print(f"model {model_dir} ({n_params / 1e6:.1f} M parameters), {threads} threads; {common.load_note(load_before)}")
    ceiling_before = common.ceilings()
    if args.samples < 1 or any(size % args.samples for size in sizes):
        raise SystemExit(f"--samples {args.samples} must divide every batch size {sizes}")
    if args.prompts < 0:
        raise SystemExit("--prompts must be 0 or more")
    prompts = [user_request(p.prompt) for p in default_prompts()[: args.prompts or max(sizes) // args.samples]]
    # Greedy with one sample (the identity check); the round's sampling when several samples are drawn.
    params = (SamplingParams(max_new_tokens=args.new_tokens) if args.samples == 1 else
              SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature, top_p=0.95, seed=0))

    from flywheel.generation import encode_request
    from flywheel.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    prompt_tokens = [len(encode_request(tokenizer, r)) for r in prompts]
    rows, outputs, setup = [], {}, {}
    # This host's speed drifts by 10-20% within minutes, so each row is set against an fp32 ceiling measured right
    # before and right after it (the mean of the two), not only at the start and the end of the whole run.
    last_fp32 = ceiling_before["fp32_flops"]
    for engine_name in engines:
        started = time.perf_counter()
        engine = build(engine_name, model_dir, max(sizes), threads)
        setup[engine_name] = time.perf_counter() - started  # load (and, the first time, conversion)
        engine.generate(prompts[:2], 1, SamplingParams(max_new_tokens=4))  # warm-up outside the timings
        for size in sizes:
            engine.batch_size = size
            asked = args.prompts or size // args.samples
            completions, seconds = timed(engine, prompts[:asked], args.samples, params)
            tokens = sum(c.n_tokens for c in completions)
            # Prompt tokens the engine pre-fills: every row's, or each prompt's once when it shares them.
            prefills = 1 if getattr(engine, "decoder", "") == "flywheel" else args.samples
            next_fp32 = common.matmul_flops("float32")
            rows.append({"engine": engine_name, "batch_size": size, "samples": args.samples, "tokens": tokens,
                         "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "prompt_tokens": prefills * sum(prompt_tokens[:asked]),
                         "fp32_flops": (last_fp32 + next_fp32) / 2})
            last_fp32 = next_fp32
            print(f"  {engine_name:18} batch {size:3}: {tokens:6} tokens in {seconds:7.1f} s = "
                  f"{tokens / seconds:7.1f} tokens/s", flush=True)
            if size == max(sizes):
                outputs[engine_name] = completions
        if args.profile:
            engine.batch_size = sizes[0]
            profile_batch(engine, engine_name, prompts[: sizes[0] // args.samples], args.samples, params)
        del engine
    ceiling_after = common.ceilings()
    load_after = common.machine_load()
    # The run's ceilings (plot, summary): the mean of the measurements before and after all engines.
    fp32 = (ceiling_before["fp32_flops"] + ceiling_after["fp32_flops"]) / 2
    bf16 = (ceiling_before["bf16_flops"] + ceiling_after["bf16_flops"]) / 2
    fp32_ceiling, bf16_ceiling = fp32 / flops_per_token, bf16 / flops_per_token
    for row in rows:
        row_ceiling = row["fp32_flops"] / flops_per_token
        row["fp32_ceiling_tokens_per_s"] = row_ceiling
        row["ratio_fp32"] = row["tokens_per_s"] / row_ceiling
        row["ratio_bf16"] = row["tokens_per_s"] / bf16_ceiling
        row["ratio_fp32_with_prompt"] = (row["tokens"] + row["prompt_tokens"]) / row["seconds"] / row_ceiling

    identity = {}
    reference_name = "transformers-plain" if "transformers-plain" in outputs else "transformers"
    reference = outputs.get(reference_name)
    for engine_name, completions in outputs.items():
        if reference is None or engine_name == reference_name:
            continue
        same = sum((a.text, a.n_tokens, a.finished) == (b.text, b.n_tokens, b.finished)
                   for a, b in zip(reference, completions))
        identity[engine_name] = {"identical": same, "prompts": len(reference)}

    print(f"\nceiling: fp32 matmul {fp32 / 1e9:.1f} GFLOP/s, bf16 matmul {bf16 / 1e9:.1f} GFLOP/s "
          f"(bf16 {'native' if ceiling_before['bf16_native'] else 'emulated: no AVX512-BF16/AMX'}); "
          f"{flops_per_token / 1e9:.3f} GFLOP per generated token -> fp32 ceiling {fp32_ceiling:.0f} tokens/s, "
          f"bf16 ceiling {bf16_ceiling:.0f} tokens/s")
    print(f"load: before {common.load_note(load_before)}; after {common.load_note(load_after)}\n")
    table = common.print_table(rows, [
        ("engine", "engine", ""), ("batch_size", "batch", "d"), ("tokens_per_s", "tokens/s", ".1f"),
        ("fp32_ceiling_tokens_per_s", "fp32 ceiling around the row", ".0f"), ("ratio_fp32", "of fp32 ceiling", ".1%"),
        ("ratio_fp32_with_prompt", "of fp32, prompt tokens counted", ".1%"),
        ("ratio_bf16", "of bf16 ceiling", ".1%"),
    ])
    for engine_name, result in identity.items():
        kind = "greedy" if params.temperature == 0 else "sampled (seed 0)"
        kind += f", {args.samples} per prompt" if args.samples > 1 else ""
        print(f"{kind} identity, {engine_name} vs {reference_name} on {result['prompts']} answers x "
              f"{args.new_tokens} tokens: {result['identical']}/{result['prompts']} identical (text, tokens, finished)")
    for engine_name, seconds in setup.items():
        print(f"setup {engine_name}: {seconds:.1f} s")

    report = {"model": str(model_dir), "parameters": n_params, "flops_per_token": flops_per_token,
              "new_tokens": args.new_tokens, "samples": args.samples, "threads": threads, "fp32_flops": fp32,
              "bf16_flops": bf16,
              "ceilings": {"before": ceiling_before, "after": ceiling_after},
              "load": {"before": load_before, "after": load_after}, "rows": rows, "greedy_identity": identity,
              "setup_seconds": setup, "table": table}
    json_path = common.write_json("generation", report)
    png_path = plot(rows, fp32_ceiling, bf16_ceiling, load_before, threads, common.OUT / "generation.png")
    print(f"wrote {json_path} and {png_path}")
    if not args.no_mlflow:
        best = {f"best_tokens_per_s.{e}": max(r["tokens_per_s"] for r in rows if r["engine"] == e) for e in engines}
        run_id = common.log_to_mlflow("generation", rows, {
            "model": model_dir.name, "parameters": n_params, "new_tokens": args.new_tokens, "samples": args.samples,
            "threads": threads,
            "fp32_gflops": round(fp32 / 1e9, 1), "bf16_gflops": round(bf16 / 1e9, 1),
            "load_before": load_before, "load_after": load_after,
            **{f"identical.{e}": f"{r['identical']}/{r['prompts']}" for e, r in identity.items()},
        }, [json_path, png_path], metrics=best)
        print(f"logged MLflow run {run_id} in experiment {common.EXPERIMENT}")


def profile_batch(engine, engine_name: str, prompts: list, samples: int, params, top: int = 15) -> None:
    """One batch under torch's profiler (which slows small ops): the ops that took the most CPU time, and the rate
    of the matrix products (``aten::mm``, the linear layers) from the profiler's own FLOP count."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
        completions, seconds = timed(engine, prompts, samples, params)
    averages = profiler.key_averages()
    print(f"\nprofile of {engine_name}, one batch of {len(prompts) * samples} rows: "
          f"{sum(c.n_tokens for c in completions)} tokens in {seconds:.1f} s (profiled)")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))
    for op in ("aten::mm", "aten::bmm"):
        event = next((e for e in averages if e.key == op), None)
        if event is not None and event.self_cpu_time_total:
            print(f"{op}: {event.flops / 1e9:.0f} GFLOP in {event.self_cpu_time_total / 1e6:.1f} s = "
                  f"{event.flops / event.self_cpu_time_total / 1e3:.0f} GFLOP/s")


def plot(rows: list[dict], fp32_ceiling: float, bf16_ceiling: float, load: dict, threads: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    sizes = sorted({r["batch_size"] for r in rows})
    if len(sizes) == 1:  # engines compared at one batch size: bars, each labelled with its share of the ceiling
        bars = ax.bar([r["engine"] for r in rows], [r["tokens_per_s"] for r in rows], color="tab:blue")
        ax.bar_label(bars, labels=[f"{r['tokens_per_s']:.0f} ({r['ratio_fp32']:.1%})" for r in rows], fontsize=8)
        ax.set_xlabel(f"engine, batch {sizes[0]}")
    else:
        for engine_name in dict.fromkeys(r["engine"] for r in rows):
            mine = [r for r in rows if r["engine"] == engine_name]
            ax.plot([r["batch_size"] for r in mine], [r["tokens_per_s"] for r in mine], marker="o", label=engine_name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
    ax.axhline(fp32_ceiling, color="black", linestyle="--", label=f"fp32 ceiling ({fp32_ceiling:.0f})")
    ax.axhline(0.4 * fp32_ceiling, color="grey", linestyle=":", label="40% of fp32 ceiling")
    if bf16_ceiling < fp32_ceiling * 3:
        ax.axhline(bf16_ceiling, color="brown", linestyle="--", label=f"bf16 ceiling ({bf16_ceiling:.0f})")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"SmolLM2-135M generation on CPU ({threads} of {load['cores']} cores, load {load['load_1m']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return common.save_figure(fig, path)


if __name__ == "__main__":
    main()
