import json
from pathlib import Path

import pytest

from flywheel.config import TrainingConfig
from flywheel.models import METADATA_FILE, model_sha256, verify_model
from flywheel.training import TrainingError, train

FAST = dict(max_steps=2, learning_rate=1e-3, max_length=256, batch_size=2, device="cpu")

DPO_ROWS = [
    {"prompt": "Describe tea. Answer in lowercase.", "chosen": "green tea is calm.", "rejected": "Green Tea Is Calm."},
    {"prompt": "Name a fruit without commas.", "chosen": "a ripe apple", "rejected": "apple, pear, plum"},
    {"prompt": "Say hello in capitals.", "chosen": "HELLO THERE", "rejected": "hello there"},
    {"prompt": "End with a question.", "chosen": "is that all?", "rejected": "that is all."},
]
SFT_ROWS = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in DPO_ROWS]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


class Sink:
    def __init__(self):
        self.calls: list[tuple[dict, int]] = []

    def __call__(self, metrics: dict, step: int) -> None:
        self.calls.append((metrics, step))

    def steps_with(self, key: str) -> list[int]:
        return [step for metrics, step in self.calls if key in metrics]


@pytest.mark.parametrize("method,rows", [("dpo", DPO_ROWS), ("sft", SFT_ROWS)])
def test_training_moves_weights_and_saves_a_loadable_model(tiny_model_dir, tmp_path, method, rows):
    import torch
    from transformers import AutoModelForCausalLM

    sink = Sink()
    output = tmp_path / "out" / method
    result = train(tiny_model_dir, rows, TrainingConfig(method=method, **FAST), output, seed=0, metrics=sink,
                   metadata={"round": 7})
    assert result.method == method
    assert result.rows == result.rows_used == len(rows)
    assert result.steps == 2
    assert result.device == "cpu" and result.precision == "fp32"
    assert 0 < result.changed_parameters <= 1
    assert result.train_loss == result.train_loss and result.train_loss > 0  # finite, not NaN
    assert Path(result.path) == output
    assert result.sha256 == model_sha256(output) == verify_model(output).sha256
    meta = json.loads((output / METADATA_FILE).read_text())
    assert meta["source"] == f"trained:{method}" and meta["round"] == 7

    loaded = AutoModelForCausalLM.from_pretrained(output)
    parent = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    trained_weight = dict(loaded.named_parameters())[name]
    parent_weight = dict(parent.named_parameters())[name]
    assert trained_weight.shape == parent_weight.shape
    assert not torch.equal(trained_weight, parent_weight)
    assert set(dict(loaded.named_parameters())) == set(dict(parent.named_parameters()))

    assert sink.steps_with("loss") == [1, 2]
    losses = [metrics["loss"] for metrics, _ in sink.calls if "loss" in metrics]
    assert all(isinstance(v, float) and v == v for v in losses)
    summary = [metrics["train_loss"] for metrics, _ in sink.calls if "train_loss" in metrics]
    assert summary == [pytest.approx(result.train_loss)]
    if method == "dpo":
        assert sink.steps_with("rewards/margins") == [1, 2]
        # At the first step the policy is its own reference: the DPO loss is -log(sigmoid(0)) = ln 2.
        assert losses[0] == pytest.approx(0.6931, abs=1e-3)


def test_lora_trains_and_saves_a_merged_model(tiny_model_dir, tmp_path):
    config = TrainingConfig(method="sft", lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, **FAST)
    output = tmp_path / "lora"
    result = train(tiny_model_dir, SFT_ROWS, config, output)
    assert result.changed_parameters > 0
    files = {p.name for p in output.iterdir()}
    assert not {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"} & files
    trained, parent = _state(output), _state(tiny_model_dir)
    assert set(trained) == set(parent)
    assert not any("lora" in key for key in trained)
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in parent.items()}
    # Merged: the adapted linear layers changed, the embeddings (not a LoRA target) did not.
    changed = {k for k in parent if not (trained[k] == parent[k]).all()}
    assert any("q_proj" in k for k in changed)
    assert "model.embed_tokens.weight" not in changed
    verify_model(output)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_extrapolation_scales_what_training_moved(tiny_model_dir, tmp_path, factor, lora):
    import torch

    adapters = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}} if lora else {}
    plain = train(tiny_model_dir, SFT_ROWS, TrainingConfig(method="sft", **adapters, **FAST), tmp_path / "plain", seed=0)
    scaled = train(tiny_model_dir, SFT_ROWS, TrainingConfig(method="sft", extrapolation=factor, **adapters, **FAST),
                   tmp_path / "scaled", seed=0)
    start, moved, result = _state(tiny_model_dir), _state(Path(plain.path)), _state(Path(scaled.path))
    assert set(result) == set(start)
    changed = [name for name in start if not torch.equal(moved[name], start[name])]
    assert changed and scaled.changed_parameters == plain.changed_parameters
    for name in start:  # the same training run, its step from the start scaled; untouched weights stay put
        assert torch.allclose(result[name], start[name] + factor * (moved[name] - start[name]), atol=1e-6), name
    verify_model(Path(scaled.path))


