import json

from flywheel import operations
from flywheel.config import FlywheelConfig
from flywheel.feedback import judge_with_verifiers
from flywheel.generation import Completion
from flywheel.prompts import load_prompts
from flywheel.verifiers import echoed_instruction
from flywheel.workspace import Workspace


def _folder(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def test_evaluate_version_counts_held_out_answers_that_copy_their_instructions_or_loop(tmp_path, monkeypatch):
    config = FlywheelConfig.model_validate({"prompts": {"builtin_count": 64, "eval_limit": 12}})
    workspace = Workspace.from_config(config, tmp_path)
    folder, other = _folder(tmp_path, "model"), _folder(tmp_path, "other")
    prompts = load_prompts(operations.held_out_prompts(config, workspace))
    # The first four answers are their prompt's first instruction, word for word; the next three loop (a 4-word
    # phrase five times: more than quality.repetition_max_repeats); the rest do neither.
    answers = [p.constraints[0].describe() if i < 4 else "a warm loaf today " * 5 if i < 7
               else "Plain words about the topic." for i, p in enumerate(prompts)]
    expected = sum(echoed_instruction(p.constraints, a) is not None for p, a in zip(prompts, answers))
    assert expected > 0

    def score(config, workspace, model, prompts, progress):
        texts = answers if model.path == str(folder) else ["Plain words about the topic."] * len(answers)
        completions = [Completion(request_index=i, sample_index=0, text=text, n_tokens=len(text.split()),
                                  finished=True) for i, text in enumerate(texts)]
        return judge_with_verifiers(prompts, completions)

    monkeypatch.setattr(operations, "_score", score)
    monkeypatch.setattr("flywheel.probe.perplexity", lambda path, device: 10.0)
    result = operations.evaluate_version(config, workspace, str(folder))
    assert (result.echoed_answers, result.repetitive_answers) == (expected, 3)
    assert result.scores.prompts == len(prompts)
    # Compared with another model, the counts are still this model's.
    against = operations.evaluate_version(config, workspace, str(folder), against=str(other))
    assert (against.echoed_answers, against.repetitive_answers) == (expected, 3)
    assert against.win_rate is not None and against.against == str(other)
