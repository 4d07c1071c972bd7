import math
from pathlib import Path

import pytest

from flywheel.config import GrpoConfig, TrainingConfig
from flywheel.prompts import Prompt
from flywheel.reward import (
    GrpoError, RewardModelError, RewardModelJudge, constraints_json, generation_batch, make_grpo_trainer,
    reward_model_reward, train_reward_model, verifier_reward, weighted_rows,
)
from flywheel.verifiers import Constraint

WORDS = ["tea", "sea", "sun", "moon", "rain", "wind"]
# chosen and rejected differ systematically (lowercase vs UPPERCASE), so a few steps can learn the difference
PAIRS = [{"prompt": f"write about the {w}", "chosen": f"the {w} is calm and nice",
          "rejected": f"THE {w.upper()} IS CALM AND NICE"} for w in WORDS]
PAIRS[0] = {**PAIRS[0], "weight": 2}  # a human-reviewed pair
RM_CONFIG = TrainingConfig(max_steps=4, learning_rate=1e-3, batch_size=2, max_length=128, device="cpu")

LOWER_NO_COMMAS = [Constraint(type="all_lowercase"), Constraint(type="no_commas")]

GRPO_COMMON = dict(
    num_train_epochs=1.0, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=2,
    gradient_accumulation_steps=1, max_length=128, logging_steps=1, save_strategy="no", save_steps=500,
    save_total_limit=1, report_to="none", seed=0, bf16=False, use_cpu=True, disable_tqdm=True,
    dataloader_num_workers=0, gradient_checkpointing=False,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("reward") / "rm"
    return train_reward_model(tiny_model_dir, PAIRS, output, RM_CONFIG, seed=0)


def _grpo_rows(texts: list[str], constraints=LOWER_NO_COMMAS) -> list[dict]:
    prompts = [Prompt(id=f"p{i}", prompt=text, constraints=constraints) for i, text in enumerate(texts)]
    return [{"prompt_id": p.id, "prompt": p.prompt, "constraints": constraints_json(p)} for p in prompts]


# --- weights and errors -------------------------------------------------------------------------------------------

def test_weight_repeats_a_row_and_bad_rows_fail_clearly():
    rows = weighted_rows([{"prompt": "p", "chosen": "a", "rejected": "b", "weight": 3},
                          {"prompt": "q", "chosen": "c", "rejected": "d"}])
    assert [r["prompt"][0]["content"] for r in rows] == ["p", "p", "p", "q"]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    for bad in ({"weight": 0}, {"weight": 1.5}, {"weight": True}):
        with pytest.raises(RewardModelError, match="weight must be an integer"):
            weighted_rows([{"prompt": "p", "chosen": "a", "rejected": "b", **bad}])
    with pytest.raises(RewardModelError, match="'rejected' must be a string"):
        weighted_rows([{"prompt": "p", "chosen": "a"}])


def test_no_pairs_is_a_one_line_error(tiny_model_dir, tmp_path):
    with pytest.raises(RewardModelError, match="no preference pairs") as error:
        train_reward_model(tiny_model_dir, [], tmp_path / "rm", RM_CONFIG)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "rm").exists()


# --- the reward model ---------------------------------------------------------------------------------------------

def test_reward_model_trains_and_saves_a_checksummed_folder(reward_model, tiny_model_dir):
    from safetensors.torch import load_file

    from flywheel.models import verify_model

    assert reward_model.rows == len(PAIRS)
    assert reward_model.rows_used == len(PAIRS) + 1  # the weight-2 pair counts twice
    assert reward_model.steps == 4
    assert math.isfinite(reward_model.train_loss)
    assert reward_model.accuracy > 0.5  # it learned the lowercase/UPPERCASE preference
    folder = Path(reward_model.path)
    assert verify_model(folder).sha256 == reward_model.sha256
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    base, trained = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert "score.weight" in trained
    shared = [name for name in base if name in trained]
    assert shared
    assert sum(not base[name].equal(trained[name]) for name in shared) > 0  # the body moved, not only the new head


