"""A tiny random causal LM with a real trained tokenizer, built offline in a second: the models tests train."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "write a short note about the weather in lowercase letters",
    "explain how bread is made using exactly three bullet points",
    "describe a morning routine and end your answer with the phrase is there anything else",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "* first point\n* second point\n* third point",
    "P.S. remember to water the plants. <<a title>> \"quoted\" [name] SECTION 1",
    "numbers 0 1 2 3 4 5 6 7 8 9, commas; and punctuation! questions? yes.",
]


def build_tiny_model(target: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    from flywheel.prompts import default_prompts

    corpus = CORPUS * 4 + [p.prompt for p in default_prompts()]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


def build_lively_model(tiny_dir: Path, target: Path, seed: int = 1) -> Path:
    """The tiny model with its layers re-drawn at a larger scale.

    At the default init the tiny model's tied embeddings make greedy decoding repeat the prompt's last token
    ("\\n") forever, so every greedy text is empty and a comparison of texts would prove nothing. With larger
    layer weights the greedy continuation depends on the prompt.
    """
    import torch

    from flywheel.models import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_dir), load_tokenizer(tiny_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name:
                param.normal_(0, 0.2)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
