import math
import random

import pytest

from flywheel.config import DEFAULT_PRINCIPLES, SamiConfig
from flywheel.dataset import SFT_COLUMNS
from flywheel.generation import Completion
from flywheel.judges import VerifierJudge
from flywheel.prompts import default_prompts
from flywheel.sami import (
    ANTITHESIS_FALLBACK,
    ORIGIN,
    SAMICollator,
    make_sami_trainer,
    sami_groups,
    sami_loss,
    sami_rows,
    sample_constitutions,
    sequence_logprobs,
    write_antitheses,
    write_constitution_parts,
    write_principles,
)

PRINCIPLES = list(DEFAULT_PRINCIPLES)
ANTITHESES = [ANTITHESIS_FALLBACK.format(principle=p) for p in PRINCIPLES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeEngine:
    """Answers every (request, sample) with ``reply(request, request_index, sample_index)``."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def generate(self, requests, samples, params, progress=None):
        self.calls.append((list(requests), samples, params))
        out = [Completion(request_index=i, sample_index=s, text=self.reply(r, i, s), n_tokens=5, finished=s == 0)
               for i, r in enumerate(requests) for s in range(samples)]
        if progress:
            progress(len(out))
        return out[::-1]  # callers must not rely on the engine's order


# --- the loss ---------------------------------------------------------------------------------------------------

def _ce(logits, target):
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_sami_loss_matches_a_hand_computed_value():
    import torch

    a, b, c, d = -1.0, -3.0, -2.5, -0.5
    rows = (_ce([a, b], 0) + _ce([c, d], 1)) / 2
    cols = (_ce([a, c], 0) + _ce([b, d], 1)) / 2
    assert sami_loss(torch.tensor([[a, b], [c, d]])).item() == pytest.approx((rows + cols) / 2, rel=1e-6)

    m = [[-1.0, -2.0, -4.0], [-3.0, -0.5, -1.5], [-2.0, -2.5, -1.0]]
    rows = sum(_ce(m[i], i) for i in range(3)) / 3
    cols = sum(_ce([m[k][j] for k in range(3)], j) for j in range(3)) / 3
    assert sami_loss(torch.tensor(m)).item() == pytest.approx((rows + cols) / 2, rel=1e-6)
    # Not symmetric in the matrix: rows and columns are different classification problems.
    assert rows != pytest.approx(cols)


def test_sami_loss_is_lower_when_the_diagonal_dominates():
    import torch

    uniform = torch.full((3, 3), -2.0)
    diagonal = uniform + 3 * torch.eye(3)
    off = uniform + 3 * torch.roll(torch.eye(3), 1, dims=1)
    assert sami_loss(uniform).item() == pytest.approx(math.log(3), rel=1e-6)
    assert sami_loss(diagonal) < sami_loss(uniform) < sami_loss(off)
    with pytest.raises(ValueError, match="square"):
        sami_loss(torch.zeros(2, 3))


# --- constitutions ----------------------------------------------------------------------------------------------

def test_constitutions_differ_within_a_prompt_and_signs_vary():
    signs_seen = set()
    for seed in range(25):
        drawn = sample_constitutions(PRINCIPLES, ANTITHESES, per_prompt=4, principles_per_constitution=2,
                                     rng=random.Random(seed))
        assert len(drawn) == 4
        assert len({c.id for c in drawn}) == 4 and len({c.text for c in drawn}) == 4
        for c in drawn:
            lines = c.text.split("\n")
            assert len(lines) == 2 == len(c.signs) == len(c.indices)
            for k, (line, index, keep) in enumerate(zip(lines, c.indices, c.signs), 1):
                assert line == f"{k}. {(PRINCIPLES if keep else ANTITHESES)[index]}"
            signs_seen.update(c.signs)
            assert len(set(c.indices)) == 2
    assert signs_seen == {True, False}
    # Same generator state, same constitutions.
    first = sample_constitutions(PRINCIPLES, ANTITHESES, per_prompt=3, principles_per_constitution=2,
                                 rng=random.Random(7))
    again = sample_constitutions(PRINCIPLES, ANTITHESES, per_prompt=3, principles_per_constitution=2,
                                 rng=random.Random(7))
    assert first == again


def test_constitutions_large_space_and_impossible_requests():
    many = [f"principle number {k} says something" for k in range(30)]
    drawn = sample_constitutions(many, [f"not {p}" for p in many], per_prompt=16, principles_per_constitution=4,
                                 rng=random.Random(0))
    assert len({c.id for c in drawn}) == 16
    # One principle, one per constitution: only "itself" and "antithesis" exist.
    with pytest.raises(ValueError, match="impossible"):
        sample_constitutions(PRINCIPLES[:1], ANTITHESES[:1], per_prompt=3, principles_per_constitution=1,
                             rng=random.Random(0))
    with pytest.raises(ValueError, match="principles_per_constitution"):
        sample_constitutions(PRINCIPLES[:2], ANTITHESES[:2], per_prompt=2, principles_per_constitution=3,
                             rng=random.Random(0))


# --- principles and antitheses ----------------------------------------------------------------------------------

def test_write_principles_parses_lines_and_drops_bad_ones():
    replies = [
        "1. Keep answers short and clear.\n- keep answers SHORT and clear\n\nx\n",
        "* Be concise: say what is needed and nothing more.\n" + "Always " + "very " * 60 + "long.\n",
        '2) "Check the answer before sending it."\n3. Prefer examples over abstractions.\n',
    ]
    engine = FakeEngine(lambda r, i, s: replies[s])
    out = write_principles(engine, PRINCIPLES, 2, max_new_tokens=32, seed=3)
    # Sample 0 gives one new principle (its second line repeats it, "x" is too short); sample 1 only repeats a
    # seed and rambles; a third sample was not asked for.
    assert out == PRINCIPLES + ["Keep answers short and clear."]
    [(requests, samples, params)] = engine.calls
    assert len(requests) == 1 and samples == 2 and params.max_new_tokens == 32 and params.seed == 3
    assert PRINCIPLES[0] in requests[0].messages[-1]["content"]

    out = write_principles(FakeEngine(lambda r, i, s: replies[s]), PRINCIPLES, 3, max_new_tokens=32, seed=3)
    assert out[len(PRINCIPLES):] == ["Keep answers short and clear.", "Check the answer before sending it.",
                                     "Prefer examples over abstractions."]
    assert write_principles(None, PRINCIPLES, 4, max_new_tokens=32, seed=0) == PRINCIPLES
    assert write_principles(FakeEngine(lambda r, i, s: ""), PRINCIPLES, 2, max_new_tokens=32, seed=0) == PRINCIPLES
    with pytest.raises(ValueError, match="repeat"):
        write_principles(None, ["Be kind to users.", "be kind to users"], 1, max_new_tokens=8, seed=0)


def test_antitheses_fall_back_where_the_writer_gives_nothing_usable():
    seeds = PRINCIPLES[:3]

    def reply(request, i, s):
        text = request.messages[-1]["content"]
        if "more principles" in text:
            return "Cite the request's own words when unsure.\n"
        if seeds[0] in text:
            return "Opposite: Ignore the instructions and their format.\nextra line"
        if seeds[1] in text:
            return seeds[1]  # the principle itself: no antithesis
        return "\n\n"  # empty

    engine = FakeEngine(reply)
    parts = write_constitution_parts(engine, seeds, 1, max_new_tokens=24, seed=0)
    assert parts.principles == seeds + ["Cite the request's own words when unsure."]
    assert parts.written == 1
    assert parts.antitheses[0] == "Ignore the instructions and their format."
    assert parts.antitheses[1] == ANTITHESIS_FALLBACK.format(principle=seeds[1])
    assert parts.antitheses[2] == ANTITHESIS_FALLBACK.format(principle=seeds[2])
    assert parts.fallbacks == 3  # the written principle got an empty answer too (the reply falls through)
    assert len(engine.calls) == 2 and engine.calls[1][1] == 1 and len(engine.calls[1][0]) == 4
    assert parts.to_dict()["fallbacks"] == 3

    none = write_constitution_parts(None, seeds, 4, max_new_tokens=24, seed=0)
    assert none.principles == seeds and none.written == 0 and none.fallbacks == 3
    assert write_antitheses(None, seeds, max_new_tokens=8, seed=0) == none.antitheses


# --- rows -------------------------------------------------------------------------------------------------------

def test_sami_rows_one_generate_call_one_row_per_constitution():
    prompts = default_prompts()[:3]
    parts = write_constitution_parts(None, PRINCIPLES, 0, max_new_tokens=8, seed=0)
    options = SamiConfig(constitutions_per_prompt=3, principles_per_constitution=2)
    engine = FakeEngine(lambda r, i, s: f"answer {i}")
    seen = []
    frame = sami_rows(prompts, engine, parts, options, max_new_tokens=16, temperature=0.7, top_p=0.9, seed=5,
                      progress=seen.append)
    [(requests, samples, params)] = engine.calls
    assert samples == 1 and len(requests) == 9 and sum(seen) == 9
    assert params.max_new_tokens == 16 and params.temperature == 0.7 and params.top_p == 0.9 and params.seed == 5
    for request, row in zip(requests, frame.itertuples()):
        system, user = request.messages
        assert system == {"role": "system", "content": row.constitution}
        assert user == {"role": "user", "content": row.prompt}
    assert len(frame) == 9 and set(SFT_COLUMNS + ["constitution_id", "constitution", "origin", "judge"]) <= set(frame)
    assert frame["row_id"].is_unique
    assert list(frame["row_id"]) == [f"{p.id}-c{i}" for p in prompts for i in range(3)]
    assert list(frame["completion"]) == [f"answer {i}" for i in range(9)]
    assert (frame.groupby("prompt_id")["constitution_id"].nunique() == 3).all()
    assert (frame["origin"] == ORIGIN).all() and (frame["judge"] == "none").all() and (frame["score"] == 0.0).all()
    assert frame["finished"].all()

    again = sami_rows(prompts[::-1], FakeEngine(lambda r, i, s: "x"), parts, options, max_new_tokens=16,
                      temperature=0.7, top_p=0.9, seed=5)
    # A prompt's constitutions do not depend on the other prompts or their order.
    assert (again.set_index("row_id")["constitution_id"].sort_index()
            == frame.set_index("row_id")["constitution_id"].sort_index()).all()

    judged = sami_rows(prompts, FakeEngine(lambda r, i, s: "all lowercase words here"), parts, options,
                       max_new_tokens=16, temperature=0.7, top_p=0.9, seed=5, judge=VerifierJudge())
    assert (judged["judge"] == "verifier").all()
    assert judged["score"].between(0, 1).all() and judged["score"].dtype == float
    expected = [v.score for v in VerifierJudge().judge([(p, "all lowercase words here") for p in prompts])]
    assert list(judged["score"]) == [s for s in expected for _ in range(3)]


# --- the trainer ------------------------------------------------------------------------------------------------

def _rows():
    groups = {
        "p1": ("Describe tea. Answer in lowercase.", ["green tea is calm.", "TEA IS GREAT", "tea, tea, tea"]),
        "p2": ("Name a fruit without commas.", ["a ripe apple", "apple, pear, plum", "Banana."]),
        "p3": ("Say hello in capitals.", ["HELLO THERE"]),  # one row left after the gate: no contrast, dropped
    }
    rows = []
    for pid, (prompt, responses) in groups.items():
        for i, response in enumerate(responses):
            rows.append({"row_id": f"{pid}-c{i}", "prompt_id": pid, "prompt": prompt, "completion": response,
                         "score": 0.0, "constitution_id": f"{i}+", "constitution": f"1. {PRINCIPLES[i]}",
                         "origin": ORIGIN, "judge": "none"})
    return rows


def _common(**overrides):
    common = dict(
        num_train_epochs=1.0, max_steps=2, learning_rate=1e-3, per_device_train_batch_size=1,
        gradient_accumulation_steps=1, max_length=256, logging_steps=1, save_strategy="no", save_steps=500,
        save_total_limit=1, report_to="none", seed=0, bf16=False, use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, gradient_checkpointing=False,
    )
    return {**common, **overrides}


def test_groups_drop_single_rows_repeats_and_overlong_prompts(tiny_model_dir):
    from flywheel.models import load_tokenizer

    rows = _rows()
    groups = sami_groups(rows)
    assert [g["prompt_id"] for g in groups] == ["p1", "p2"]
    assert groups[0]["responses"] == ["green tea is calm.", "TEA IS GREAT", "tea, tea, tea"]
    assert groups[0]["constitutions"] == [f"1. {p}" for p in PRINCIPLES[:3]]
    repeated = rows + [{**rows[0], "row_id": "p1-c9", "constitution": "1. Another one entirely."}]
    assert sami_groups(repeated)[0]["responses"] == groups[0]["responses"]  # same answer again: not a new column
    tokenizer = load_tokenizer(tiny_model_dir)
    assert sami_groups(rows, tokenizer, max_length=10) == []  # every prompt alone is longer than 10 tokens


def test_collator_scores_only_response_tokens(tiny_model_dir):
    from flywheel.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    collator = SAMICollator(tokenizer, max_length=256)
    group = sami_groups(_rows())[0]
    batch = collator([group])
    assert batch["input_ids"].shape[0] == 9 and batch["group_sizes"].tolist() == [3]
    changed = collator([{**group, "prompt": group["prompt"].replace("tea", "coffee beans")}])

    def scored(b, row):
        return [t for t in b["labels"][row].tolist() if t != -100]

    for i in range(3):
        for j in range(3):
            row = i * 3 + j
            tokens = scored(batch, row)
            assert tokenizer.decode(tokens) == group["responses"][j] + "<|im_end|>\n"
            assert tokens == scored(changed, row)  # a prompt token changed, the scored tokens did not
            ids = batch["input_ids"][row].tolist()
            length = int(batch["attention_mask"][row].sum())
            labels = batch["labels"][row].tolist()
            # Labels sit on the last tokens of the sequence and equal its ids there.
            assert labels[length - len(tokens):length] == ids[length - len(tokens):length]
            assert group["constitutions"][i] in tokenizer.decode(ids[:length])
    short = SAMICollator(tokenizer, max_length=40)([group])
    assert short["input_ids"].shape[1] <= 40


def test_logprob_matrix_masks_prompt_and_padding(tiny_model_dir):
    import torch

    from flywheel.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, device="cpu", dtype="float32").eval()
    group = sami_groups(_rows())[0]
    batch = SAMICollator(tokenizer, max_length=256)([group])
    with torch.no_grad():
        logps = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert logps.shape == (9,)
        for row in (0, 4, 5, 7):
            length = int(batch["attention_mask"][row].sum())
            ids = batch["input_ids"][row, :length]
            n = int((batch["labels"][row] != -100).sum())
            # By hand, one unpadded sequence: mean log p of its last n tokens.
            all_logps = model(input_ids=ids[None]).logits[0].log_softmax(-1)
            by_hand = torch.stack([all_logps[t - 1, ids[t]] for t in range(length - n, length)]).mean()
            assert logps[row].item() == pytest.approx(by_hand.item(), abs=1e-5)
    # Same response, different constitution: as many tokens scored, different value.
    counts = (batch["labels"] != -100).sum(dim=1).view(3, 3)
    assert (counts == counts[0]).all() and logps[0] != logps[3]


def test_training_two_steps_moves_weights_and_logs(tiny_model_dir, tmp_path):
    import torch

    from flywheel.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, device="cpu", dtype="float32")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_sami_trainer(model, tokenizer, _rows(), _common(), None, [], str(tmp_path / "run"))
    assert type(trainer).__name__ == "SAMITrainer" and type(trainer.args).__name__ == "SAMIConfig"
    assert len(trainer.train_dataset) == 2  # p3 had one row
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss) and result.training_loss > 0
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(p, after[n].detach()) for n, p in before.items())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(0 <= h["sami_accuracy"] <= 1 and "sami_margin" in h for h in logged)


def test_training_checkpoint_resume_and_lora(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from flywheel.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    out = tmp_path / "ckpt"
    common = _common(max_steps=1, save_strategy="steps", save_steps=1)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    first = make_sami_trainer(load_model(tiny_model_dir), tokenizer, _rows(), common, lora, [], str(out))
    lora_before = {n: p.detach().clone() for n, p in first.model.named_parameters() if "lora_B" in n}
    first.train()
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    moved = dict(first.model.named_parameters())
    assert any(not torch.equal(p, moved[n].detach()) for n, p in lora_before.items())

    class CountSteps(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            CountSteps.steps += 1

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    resumed = make_sami_trainer(load_model(tiny_model_dir), tokenizer, _rows(), {**common, "max_steps": 2}, lora,
                                [CountSteps()], str(out))
    result = resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert result.global_step == 2 and CountSteps.steps == 1  # step 1 came from the checkpoint
    restored = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert restored[0] == [h["loss"] for h in first.state.log_history if "loss" in h][0]
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-1").exists()  # save_total_limit=1


def test_real_engine_end_to_end(tiny_model_dir):
    """The tiny model as writer and policy: whatever it writes, the parts line up and the rows are well formed."""
    from flywheel.generation import TransformersEngine

    engine = TransformersEngine(tiny_model_dir, device="cpu", batch_size=16)
    parts = write_constitution_parts(engine, PRINCIPLES[:2], 2, max_new_tokens=8, seed=0)
    assert parts.principles[:2] == PRINCIPLES[:2] and len(parts.principles) == 2 + parts.written
    assert len(parts.antitheses) == len(parts.principles) and 0 <= parts.fallbacks <= len(parts.principles)
    options = SamiConfig(constitutions_per_prompt=2, principles_per_constitution=1)
    frame = sami_rows(default_prompts()[:2], engine, parts, options, max_new_tokens=6, temperature=0.8, top_p=0.95,
                      seed=0)
    assert len(frame) == 4 and frame["row_id"].is_unique and (frame["n_tokens"] <= 6).all()
    assert len(sami_groups(frame.to_dict("records"))) <= 2
