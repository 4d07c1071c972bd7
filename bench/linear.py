"""The linear layers of one decode step, as the generation loop meets them: every weight of the real default model's
shapes read once per step (so cold in cache, as in the loop), for several row counts, per way of multiplying.

Generation's matrix products run well below the square-matmul yardstick of ``bench/generation.py`` (bench/README.md,
"Where the time goes on this CPU"). This measures why and what prepacked weights would buy, without the model:
random weights of the model's shapes (from its ``config.json``), one input per row count.

- ``linear``: ``torch.nn.functional.linear``, what the model runs;
- ``mkl-packed``: MKL packed weights (``torch.ops.mkl._mkl_reorder_linear_weight`` + ``_mkl_linear``), packed for
  exactly that row count: another row count falls back to ``linear``;
- ``onednn-packed``: oneDNN packed weights (``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``).

For each way: milliseconds per step, GFLOP/s, and which weight shapes give results bitwise equal to ``linear`` (the
engine's answers must stay identical to plain generation). Prints a Markdown table; writes bench/out/linear.json and
bench/out/linear.png; logs them to MLflow (see bench/common.py).

    .venv/bin/python bench/linear.py [--rows 32,64,128,256] [--threads 2] [--no-mlflow]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

WAYS = ("linear", "mkl-packed", "onednn-packed")


def layer_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear weight of one decoder layer of a Llama-style model."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    return {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
            "gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}


def multiplier(way: str, weight, rows: int):
    """A function of the input that multiplies it by ``weight`` the given way; packing happens here, untimed."""
    import torch

    if way == "linear":
        return lambda x: torch.nn.functional.linear(x, weight)
    if way == "mkl-packed":
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)
    if way == "onednn-packed":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    raise ValueError(f"unknown way {way!r} (available: {', '.join(WAYS)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,64,128,256", help="row counts (the loop's batch rows still running)")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row count and way (after 2 warm-ups)")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    ways = [w for w in args.ways.split(",") if w]
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        raise SystemExit(f"unknown way(s) {unknown} (available: {', '.join(WAYS)})")
    if "mkl-packed" in ways and not torch.backends.mkl.is_available():
        raise SystemExit("mkl-packed needs a torch build with MKL")
    model_dir = common.real_model()
    config = json.loads((model_dir / "config.json").read_text())
    shapes = layer_shapes(config)
    layers, vocabulary, hidden = config["num_hidden_layers"], config["vocab_size"], config["hidden_size"]
    torch.manual_seed(0)
    weights = [{name: torch.randn(shape) for name, shape in shapes.items()} for _ in range(layers)]
    head = torch.randn(vocabulary, hidden)
    step_flops_per_row = 2 * (layers * sum(o * i for o, i in shapes.values()) + vocabulary * hidden)
    load_before = common.machine_load()
    print(f"{model_dir.name}: {layers} layers {shapes}, output layer {vocabulary} x {hidden}; {args.threads} threads; "
          f"{common.load_note(load_before)}")
    square = common.matmul_flops("float32")

    rows_out = []
    for count in [int(r) for r in args.rows.split(",")]:
        x = {i: torch.randn(count, i) for i in {i for _, i in shapes.values()} | {hidden}}
        inputs = {name: x[i] for name, (_, i) in shapes.items()}
        for way in ways:
            # (multiply, its input, the weight) for every weight a step reads, the output layer last.
            calls = [(multiplier(way, w, count), inputs[name], w) for layer in weights for name, w in layer.items()]
            calls.append((multiplier(way, head, count), x[hidden], head))

            def step():
                for multiply, inp, _ in calls:
                    multiply(inp)

            for _ in range(2):
                step()
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds = (time.perf_counter() - started) / args.steps
            checked = [*zip(shapes, calls[:len(shapes)]), ("output", calls[-1])]
            equal = [name for name, (multiply, inp, w) in checked
                     if torch.equal(multiply(inp), torch.nn.functional.linear(inp, w))]
            flops = step_flops_per_row * count / seconds
            rows_out.append({"way": way, "rows": count, "ms_per_step": seconds * 1e3, "gflops": flops / 1e9,
                             "of_square": flops / square, "equal_to_linear": ", ".join(equal) or "none"})
            print(f"  {way:14} {count:4} rows: {seconds * 1e3:7.1f} ms a step", flush=True)
            del calls
    load_after = common.machine_load()
    print(f"\nsquare fp32 matmul {square / 1e9:.0f} GFLOP/s; load after: {common.load_note(load_after)}\n")
    table = common.print_table(rows_out, [
        ("way", "way", ""), ("rows", "rows", "d"), ("ms_per_step", "ms a step", ".1f"), ("gflops", "GFLOP/s", ".0f"),
        ("of_square", "of square matmul", ".0%"), ("equal_to_linear", "bitwise equal to linear", ""),
    ])
    report = {"model": str(model_dir), "threads": args.threads, "square_fp32_flops": square, "shapes": shapes,
              "load": {"before": load_before, "after": load_after}, "rows": rows_out, "table": table}
    json_path = common.write_json("linear", report)
    png_path = plot(rows_out, square, args.threads, common.OUT / "linear.png")
    print(f"wrote {json_path} and {png_path}")
    if not args.no_mlflow:
        run_id = common.log_to_mlflow("linear", rows_out, {
            "model": model_dir.name, "threads": args.threads, "square_gflops": round(square / 1e9, 1),
            "load_before": load_before, "load_after": load_after}, [json_path, png_path])
        print(f"logged MLflow run {run_id} in experiment {common.EXPERIMENT}")


def plot(rows: list[dict], square: float, threads: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for way in dict.fromkeys(r["way"] for r in rows):
        mine = [r for r in rows if r["way"] == way]
        ax.plot([r["rows"] for r in mine], [r["gflops"] for r in mine], marker="o", label=way)
    ax.axhline(square / 1e9, color="black", linestyle="--", label=f"square fp32 matmul ({square / 1e9:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (batch rows still running)")
    ax.set_ylabel("GFLOP/s over one decode step's linear layers")
    ax.set_title(f"Linear layers of one decode step, weights cold, {threads} threads\n{common.cpu_model()}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return common.save_figure(fig, path)


if __name__ == "__main__":
    main()