def test_extrapolation_without_a_parameters_starting_value_raises_and_changes_nothing():
    # A start taken from another model (or before an adapter was added) must not be half applied.
    import torch

    from flywheel.training import extrapolate

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    start = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("1.")}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    moved = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(TrainingError, match=r"2 trained parameters \(first '1.weight'\) have no starting value"):
        extrapolate(model, start, 2.0)
    assert all(torch.equal(p, moved[name]) for name, p in model.named_parameters())
    assert not torch.equal(moved["0.weight"], before["0.weight"])


@pytest.mark.parametrize("factor", [0, -1.0, 4.5])
def test_extrapolation_out_of_range_is_refused(factor):
    with pytest.raises(ValueError, match="extrapolation"):
        TrainingConfig(method="sft", extrapolation=factor)


def test_sft_weight_adds_the_chosen_answers_likelihood_to_the_dpo_loss(tiny_model_dir, tmp_path):
    # On the first step the policy is its own reference, so plain DPO's loss is exactly log 2; the SFT term adds the
    # chosen answers' negative log-likelihood (large for a random model), weighted.
    one_step = {**FAST, "max_steps": 1}
    plain = train(tiny_model_dir, DPO_ROWS, TrainingConfig(method="dpo", **one_step), tmp_path / "plain")
    rpo = train(tiny_model_dir, DPO_ROWS, TrainingConfig(method="dpo", sft_weight=0.5, **one_step), tmp_path / "rpo")
    assert plain.train_loss == pytest.approx(0.6931, abs=1e-3)
    assert rpo.train_loss > plain.train_loss + 1.0
    assert rpo.changed_parameters > 0


def test_sft_weight_is_refused_without_dpo():
    with pytest.raises(ValueError, match="sft_weight adds an SFT term to the DPO loss"):
        TrainingConfig(method="sft", sft_weight=1.0)


@pytest.mark.parametrize("kl_tokens", ["prompt", "answer"])
def test_kl_weight_adds_nothing_while_the_model_is_its_own_reference(tiny_model_dir, tmp_path, kl_tokens):
    # Step 1 starts from the reference, so the KL term is zero and the loss is TRL's own SFT loss on the same batch:
    # the anchored loss is normalized exactly as the plain one.
    one_step = {**FAST, "max_steps": 1}
    plain = train(tiny_model_dir, SFT_ROWS, TrainingConfig(method="sft", **one_step), tmp_path / "plain")
    anchored = train(tiny_model_dir, SFT_ROWS,
                     TrainingConfig(method="sft", kl_weight=2.0, kl_tokens=kl_tokens, **one_step), tmp_path / "kl")
    assert anchored.train_loss == pytest.approx(plain.train_loss, rel=1e-4)
    assert anchored.changed_parameters > 0


