"""A general-capability probe: perplexity on a fixed set of ordinary texts.

Training on instruction-following pairs can quietly damage a model's language modelling; a rise in perplexity on
plain text the flywheel never trains on is the cheapest early sign. The texts are shipped with the code so every
round measures the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

PROBE_TEXTS: tuple[str, ...] = (
    "The river rises in the hills to the north and winds for many miles through farmland before it reaches the sea.",
    "To make a simple loaf of bread, mix flour, water, salt and yeast, knead the dough, let it rise, and bake it.",
    "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide into sugar.",
    "The library opens at nine in the morning and closes at six in the evening, except on public holidays.",
    "Regular exercise strengthens the heart, improves sleep and helps people manage stress in their daily lives.",
    "In the winter months the village is quiet, and most of the shops close early because few visitors arrive.",
    "A good email states its purpose in the first sentence and ends with a clear request or next step.",
    "The committee met on Tuesday to discuss the budget, and it agreed to review the proposal again next month.",
    "Bees visit thousands of flowers each day, carrying pollen from one plant to another as they gather nectar.",
    "When you learn a new language, speaking a little every day is more useful than studying for hours once a week.",
    "The train was delayed by twenty minutes because of repairs on the line, so many passengers missed connections.",
    "Water boils at a lower temperature at high altitude, which is why cooking pasta in the mountains takes longer.",
    "She opened the window, listened to the rain on the roof, and decided to spend the afternoon reading.",
    "A budget helps a household see where its money goes and plan for large expenses before they arrive.",
    "The museum's new exhibition shows how people in the city lived and worked two hundred years ago.",
    "Before a long hike, check the weather, pack enough water, and tell someone which trail you plan to take.",
)


def perplexity(model_dir: Path, texts: Sequence[str] = PROBE_TEXTS, device: str = "cpu") -> float:
    """Token-weighted perplexity of the model on the texts (each scored on its own, with no chat template)."""
    import torch

    from flywheel.models import load_model, load_tokenizer

    if not texts:
        raise ValueError("the perplexity probe needs at least one text")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device=device, dtype="float32").eval()
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss  # mean over the ids.shape[1] - 1 predicted tokens
            total_nll += float(loss) * (ids.shape[1] - 1)
            total_tokens += ids.shape[1] - 1
    if total_tokens == 0:
        raise ValueError("the probe texts tokenized to nothing")
    return math.exp(total_nll / total_tokens)
