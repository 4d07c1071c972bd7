"""GPU smoke check of the library's generation engine and TRL training (bf16) on a SmolLM2-135M-shaped model.

The real weights cannot travel to a GPU machine without a network, so the model has SmolLM2-135M's architecture
and tokenizer with random weights: the check is of code paths and throughput, not of quality.

    python bench/gpu_smoke.py MODEL_CONFIG_AND_TOKENIZER_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main(source: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from flywheel.config import TrainingConfig
    from flywheel.generation import SamplingParams, TransformersEngine, user_request
    from flywheel.prompts import default_prompts
    from flywheel.training import train

    assert torch.cuda.is_available(), "no CUDA device"
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    work = Path(tempfile.mkdtemp())
    model_dir = work / "model"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    print(f"parameters: {model.num_parameters() / 1e6:.1f} M")

    prompts = [p.prompt for p in default_prompts()[:64]]
    figures = {}
    for batch in (8, 64):
        engine = TransformersEngine(model_dir, device="cuda", batch_size=batch)
        engine.generate([user_request(prompts[0])], 1, SamplingParams(max_new_tokens=8))  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = engine.generate([user_request(p) for p in prompts], 1,
                              SamplingParams(max_new_tokens=128, temperature=0.8, top_p=0.95))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        tokens = sum(c.n_tokens for c in out)
        figures[f"generate_batch{batch}_tokens_per_s"] = tokens / seconds
        print(f"generation batch {batch}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s")
        del engine

    pairs = [{"prompt": p, "chosen": "a short answer in lowercase.", "rejected": "A Long Answer In Title Case, With Commas."}
             for p in prompts[:32]]
    sft = [{"prompt": p, "completion": "a short answer in lowercase."} for p in prompts[:32]]
    for name, config, rows in (
        ("dpo-full", TrainingConfig(method="dpo", max_steps=8, batch_size=8, max_length=256), pairs),
        ("sft-full", TrainingConfig(method="sft", max_steps=8, batch_size=8, max_length=256), sft),
        ("dpo-lora", TrainingConfig(method="dpo", max_steps=8, batch_size=8, max_length=256,
                                    lora={"enabled": True}), pairs),
    ):
        result = train(model_dir, rows, config, work / name)
        figures[f"{name}_seconds"] = result.seconds
        print(f"{name}: device={result.device} precision={result.precision} steps={result.steps} "
              f"loss={result.train_loss:.4f} changed={result.changed_parameters:.2f} {result.seconds:.1f} s")
        assert result.device == "cuda" and result.changed_parameters > 0
    print(json.dumps(figures))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