def _kl_from(start_dir: Path, trained_dir: Path, rows: list[dict], part: str) -> float:
    """Mean KL(start || trained) over the next-token distributions of the rows in the chat form trained on: at the
    positions that predict the answer's tokens (``part="answer"``), or the request's (``"prompt"``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(start_dir)
    start, trained = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (start_dir, trained_dir))
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            chat = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
            ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
            prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, return_dict=True)["input_ids"]
            positions = slice(len(prompt) - 1, ids.shape[1] - 1) if part == "answer" else slice(0, len(prompt) - 1)
            p, q = (m(ids).logits[0, positions].log_softmax(-1) for m in (start, trained))
            total += (p.exp() * (p - q)).sum(-1).sum().item()
            count += p.shape[0]
    return total / count


@pytest.mark.parametrize("kl_tokens", ["prompt", "answer"])
def test_kl_weight_keeps_the_anchored_tokens_where_they_started(tiny_model_dir, tmp_path, kl_tokens):
    steps = {**FAST, "max_steps": 20, "learning_rate": 1e-2}
    plain = train(tiny_model_dir, SFT_ROWS, TrainingConfig(method="sft", **steps), tmp_path / "plain")
    anchored = train(tiny_model_dir, SFT_ROWS, TrainingConfig(method="sft", kl_weight=50.0, kl_tokens=kl_tokens,
                                                              **steps), tmp_path / "anchored")
    assert anchored.changed_parameters > 0
    drift_plain = _kl_from(tiny_model_dir, Path(plain.path), SFT_ROWS, kl_tokens)
    drift_anchored = _kl_from(tiny_model_dir, Path(anchored.path), SFT_ROWS, kl_tokens)
    assert drift_plain > 0
    assert drift_anchored < 0.5 * drift_plain, (drift_anchored, drift_plain)


def test_kl_weight_with_lora_trains_against_the_model_before_its_adapters(tiny_model_dir, tmp_path):
    config = TrainingConfig(method="sft", kl_weight=1.0, lora={"enabled": True}, **{**FAST, "max_steps": 3})
    trained = train(tiny_model_dir, SFT_ROWS, config, tmp_path / "lora")
    assert trained.changed_parameters > 0
    assert _kl_from(tiny_model_dir, Path(trained.path), SFT_ROWS, "answer") > 0


def test_kl_weight_is_refused_without_sft():
    with pytest.raises(ValueError, match="kl_weight anchors SFT"):
        TrainingConfig(method="dpo", kl_weight=1.0)


def test_cut_off_targets_are_trained_without_their_end_of_turn(tiny_model_dir, tmp_path):
    from flywheel.models import load_model, load_tokenizer
    from flywheel.training import _make_trainer, open_cut_off_endings

    rows = [{**row, "ended": index != 1} for index, row in enumerate(SFT_ROWS)]
    config = TrainingConfig(method="sft", open_cut_off_targets=True, **FAST)
    tokenizer = load_tokenizer(tiny_model_dir)
    end = tokenizer.eos_token_id
    common = dict(max_steps=2, learning_rate=1e-3, per_device_train_batch_size=2, max_length=256, report_to="none",
                  use_cpu=True, save_strategy="no")
    trainer = _make_trainer(config, load_model(tiny_model_dir, device="cpu", dtype="float32"), tokenizer, rows,
                            common, None, [], str(tmp_path), {})
    trained_ends = [[token for token, label in zip(example["input_ids"], example["labels"])
                     if label != -100 and token == end] for example in trainer.train_dataset]
    assert [len(ends) > 0 for ends in trained_ends] == [True, False, True, True]
    # The row's answer itself is still trained on, only what follows it is not.
    opened = trainer.train_dataset[1]
    answer = tokenizer(SFT_ROWS[1]["completion"], add_special_tokens=False)["input_ids"]
    trained = [token for token, label in zip(opened["input_ids"], opened["labels"]) if label != -100]
    assert trained == answer
    # Nothing to open without the setting's rows; a dataset that lost rows cannot be matched to them.
    assert open_cut_off_endings(trainer, SFT_ROWS, end) == 0
    with pytest.raises(TrainingError, match="cannot tell which"):
        open_cut_off_endings(trainer, rows[:3], end)


ANCHOR_ROWS = [
    {"prompt": "Describe a river.", "completion": "A river runs from the hills to the sea, wide and slow.",
     "origin": "repair:anchor"},
    {"prompt": "Explain what bread is.", "completion": "Bread is baked from flour, water and yeast.",
     "origin": "repair:anchor"},
]


def test_kl_anchor_rows_hold_their_answers_to_the_starting_model(tiny_model_dir, tmp_path):
    from flywheel.models import load_model, load_tokenizer
    from flywheel.training import _make_trainer

    targets = [{**row, "origin": "repair:accepted"} for row in SFT_ROWS]
    steps = {**FAST, "max_steps": 20, "learning_rate": 1e-2}
    config = TrainingConfig(method="sft", kl_weight=50.0, **steps)
    without = train(tiny_model_dir, targets, config, tmp_path / "without")
    anchored = train(tiny_model_dir, targets + ANCHOR_ROWS, config, tmp_path / "anchored")
    assert anchored.rows_used == 6 and anchored.changed_parameters > 0
    # The targets alone move the anchors' answers too; with them as anchors they move far less.
    drift_without = _kl_from(tiny_model_dir, Path(without.path), ANCHOR_ROWS, "answer")
    drift_anchored = _kl_from(tiny_model_dir, Path(anchored.path), ANCHOR_ROWS, "answer")
    assert drift_without > 0
    assert drift_anchored < 0.5 * drift_without, (drift_anchored, drift_without)

    # No loss on an anchor's tokens: its labels are all masked, the targets' answers keep theirs.
    tokenizer = load_tokenizer(tiny_model_dir)
    common = dict(max_steps=1, per_device_train_batch_size=2, max_length=256, report_to="none", use_cpu=True,
                  save_strategy="no")
    trainer = _make_trainer(config, load_model(tiny_model_dir, device="cpu", dtype="float32"), tokenizer,
                            targets + ANCHOR_ROWS, common, None, [], str(tmp_path), {})
    labelled = [sum(label != -100 for label in example["labels"]) for example in trainer.train_dataset]
    assert all(count > 0 for count in labelled[:4]) and labelled[4:] == [0, 0]
    # Without the KL term an anchor would teach nothing at all: refused rather than silently ignored.
    with pytest.raises(TrainingError, match="2 KL anchor rows"):
        train(tiny_model_dir, targets + ANCHOR_ROWS, TrainingConfig(method="sft", **FAST), tmp_path / "no-kl")


def test_open_cut_off_targets_is_refused_without_sft():
    with pytest.raises(ValueError, match="open_cut_off_targets applies to SFT"):
        TrainingConfig(method="dpo", open_cut_off_targets=True)


def test_carry_refused_rounds_is_refused_with_grpo():
    with pytest.raises(ValueError, match="carry_refused_rounds carries training rows"):
        TrainingConfig(method="grpo", carry_refused_rounds=1)
    assert TrainingConfig(method="dpo", carry_refused_rounds=2).carry_refused_rounds == 2


def test_no_rows_raise(tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match="no training rows for method 'dpo'"):
        train(tiny_model_dir, [], TrainingConfig(method="dpo", **FAST), tmp_path / "none")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("method", ["dpo", "sft"])
def test_rows_longer_than_max_length_raise(tiny_model_dir, tmp_path, method):
    long_prompt = " ".join(["explain how bread is made using exactly three bullet points"] * 8)
    rows = [{"prompt": long_prompt, "chosen": "ok", "rejected": "no", "completion": "ok"}] * 2
    rows = [{k: v for k, v in r.items() if k in (("prompt", "chosen", "rejected") if method == "dpo"
                                                  else ("prompt", "completion"))} for r in rows]
    config = TrainingConfig(method=method, **{**FAST, "max_length": 16})
    with pytest.raises(TrainingError, match="max_length=16") as caught:
        train(tiny_model_dir, rows, config, tmp_path / "long")
    assert "all 2 training rows" in str(caught.value)
    assert not (tmp_path / "long").exists()


def test_bf16_on_a_cpu_without_native_bf16_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    import flywheel.generation as generation

    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(TrainingError, match="no native bf16"):
        train(tiny_model_dir, SFT_ROWS, TrainingConfig(method="sft", precision="bf16", **FAST), tmp_path / "bf16")


def test_bf16_on_a_cpu_with_native_bf16_trains(tiny_model_dir, tmp_path, monkeypatch):
    import flywheel.generation as generation

    monkeypatch.setattr(generation, "cpu_has_native_bf16", lambda: True)  # emulated or not, a tiny model is cheap
    result = train(tiny_model_dir, SFT_ROWS, TrainingConfig(method="sft", precision="bf16", **FAST),
                   tmp_path / "bf16")
    assert result.precision == "bf16" and result.changed_parameters > 0


_KILLED_TRAINING = """
import sys, json
from pathlib import Path
from flywheel.config import TrainingConfig
from flywheel.training import train
base, rows, out, checkpoints = sys.argv[1:5]
config = TrainingConfig(method="sft", max_steps=4, checkpoint_steps=2, learning_rate=1e-3, max_length=256,
                        batch_size=1, device="cpu")
