import json

from flywheel import operations
from flywheel.config import FlywheelConfig
from flywheel.feedback import judge_with_verifiers
from flywheel.generation import Completion
from flywheel.prompts import load_prompts
from flywheel.verifiers import echoed_instruction
from flywheel.workspace import Workspace


def test_evaluate_version_counts_held_out_answers_that_copy_their_instructions(tmp_path, monkeypatch):
    config = FlywheelConfig.model_validate({"prompts": {"builtin_count": 64, "eval_limit": 12}})
    workspace = Workspace.from_config(config, tmp_path)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    prompts = load_prompts(operations.held_out_prompts(config, workspace))
    # The first four answers are their prompt's first instruction, word for word; the rest do not copy.
    answers = [p.constraints[0].describe() if i < 4 else "Plain words about the topic." for i, p in enumerate(prompts)]
    expected = sum(echoed_instruction(p.constraints, a) is not None for p, a in zip(prompts, answers))
    assert expected > 0

    def score(config, workspace, model, prompts_path, progress):
        completions = [Completion(request_index=i, sample_index=0, text=text, n_tokens=len(text.split()),
                                  finished=True) for i, text in enumerate(answers)]
        return judge_with_verifiers(load_prompts(prompts_path), completions)

    monkeypatch.setattr(operations, "_score", score)
    monkeypatch.setattr("flywheel.probe.perplexity", lambda path, device: 10.0)
    result = operations.evaluate_version(config, workspace, str(folder))
    assert result.echoed_answers == expected and result.scores.prompts == len(prompts)