def test_lora_reward_model_is_merged_into_a_plain_folder(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from flywheel.config import LoraConfig

    config = RM_CONFIG.model_copy(update={"learning_rate": 1e-2, "lora": LoraConfig(enabled=True, r=4, alpha=8)})
    info = train_reward_model(tiny_model_dir, PAIRS, tmp_path / "rm", config, seed=0)
    saved = load_file(str(Path(info.path) / "model.safetensors"))
    assert "score.weight" in saved and not [name for name in saved if "lora" in name]
    assert info.accuracy > 0.5
    judge = RewardModelJudge(Path(info.path))
    assert len(judge.judge([(Prompt(id="p", prompt="hi", constraints=LOWER_NO_COMMAS), "hello")])) == 1
    judge.close()


def test_judge_scores_in_range_and_honours_the_threshold(reward_model):
    prompt = Prompt(id="p", prompt="write about the tea", constraints=LOWER_NO_COMMAS)
    items = [(prompt, "the tea is calm and nice"), (prompt, "THE TEA IS CALM AND NICE"), (prompt, "")]
    judge = RewardModelJudge(Path(reward_model.path))
    assert (judge.name, judge.source) == ("reward_model", reward_model.path)
    rewards = judge.rewards([[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": r}]
                             for p, r in items])
    assert rewards[0] > rewards[1]  # the learned preference, on a training prompt
    verdicts = judge.judge(items)
    assert [v.judge for v in verdicts] == ["reward_model"] * 3
    for verdict, reward in zip(verdicts, rewards):
        assert 0.0 < verdict.score < 1.0
        assert verdict.score == pytest.approx(1 / (1 + math.exp(-reward)), abs=1e-6)
        assert f"{reward:.3f}" in verdict.critique
    judge.close()
    middle = (rewards[0] + rewards[1]) / 2
    strict = RewardModelJudge(Path(reward_model.path), threshold=middle, batch_size=2)
    assert [v.passed for v in strict.judge(items)] == [r > middle for r in rewards]
    assert [v.passed for v in strict.judge(items[:2])] == [True, False]
    strict.close()
    with pytest.raises(RewardModelError, match="closed"):
        strict.judge(items)


def test_judge_fails_clearly_on_a_missing_or_wrong_folder(tmp_path, tiny_model_dir):
    with pytest.raises(RewardModelError, match="model folder not found") as error:
        RewardModelJudge(tmp_path / "nowhere")
    assert "\n" not in str(error.value)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(RewardModelError, match="no config.json"):
        RewardModelJudge(tmp_path / "broken")
    with pytest.raises(RewardModelError, match="not a reward model"):  # a policy folder: no one-output head
        RewardModelJudge(tiny_model_dir)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for source in tiny_model_dir.iterdir():
        (truncated / source.name).write_bytes(source.read_bytes()[:100] if source.suffix == ".safetensors"
                                              else source.read_bytes())
    with pytest.raises(RewardModelError, match="reward model .*truncated") as error:
        RewardModelJudge(truncated)
    assert "\n" not in str(error.value)


# --- GRPO reward functions ----------------------------------------------------------------------------------------

def test_verifier_reward_scores_plain_and_conversational_completions():
    reward = verifier_reward(strict=True)
    column = constraints_json(Prompt(id="p", prompt="say it", constraints=LOWER_NO_COMMAS))
    plain = ["all good here", "Hello, World", "Hello world"]
    expected = [1.0, 0.0, 0.5]
    assert reward(prompts=["say it"] * 3, completions=plain, constraints=[column] * 3) == expected
    chat = [[{"role": "assistant", "content": text}] for text in plain]
    prompts = [[{"role": "user", "content": "say it"}]] * 3
    assert reward(prompts=prompts, completions=chat, constraints=[column] * 3, trainer_state=None) == expected
    # loose mode accepts markdown-stripped variants
    bold = constraints_json(Prompt(id="q", prompt="x", constraints=[Constraint(type="start_with_phrase",
                                                                                args={"phrase": "yes"})]))
    assert verifier_reward(strict=True)(prompts=["x"], completions=["**yes** sir"], constraints=[bold]) == [0.0]
    assert verifier_reward(strict=False)(prompts=["x"], completions=["**yes** sir"], constraints=[bold]) == [1.0]


def test_reward_model_reward_scores_the_prompt_and_completion(reward_model):
    judge = RewardModelJudge(Path(reward_model.path))
    reward = reward_model_reward(judge)
    prompts = [[{"role": "user", "content": "write about the sun"}]] * 2
    completions = [[{"role": "assistant", "content": "the sun is calm"}],
                   [{"role": "assistant", "content": "THE SUN IS CALM"}]]
    got = reward(prompts=prompts, completions=completions, constraints=["[]", "[]"])
    assert got == pytest.approx(judge.rewards([p + c for p, c in zip(prompts, completions)]))
    assert reward(prompts=["write about the sun"], completions=["the sun is calm"]) == pytest.approx(got[:1])
    judge.close()


# --- GRPO ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_device,accumulation,generations,prompts,expected", [
    (2, 1, 2, 2, (2, 2)),   # TRL's default already holds whole groups
    (3, 1, 4, 10, (3, 12)),  # raised to lcm(3, 4)
    (4, 2, 4, 1, (4, 4)),   # 2 prompts per generation batch but 1 prompt: fall back to lcm(4, 4)
    (3, 1, 4, 2, (2, 4)),   # lcm(3, 4) needs 3 prompts of 2: the per-device batch drops to 2
])
def test_generation_batch_is_valid_for_grpo(per_device, accumulation, generations, prompts, expected):
    from trl import GRPOConfig

    got = generation_batch(per_device, accumulation, generations, prompts)
    assert got == expected
    batch, generation = got
    assert generation % generations == 0 and generation % batch == 0 and generation // generations <= prompts
    GRPOConfig(output_dir="unused", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
               num_generations=generations, generation_batch_size=generation, use_cpu=True, report_to="none")