train(Path(base), json.loads(rows), config, Path(out), checkpoint_dir=Path(checkpoints))
"""


def test_training_killed_mid_run_resumes_from_its_last_complete_checkpoint(tiny_model_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from flywheel.faults import FAULT_ENV

    checkpoints, output = tmp_path / "checkpoints", tmp_path / "out"
    env = {**os.environ, FAULT_ENV: "during:train", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_TRAINING, str(tiny_model_dir), json.dumps(SFT_ROWS), str(output),
         str(checkpoints)], env=env, capture_output=True, text=True, timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (checkpoints / "checkpoint-2" / "flywheel-complete").is_file()
    assert not output.exists()
    # A later checkpoint the kill interrupted half-way is not trusted.
    (checkpoints / "checkpoint-3").mkdir()
    (checkpoints / "checkpoint-3" / "model.safetensors").write_bytes(b"half")

    sink = Sink()
    config = TrainingConfig(method="sft", checkpoint_steps=2, **{**FAST, "max_steps": 4, "batch_size": 1})
    trained = train(tiny_model_dir, SFT_ROWS, config, output, metrics=sink, checkpoint_dir=checkpoints)
    assert trained.steps == 4
    assert sink.steps_with("loss") == [3, 4]  # steps 1-2 came from the checkpoint, not trained again
    assert verify_model(output).sha256 == trained.sha256
    assert not checkpoints.exists()  # superseded by the saved model


def test_training_without_checkpoint_dir_saves_no_checkpoints(tiny_model_dir, tmp_path):
    config = TrainingConfig(method="sft", checkpoint_steps=1, **FAST)
    train(tiny_model_dir, SFT_ROWS, config, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("enabled", [True, False])
def test_checkpointing_switch_takes_the_installed_transformers_name(tmp_path, enabled):
    import warnings

    from trl import DPOConfig

    from flywheel.training import checkpointing_argument

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name would warn
        args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **checkpointing_argument(enabled))
    assert args.gradient_checkpointing is enabled