def test_grpo_trains_with_the_verifier_reward(tiny_model_dir, tmp_path):
    import torch
    from transformers import TrainerCallback

    from flywheel.models import load_model, load_tokenizer

    class Logs(TrainerCallback):
        def __init__(self):
            self.seen: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs or {}))

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = _grpo_rows(["write a short note about the weather", "explain how bread is made"])
    logs = Logs()
    trainer = make_grpo_trainer(model, tokenizer, rows, GRPO_COMMON, None, [logs], str(tmp_path),
                                options=GrpoConfig(num_generations=2), max_completion_length=8, temperature=1.0)
    assert len(trainer.train_dataset) == 2
    assert not hasattr(trainer.args, "max_length")  # no GRPOConfig field: used as the prompt-length filter instead
    result = trainer.train()
    assert result.global_step == 2
    rewards = [log["rewards/verifier/mean"] for log in logs.seen if "rewards/verifier/mean" in log]
    assert rewards and all(0.0 <= r <= 1.0 for r in rewards)
    # Answers within a group scored differently: the update below comes from the reward, not weight decay alone.
    assert any(log.get("reward_std", 0.0) > 0 for log in logs.seen)
    after = dict(trainer.model.named_parameters())
    assert sum(not torch.equal(p, after[name].detach()) for name, p in before.items()) > 0


def test_grpo_drops_long_prompts_and_uses_the_reward_model(tiny_model_dir, tmp_path, reward_model):
    from flywheel.models import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    rows = _grpo_rows(["write a short note", "explain bread " + "and more words " * 40])
    common = {**GRPO_COMMON, "max_length": 40}
    trainer = make_grpo_trainer(model, tokenizer, rows, common, None, [], str(tmp_path),
                                options=GrpoConfig(rewards=["verifier", "reward_model"], num_generations=2),
                                max_completion_length=8, temperature=1.0, reward_model_dir=Path(reward_model.path))
    assert len(trainer.train_dataset) == 1 and trainer.train_dataset[0]["prompt_id"] == "p0"
    assert trainer.reward_func_names == ["verifier", "reward_model"]
    prompts = [[{"role": "user", "content": "write a short note"}]] * 2
    completions = [[{"role": "assistant", "content": t}] for t in ("a note", "A NOTE")]
    scores = trainer.reward_funcs[1](prompts=prompts, completions=completions, constraints=[rows[0]["constraints"]] * 2)
    assert len(scores) == 2 and scores[0] != scores[1]


def test_grpo_setup_errors_are_one_line(tiny_model_dir, tmp_path):
    from flywheel.models import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    rows = _grpo_rows(["write a short note"])
    kwargs = dict(max_completion_length=8, temperature=1.0)
    with pytest.raises(GrpoError, match="needs a trained reward model"):
        make_grpo_trainer(model, tokenizer, rows, GRPO_COMMON, None, [], str(tmp_path),
                          options=GrpoConfig(rewards=["reward_model"]), **kwargs)
    with pytest.raises(GrpoError, match="longer than"):
        make_grpo_trainer(model, tokenizer, rows, {**GRPO_COMMON, "max_length": 12}, None, [], str(tmp_path),
                          options=GrpoConfig(), **kwargs)
    with pytest.raises(GrpoError, match="leaves no room"):
        make_grpo_trainer(model, tokenizer, rows, {**GRPO_COMMON, "max_length": 8}, None, [], str(tmp_path),
                          options=GrpoConfig(), **kwargs)
