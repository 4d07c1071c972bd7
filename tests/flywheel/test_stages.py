from pathlib import Path
from types import SimpleNamespace

import pytest

from flywheel.config import FlywheelConfig, parse_config
from flywheel.stages import next_round_number
from flywheel.workspace import Workspace


@pytest.mark.parametrize("prefix", ["round-", "r", "nightly_"])
def test_next_round_number_counts_finished_records(tmp_path: Path, prefix: str):
    config = parse_config({"storage": {"tag_prefix": prefix}})
    workspace = Workspace.from_config(config, tmp_path)
    workspace.records.mkdir(parents=True)
    assert next_round_number(workspace) == 1
    for number in (1, 2, 7):
        (workspace.records / f"{workspace.round_name(number)}.json").write_text("{}")
    (workspace.records / "notes.json").write_text("{}")  # not a round record
    assert next_round_number(workspace) == 8


def test_workspace_paths_follow_config(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = Workspace.from_config(FlywheelConfig(), tmp_path)
    assert workspace.state == tmp_path.resolve() / ".flywheel"
    assert workspace.tracking_uri == f"sqlite:///{workspace.state / 'mlflow.db'}"
    assert workspace.round_data(3) == tmp_path.resolve() / "data" / "rounds" / "round-0003"


# --- a stage killed half-way through a registry change is finished by its re-run, never doubled -----------------

@pytest.fixture
def registry_workspace(tmp_path: Path, monkeypatch, tiny_model_dir):
    from helpers import tiny_recipe

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = parse_config(tiny_recipe(tiny_model_dir))
    return config, Workspace.from_config(config, tmp_path)


def _register(config, workspace, round_number: int, aliases=()):
    from flywheel import registry
    from flywheel.models import model_sha256

    model = Path(config.model.base)
    uri, name = workspace.tracking_uri, config.model.registered_name
    experiment = registry.experiment_id(uri, f"flywheel/{name}", workspace.mlflow_artifacts)
    run = registry.client(uri).create_run(experiment, tags={"flywheel.round": str(round_number)})
    tags = {"flywheel.round": str(round_number), "flywheel.model_sha256": model_sha256(model)}
    return registry.register_model_dir(uri, name, model, run.info.run_id, tags=tags, description="d",
                                       aliases=aliases), run.info.run_id


def test_resolve_champion_finishes_a_first_registration_killed_before_its_alias(registry_workspace):
    from flywheel import registry
    from flywheel.stages import resolve_champion

    config, workspace = registry_workspace
    _register(config, workspace, 0)  # version 1 exists, `champion` was never set
    champion = resolve_champion(config, workspace)
    assert champion.version == "1"
    assert [v.version for v in registry.list_versions(workspace.tracking_uri, config.model.registered_name)] == ["1"]
    assert registry.get_version(workspace.tracking_uri, config.model.registered_name, "champion").version == "1"


def test_register_candidate_finishes_a_registration_killed_before_its_alias(registry_workspace):
    from flywheel import registry
    from flywheel.stages import register_candidate

    config, workspace = registry_workspace
    _register(config, workspace, 0, aliases=("champion",))
    version, run_id = _register(config, workspace, 1)
    context = type("Context", (), {"number": 1, "run_id": run_id})()
    # An earlier attempt created the version; the re-run reuses it (the other inputs go unused on that path).
    registration = register_candidate(config, workspace, context, None, None, None, None, None)
    assert registration.version == version.version == "2" and "candidate" in registration.aliases
    assert len(registry.list_versions(workspace.tracking_uri, config.model.registered_name)) == 2


def test_decide_promotion_reports_a_promotion_made_before_a_kill(registry_workspace):
    from flywheel import registry
    from flywheel.stages import Registration, decide_promotion

    config, workspace = registry_workspace
    _register(config, workspace, 0, aliases=("champion",))
    _register(config, workspace, 1, aliases=("candidate",))
    registry.set_champion(workspace.tracking_uri, config.model.registered_name, "2", reason="gain 0.1",
                          actor="policy:auto")
    registration = Registration(version="2", aliases=["candidate", "champion"], run_id="r")
    promotion = decide_promotion(config, workspace, registration, None, None)
    assert (promotion.promoted, promotion.version, promotion.previous, promotion.reason) == (True, "2", "1", "gain 0.1")


def _decide_on(registry_workspace, policy: dict, candidate: tuple[float, float], champion: tuple[float, float],
               **evaluation_fields):
    """The auto policy's verdict on v2 against champion v1, for (prompt, instruction) accuracies."""
    from flywheel.evaluation import Evaluation, ModelScores
    from flywheel.review import ReviewDecision
    from flywheel.stages import Registration, decide_promotion

    config, workspace = registry_workspace
    config = config.model_copy(update={"promotion": config.promotion.model_copy(update={"min_gain": 0.0, **policy})})
    _register(config, workspace, 0, aliases=("champion",))
    _register(config, workspace, 1, aliases=("candidate",))

    def scores(prompt_accuracy, constraint_accuracy):
        return ModelScores(prompts=10, prompt_accuracy=prompt_accuracy, constraint_accuracy=constraint_accuracy,
                           per_type={}, truncated_share=0.0, mean_tokens=5.0)

    evaluation = Evaluation(candidate=scores(*candidate), champion=scores(*champion), win_rate=0.5,
                            accuracy_gain=candidate[0] - champion[0], **evaluation_fields)
    decision = ReviewDecision(approved=True, mode="auto", reviewer="policy")
    return decide_promotion(config, workspace, Registration(version="2", aliases=["candidate"], run_id="r"),
                            evaluation, decision)


@pytest.mark.parametrize(("gain_metric", "promoted"), [("prompt", True), ("instruction", False)])
def test_decide_promotion_applies_the_recipes_gain_metric(registry_workspace, gain_metric, promoted):
    # More prompts fully met, fewer instructions met: the kind of candidate the two metrics disagree on.
    promotion = _decide_on(registry_workspace, {"gain_metric": gain_metric}, (0.4, 0.5), (0.3, 0.55))
    assert promotion.promoted is promoted
    assert f"{gain_metric} accuracy gain" in promotion.reason


@pytest.mark.parametrize(("gain_alpha", "promoted"), [(None, True), (0.05, False)])
def test_decide_promotion_applies_the_recipes_gain_alpha(registry_workspace, gain_alpha, promoted):
    from flywheel.evaluation import PairedGain

    # One more prompt met of ten, the only one that changed: a gain, but one a coin flip gives half the time.
    gain = PairedGain(items=10, lost=0, gained=1, gain=0.1, ci_low=-0.1, ci_high=0.3, up=1, down=0, p_value=0.5)
    promotion = _decide_on(registry_workspace, {"gain_alpha": gain_alpha}, (0.4, 0.4), (0.3, 0.3), prompt_gain=gain)
    assert promotion.promoted is promoted
    assert ("gain not significant" in promotion.reason) is not promoted


def test_open_round_reopens_the_run_of_a_failed_attempt(registry_workspace):
    from flywheel import registry
    from flywheel.stages import Champion, open_round

    config, workspace = registry_workspace
    champion = Champion(version="1", path=config.model.base, sha256="")
    first = open_round(config, workspace, champion, 1)
    registry.client(workspace.tracking_uri).set_terminated(first.run_id, status="FAILED")
    again = open_round(config, workspace, champion, 1)
    assert again.run_id == first.run_id
    assert registry.client(workspace.tracking_uri).get_run(first.run_id).info.status == "RUNNING"
    registry.client(workspace.tracking_uri).set_terminated(first.run_id)
    assert open_round(config, workspace, champion, 1).run_id != first.run_id  # a finished run is never reused


# --- SPaR's trained refiner: its own registered model, trained on the round's refiner rows ---------------------

def _refiner_round(tiny_model_dir, tmp_path, sft_rows: list[dict]):
    """A spar workspace with the policy's base as champion, round 1 opened, its refiner resolved and its clean SFT
    table holding ``sft_rows``."""
    import pandas as pd
    from helpers import tiny_recipe

    from flywheel.dataset import write_parquet
    from flywheel.quality import QualityReport
    from flywheel.stages import QualityResult, RoundData, open_round, resolve_champion, resolve_refiner
    from flywheel.versioning import DatasetVersion

    config = parse_config(tiny_recipe(tiny_model_dir, strategy__name="spar",
                                      strategy__spar={"refiner": "trained", "refiner_max_steps": 2}))
    workspace = Workspace.from_config(config, tmp_path)
    context = open_round(config, workspace, resolve_champion(config, workspace), 1)
    refiner = resolve_refiner(config, workspace, context)
    sft_path = tmp_path / "sft.parquet"
    write_parquet(pd.DataFrame(sft_rows, columns=["row_id", "prompt_id", "prompt", "completion", "score", "origin",
                                                  "judge"]), sft_path)
    clean = RoundData(samples_path="s", pairs_path="p", sft_path=str(sft_path), samples=0, pairs=0,
                      sft=len(sft_rows), strategy="spar", refiner_version=refiner.version)
    report = QualityReport(tables=[], total_rows=0, failed_rows=0, failed_fraction=0.0, max_failed_fraction=0.5,
                           passed=True, gx_run_id="r")
    quality = QualityResult(report=report, quarantine_path="q", clean=clean, quarantined=0)
    dataset = DatasetVersion(tag="round-0001", commit="c0ffee", dvc_md5="md5", remote="local")
    return config, workspace, context, refiner, quality, dataset


def _sft_row(i: int, origin: str) -> dict:
    return {"row_id": f"r{i}", "prompt_id": f"p{i}", "prompt": f"fix answer {i}", "completion": f"fixed answer {i}",
            "score": 1.0, "origin": origin, "judge": "verifier"}


def test_first_refiner_is_the_policy_champion_registered_as_version_1(tmp_path, monkeypatch, tiny_model_dir):
    from flywheel import registry
    from flywheel.stages import resolve_refiner

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, workspace, context, refiner, _, _ = _refiner_round(tiny_model_dir, tmp_path, [])
    uri = workspace.tracking_uri
    first = registry.get_version(uri, "tiny-policy-refiner", "champion")
    policy = registry.get_version(uri, "tiny-policy", "1")
    assert (refiner.version, refiner.sha256) == ("1", context.champion.sha256)
    assert first.source == policy.source  # the policy version's artifacts: stored once
    assert first.tags["flywheel.role"] == "refiner" and first.tags["flywheel.round"] == "0"
    assert registry.client(uri).get_run(context.run_id).data.tags["flywheel.spar.refiner_version"] == "1"
    assert resolve_refiner(config, workspace, context) == refiner  # a re-run registers nothing new
    assert len(registry.list_versions(uri, "tiny-policy-refiner")) == 1
    assert resolve_refiner(config.model_copy(update={"strategy": config.strategy.model_copy(update={
        "spar": config.strategy.spar.model_copy(update={"refiner": "policy"})})}), workspace, context) is None


def test_a_round_without_refiner_rows_keeps_the_refiners_champion(tmp_path, monkeypatch, tiny_model_dir):
    from flywheel import registry
    from flywheel.stages import train_refiner

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, workspace, context, _, quality, dataset = _refiner_round(
        tiny_model_dir, tmp_path, [_sft_row(0, "best_of_n:accepted")])
    update = train_refiner(config, workspace, context, quality, dataset)
    assert (update.used_version, update.version, update.trained) == ("1", "1", None)
    assert "no clean refiner rows" in update.reason
    assert [v.version for v in registry.list_versions(workspace.tracking_uri, "tiny-policy-refiner")] == ["1"]


def test_train_refiner_registers_a_new_champion_with_lineage_once(tmp_path, monkeypatch, tiny_model_dir):
    from safetensors.torch import load_file

    from flywheel import registry
    from flywheel.stages import train_refiner

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = [_sft_row(0, "spar:refinement"), _sft_row(1, "spar:judgement"), _sft_row(2, "best_of_n:accepted")]
    config, workspace, context, refiner, quality, dataset = _refiner_round(tiny_model_dir, tmp_path, rows)
    update = train_refiner(config, workspace, context, quality, dataset)
    assert (update.used_version, update.version) == ("1", "2")
    assert update.trained.rows == 2 and update.trained.method == "sft" and update.trained.steps == 2
    uri = workspace.tracking_uri
    trained = registry.get_version(uri, "tiny-policy-refiner", "champion")
    assert trained.version == "2" and trained.tags["flywheel.promoted_over"] == "1"
    assert {k: trained.tags[f"flywheel.{k}"] for k in ("role", "round", "parent_version", "policy_version",
                                                        "dataset_md5", "git_commit", "config_hash")} == {
        "role": "refiner", "round": "1", "parent_version": "1", "policy_version": "1", "dataset_md5": "md5",
        "git_commit": "c0ffee", "config_hash": context.config_hash}
    assert trained.source.endswith("/refiner")  # next to, never over, the round's policy candidate
    before = load_file(Path(refiner.path) / "model.safetensors")
    after = load_file(registry.materialize(uri, trained, workspace.models) / "model.safetensors")
    assert any(not before[k].equal(after[k]) for k in before)
    assert registry.client(uri).get_run(context.run_id).data.tags["flywheel.spar.refiner_trained_version"] == "2"
    # A re-run (the candidate's training died after this) reuses the version: no second training, no version 3.
    again = train_refiner(config, workspace, context, quality, dataset)
    assert again == update
    assert len(registry.list_versions(uri, "tiny-policy-refiner")) == 2


def test_a_refiner_trained_before_a_kill_is_registered_by_the_rerun_without_training_again(tmp_path, monkeypatch,
                                                                                              tiny_model_dir):
    import flywheel.training
    from flywheel import registry
    from flywheel.stages import train_refiner

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, workspace, context, _, quality, dataset = _refiner_round(
        tiny_model_dir, tmp_path, [_sft_row(0, "spar:refinement"), _sft_row(1, "spar:judgement")])

    def killed(*args, **kwargs):
        raise RuntimeError("killed while registering")

    with monkeypatch.context() as patch:
        patch.setattr(registry, "register_model_dir", killed)
        with pytest.raises(RuntimeError, match="killed"):
            train_refiner(config, workspace, context, quality, dataset)
    assert registry.get_version(workspace.tracking_uri, "tiny-policy-refiner", "champion").version == "1"
    monkeypatch.setattr(flywheel.training, "train", lambda *a, **k: pytest.fail("the refiner was trained again"))
    update = train_refiner(config, workspace, context, quality, dataset)
    assert update.version == "2" and update.trained is not None and update.trained.rows == 2
    assert registry.get_version(workspace.tracking_uri, "tiny-policy-refiner", "champion").version == "2"


# --- the drift budget's reference: the base model the champion descends from -------------------------------------

def _register_child(config, workspace, round_number: int, parent: str | None):
    version, run_id = _register(config, workspace, round_number)
    if parent is not None:
        from flywheel import registry

        registry.client(workspace.tracking_uri).set_model_version_tag(
            config.model.registered_name, version.version, "flywheel.parent_version", parent)
    return version


def test_lineage_base_follows_parents_to_the_first_registered_version(registry_workspace):
    from flywheel import registry
    from flywheel.stages import lineage_base

    config, workspace = registry_workspace
    uri, name = workspace.tracking_uri, config.model.registered_name
    _register(config, workspace, 0)                        # v1: the base
    _register_child(config, workspace, 1, parent="1")      # v2, refused
    _register_child(config, workspace, 2, parent="1")      # v3, promoted
    _register_child(config, workspace, 3, parent="3")      # v4, from v3
    _register_child(config, workspace, 4, parent=None)     # v5: registered by hand, no lineage
    assert lineage_base(uri, name, "4").version == "1"
    assert lineage_base(uri, name, "1").version == "1"
    assert lineage_base(uri, name, "5") is None
    # A version that records its base is answered from that tag, without reading its parents.
    client = registry.client(uri)
    client.set_model_version_tag(name, "4", "flywheel.base_version", "1")
    client.set_model_version_tag(name, "3", "flywheel.parent_version", "5")  # the chain would end at v5
    assert lineage_base(uri, name, "4").version == "1"
    assert lineage_base(uri, name, "3") is None


def test_probe_perplexity_is_measured_once_per_model_probe_and_device(registry_workspace, monkeypatch):
    import flywheel.probe
    from flywheel.stages import probe_perplexity

    _, workspace = registry_workspace
    measured = []

    def fake_perplexity(model_dir, texts=flywheel.probe.PROBE_TEXTS, device="cpu"):
        measured.append((Path(model_dir).name, device))
        return 20.0 + len(measured)

    monkeypatch.setattr(flywheel.probe, "perplexity", fake_perplexity)

    def measure(key, device="cpu"):
        return probe_perplexity(workspace, key, lambda: Path(f"/models/{key}"), device)

    assert (measure("aaa"), measure("aaa"), measure("bbb")) == (21.0, 21.0, 22.0)
    assert measure("aaa", device="cuda") == 23.0
    # Other probe texts make every cached figure stale.
    monkeypatch.setattr(flywheel.probe, "PROBE_TEXTS", ("Another text entirely.",))
    assert (measure("aaa"), measure("aaa")) == (24.0, 24.0)
    assert measured == [("aaa", "cpu"), ("bbb", "cpu"), ("aaa", "cuda"), ("aaa", "cpu")]


def test_base_probe_perplexity_shares_the_champions_figure_and_materializes_the_base_once(registry_workspace,
                                                                                          monkeypatch):
    import flywheel.probe
    from flywheel import registry
    from flywheel.stages import base_probe_perplexity, model_key, probe_perplexity

    config, workspace = registry_workspace
    name = config.model.registered_name
    _register(config, workspace, 0, aliases=("champion",))
    _register_child(config, workspace, 1, parent="1")
    measured = []

    def fake_perplexity(model_dir, texts=flywheel.probe.PROBE_TEXTS, device="cpu"):
        measured.append(Path(model_dir))
        return 20.0 + len(measured)

    monkeypatch.setattr(flywheel.probe, "perplexity", fake_perplexity)
    # The base measured as the champion (by its digest) is the base's figure for every later version.
    base = registry.get_version(workspace.tracking_uri, name, "1")
    assert probe_perplexity(workspace, model_key(name, base), lambda: Path("/champion"), "cpu") == 21.0
    assert base_probe_perplexity(workspace, name, "1", device="cpu") == ("1", 21.0)
    assert base_probe_perplexity(workspace, name, "2", device="cpu") == ("1", 21.0)
    assert measured == [Path("/champion")]
    # Not yet measured (another probe): the base is materialized from the registry and measured, once.
    monkeypatch.setattr(flywheel.probe, "PROBE_TEXTS", ("Another text entirely.",))
    assert base_probe_perplexity(workspace, name, "2", device="cpu") == ("1", 22.0)
    assert base_probe_perplexity(workspace, name, "2", device="cpu") == ("1", 22.0)
    assert len(measured) == 2 and (measured[1] / "config.json").is_file()


def test_decide_promotion_applies_the_recipes_drift_budget(registry_workspace):
    policy = {"max_perplexity_increase": 0.1, "max_perplexity_increase_vs_base": 0.15}
    within = _decide_on(registry_workspace, policy, (0.4, 0.5), (0.3, 0.4), candidate_perplexity=11.0,
                        champion_perplexity=10.5, base_perplexity=10.0, base_version="1")
    assert within.promoted and "+10.0% against the base (v1) <= 15.0%" in within.reason


def test_decide_promotion_refuses_a_candidate_past_the_drift_budget(registry_workspace):
    policy = {"max_perplexity_increase": 0.1, "max_perplexity_increase_vs_base": 0.15}
    past = _decide_on(registry_workspace, policy, (0.4, 0.5), (0.3, 0.4), candidate_perplexity=11.6,
                      champion_perplexity=11.0, base_perplexity=10.0, base_version="1")
    assert not past.promoted and "+16.0% against the base (v1) > 15.0%" in past.reason


# --- held-out answers are cached by the model's digest: a promoted candidate is not evaluated again -------------

@pytest.fixture
def one_prompt_split(tmp_path):
    """A split whose held-out file is one prompt, "p1", with one instruction (no commas)."""
    from flywheel.prompts import Prompt, save_prompts
    from flywheel.stages import PromptSplit
    from flywheel.verifiers import Constraint

    eval_path = tmp_path / "eval.jsonl"
    save_prompts([Prompt(id="p1", prompt="t", constraints=[Constraint(type="no_commas")])], eval_path)
    return PromptSplit(train_path=str(eval_path), eval_path=str(eval_path), train=0, eval=1, round_prompts=0)


def test_a_promoted_candidates_answers_serve_as_its_answers_when_champion(registry_workspace, monkeypatch, tmp_path,
                                                                          one_prompt_split):
    import json

    import pandas as pd

    import flywheel.probe
    from flywheel import stages

    config, workspace = registry_workspace
    split = one_prompt_split
    answered = []

    def greedy(config, model_dir, prompts, progress, state_dir):
        assert [p.id for p in prompts] == ["p1"]
        answered.append(Path(model_dir).name)
        passed = Path(model_dir).name != "a"  # every later model meets the instruction the base missed
        return pd.DataFrame([{"row_id": "p1-s0", "prompt_id": "p1", "prompt": "t", "sample_index": 0, "response": "r",
                              "n_tokens": 3, "finished": True, "score": float(passed), "passed": passed,
                              "checks": json.dumps({"no_commas": passed})}])

    monkeypatch.setattr(stages, "greedy_eval", greedy)
    monkeypatch.setattr(flywheel.probe, "perplexity", lambda model_dir, device="cpu": 10.0 + len(Path(model_dir).name))
    monkeypatch.setattr(stages, "check_evaluation_tables", lambda *args: None)
    monkeypatch.setattr(stages, "base_probe_perplexity", lambda *args, **kwargs: None)
    monkeypatch.setattr(stages, "log_metrics", lambda *args: None)

    def evaluate(champion: str, candidate: str, number: int, recipe=config):
        work = tmp_path / f"round-{number}"
        work.mkdir(exist_ok=True)
        context = stages.RoundContext(
            number=number, name=f"round-{number}", data_dir=str(work), work_dir=str(work), run_id="r", config_hash="h",
            champion=stages.Champion(version=str(number), path=f"/models/{champion}", sha256=champion * 64))
        trained = SimpleNamespace(path=f"/models/{candidate}", sha256=candidate * 64)
        answered.clear()
        return stages.evaluate_candidate(recipe, workspace, context, split, trained), list(answered)

    first, models = evaluate("a", "b", 1)
    assert models == ["a", "b"] and first.candidate.prompt_accuracy == 1.0
    assert (first.candidate_echoes, first.champion_echoes) == (0, 0)  # "r" copies nothing of its instruction
    assert (first.candidate_repetitive, first.champion_repetitive) == (0, 0)  # nor repeats itself
    # b promoted: its answers and probe from round 1 are its answers as champion.
    second, models = evaluate("b", "c", 2)
    assert models == ["c"]
    assert second.champion == first.candidate and second.champion_perplexity == first.candidate_perplexity
    # Other evaluation settings make other answers: measured again.
    longer = config.model_copy(update={"evaluation": config.evaluation.model_copy(update={"max_new_tokens": 7})})
    _, models = evaluate("c", "d", 3, recipe=longer)
    assert models == ["c", "d"]


def test_evaluation_cache_tells_every_model_and_setting_apart(registry_workspace, one_prompt_split):
    from flywheel.stages import evaluation_cache

    config, workspace = registry_workspace
    split = one_prompt_split
    sampled = config.model_copy(update={"generation": config.generation.model_copy(update={"temperature": 0.5})})
    paths = {evaluation_cache(config, workspace, split, "a" * 64, "cpu"),
             evaluation_cache(config, workspace, split, "b" * 64, "cpu"),
             # versions without a digest share a long common prefix
             evaluation_cache(config, workspace, split, "tiny-policy-registered-v3", "cpu"),
             evaluation_cache(config, workspace, split, "tiny-policy-registered-v4", "cpu"),
             evaluation_cache(config, workspace, split, "a" * 64, "cuda"),
             evaluation_cache(sampled, workspace, split, "a" * 64, "cpu")}
    assert len(paths) == 6
    assert evaluation_cache(config, workspace, split, "a" * 64, "cpu") in paths  # and the same again


# --- a bound on a round's training rows ---------------------------------------------------------------------------

def test_bounded_rows_keeps_a_seeded_sample_in_order():
    from flywheel.stages import bounded_rows

    rows = [{"i": i} for i in range(100)]
    assert bounded_rows(rows, None, seed=1) == rows and bounded_rows(rows, 100, seed=1) == rows
    kept = bounded_rows(rows, 80, seed=1)
    assert len(kept) == 80 and kept == sorted(kept, key=lambda r: r["i"])
    assert bounded_rows(rows, 80, seed=1) == kept  # the same on a re-run of the round
    assert bounded_rows(rows, 80, seed=2) != kept  # another round draws another sample


def test_train_candidate_trains_on_at_most_max_rows(registry_workspace, monkeypatch, tmp_path):
    import pandas as pd

    import flywheel.training
    from flywheel import stages

    config, workspace = registry_workspace
    config = config.model_copy(update={"training": config.training.model_copy(update={"max_rows": 5})})
    table = tmp_path / "pairs.parquet"
    prompts = [f"p{i}" for i in range(12)]
    pd.DataFrame({"prompt": prompts, "chosen": ["a"] * 12, "rejected": ["b"] * 12}).to_parquet(table)
    quality = SimpleNamespace(clean=SimpleNamespace(pairs_path=str(table), sft_path=str(table)))
    context = stages.RoundContext(number=3, name="round-3", data_dir=str(tmp_path), work_dir=str(tmp_path),
                                  run_id="r", config_hash="h",
                                  champion=stages.Champion(version="1", path=str(tmp_path), sha256="a"))
    trained_on = []
    monkeypatch.setattr(flywheel.training, "train", lambda base, rows, *args, **kwargs: trained_on.append(rows))
    stages.train_candidate(config, workspace, context, quality, SimpleNamespace(dvc_md5="m"))
    assert len(trained_on[0]) == 5 and {r["prompt"] for r in trained_on[0]} < set(prompts)

    # KL anchors (strategy.repair.plain_anchors) come on top of the bound, every one of them.
    origins = ["repair:accepted"] * 9 + ["repair:anchor"] * 3
    pd.DataFrame({"prompt": prompts, "completion": ["a"] * 12, "origin": origins}).to_parquet(table)
    stages.train_candidate(config, workspace, context, quality, SimpleNamespace(dvc_md5="m"))
    kept = [r["origin"] for r in trained_on[1]]
    assert len(kept) == 8 and kept.count("repair:anchor") == 3


# --- rows of refused rounds from the same champion ---------------------------------------------------------------

def _record(number, parent="1", config_hash="h", status="completed", promoted=False):
    promotion = None if status == "rejected" else SimpleNamespace(promoted=promoted)
    return SimpleNamespace(round=number, status=status, parent_version=parent, config_hash=config_hash,
                           promotion=promotion)


def _context(number, tmp_path, champion="1"):
    from flywheel import stages

    return stages.RoundContext(number=number, name=f"round-{number}", data_dir=str(tmp_path), work_dir=str(tmp_path),
                               run_id="r", config_hash="h",
                               champion=stages.Champion(version=champion, path=str(tmp_path), sha256="a"))


def test_refused_rounds_are_this_recipes_refused_rounds_from_this_champion(tmp_path):
    from flywheel.stages import refused_rounds

    records = [
        _record(1),                         # refused, from v1: carried
        _record(2, promoted=True),          # promoted: its rows made v2
        _record(3, parent="2"),             # from another champion
        _record(4, config_hash="other"),    # another recipe
        _record(5, status="rejected"),      # rejected by its reviewer
        _record(6),                         # refused, from v1: carried
        _record(7),                         # this round's own number, and later ones, never
        _record(8),
    ]
    context = _context(7, tmp_path)
    assert refused_rounds(records, context, 0) == []
    assert refused_rounds(records, context, 5) == [1, 6]
    assert refused_rounds(list(reversed(records)), context, 1) == [6]  # the latest first
    assert refused_rounds(records, _context(7, tmp_path, champion="2"), 5) == [3]


def _sft_table(path, prompts):
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"prompt": prompts, "completion": ["a"] * len(prompts), "ended": [True] * len(prompts)})
    frame.to_parquet(path)


def test_train_candidate_also_trains_on_refused_rounds_rows(registry_workspace, monkeypatch, tmp_path):
    import flywheel.training
    from flywheel import stages
    from flywheel.training import TrainedModel

    config, workspace = registry_workspace
    training = config.training.model_copy(update={"method": "sft", "carry_refused_rounds": 2, "max_rows": None})
    config = config.model_copy(update={"training": training})
    table = tmp_path / "sft.parquet"
    _sft_table(table, ["now0", "now1"])
    for number in (1, 2, 3):
        _sft_table(workspace.round_data(number) / "sft.parquet", [f"r{number}a", f"r{number}b"])
    monkeypatch.setattr(stages, "read_round_records",
                        lambda ws: [_record(1), _record(2, promoted=True), _record(3)])
    monkeypatch.setattr(stages, "log_metrics", lambda *args, **kwargs: None)
    seen = {}

    def train(base, rows, *args, metadata=None, **kwargs):
        seen.update(rows=rows, metadata=metadata)
        return TrainedModel(path="m", sha256="s", method="sft", rows=len(rows), rows_used=len(rows), steps=1,
                            train_loss=1.0, seconds=1.0, device="cpu", precision="fp32", changed_parameters=1.0)

    monkeypatch.setattr(flywheel.training, "train", train)
    quality = SimpleNamespace(clean=SimpleNamespace(sft_path=str(table)))
    trained = stages.train_candidate(config, workspace, _context(4, tmp_path), quality, SimpleNamespace(dvc_md5="m"))
    assert [r["prompt"] for r in seen["rows"]] == ["now0", "now1", "r1a", "r1b", "r3a", "r3b"]
    assert set(seen["rows"][2]) == {"prompt", "completion", "ended"}
    assert trained.carried_rounds == [1, 3] and seen["metadata"]["carried_rounds"] == [1, 3]
    tags = stages._lineage_tags(_context(4, tmp_path), SimpleNamespace(tag="t", dvc_md5="m", commit="c"), trained, "1")
    assert tags["flywheel.carried_rounds"] == "1,3"

    # A dataset with other columns (other code wrote it) is refused, not mixed in.
    import pandas as pd

    pd.DataFrame({"prompt": ["x"], "completion": ["y"]}).to_parquet(workspace.round_data(3) / "sft.parquet")
    with pytest.raises(ValueError, match="round 3's sft.parquet has columns"):
        stages.train_candidate(config, workspace, _context(4, tmp_path), quality, SimpleNamespace(dvc_md5="m"))
    (workspace.round_data(3) / "sft.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="round 3's dataset has no sft.parquet"):
        stages.train_candidate(config, workspace, _context(4, tmp_path), quality, SimpleNamespace(dvc_md5="m"))


# --- prompts.focus: later rounds lean toward what the latest round failed and taught ----------------------------

def test_load_prompt_split_focuses_later_rounds_on_the_latest_rounds_teachable_failures(tmp_path, monkeypatch):
    import json

    import pandas as pd

    from flywheel import stages
    from flywheel.prompts import load_prompts, sample_round_prompts, save_prompts

    config = parse_config({"prompts": {"builtin_count": 512, "per_round": 32, "focus": 20.0},
                          "training": {"method": "sft"}})
    workspace = Workspace.from_config(config, tmp_path)
    monkeypatch.setattr(stages, "log_metrics", lambda *args, **kwargs: None)
    monkeypatch.setattr(stages, "read_round_records", lambda ws: [])

    def split(number):
        work = tmp_path / "work" / str(number)
        work.mkdir(parents=True)
        return stages.load_prompt_split(config, workspace, _context(number, work))

    first = split(1)  # nothing to focus on yet: the unfocused window
    chosen = load_prompts(Path(first.train_path))
    assert first.focus_round is None
    from flywheel.prompts import recipe_prompts, split_prompts

    train, _ = split_prompts(recipe_prompts(config.prompts, workspace.root), config.prompts.eval_fraction)
    assert chosen == sample_round_prompts(train, 32, 1)

    # Round 1's samples failed all_uppercase everywhere and every prompt became a training row; the rest passed.
    data = workspace.round_data(1)
    data.mkdir(parents=True)
    save_prompts(chosen, data / "prompts.jsonl")
    checks = [(p.id, {c.type: c.type != "all_uppercase" for c in p.constraints}) for p in chosen]
    pd.DataFrame({"prompt_id": [i for i, _ in checks], "checks": [json.dumps(c) for _, c in checks]}).to_parquet(
        data / "samples.parquet")
    pd.DataFrame({"prompt_id": [p.id for p in chosen]}).to_parquet(data / "sft.parquet")
    monkeypatch.setattr(stages, "read_round_records", lambda ws: [_record(1)])

    second = split(2)
    focused = load_prompts(Path(second.train_path))
    assert second.focus_round == 1 and len(focused) == 32
    assert not {p.id for p in focused} & {p.id for p in chosen}  # never a prompt an earlier round answered

    def uppercase(prompts):
        return sum(any(c.type == "all_uppercase" for c in p.constraints) for p in prompts)

    assert uppercase(focused) >= 2 * max(1, uppercase(sample_round_prompts(train, 32, 2)))

    (data / "samples.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="round 1's samples.parquet, which is missing"):
        split(3)


def test_repair_augmentation_never_writes_a_held_out_prompt(tmp_path):
    # The held-out set holds the train prompt with "no commas" added: that augmentation would copy it, so the
    # stage passes the held-out prompts and, of the two instructions asked for, the row gets only the other.
    import json

    import pandas as pd

    from flywheel import stages
    from flywheel.dataset import read_table, write_parquet
    from flywheel.prompts import Constraint, Prompt, save_prompts

    task = "Describe a quiet harbour at dawn in a few sentences for a travel magazine."
    train = Prompt(id="p", prompt=task, constraints=[Constraint(type="all_lowercase")])
    no_commas = Constraint(type="no_commas")
    held_out = Prompt(id="e", prompt=f"{task} {no_commas.describe()}", constraints=[no_commas])
    save_prompts([train], tmp_path / "train.jsonl")
    save_prompts([held_out], tmp_path / "eval.jsonl")
    samples = pd.DataFrame([{
        "row_id": "p-s0", "prompt_id": "p", "prompt": task, "sample_index": 0, "response": "boats rest. gulls wait.",
        "n_tokens": 6, "finished": True, "score": 1.0, "passed": True, "checks": json.dumps([True]),
        "judge": "verifier", "verdict": "pass", "critique": "", "llm_verdict": "", "llm_critique": ""}])
    write_parquet(samples, tmp_path / "samples.parquet")
    judged = stages.JudgedSamples(path=str(tmp_path / "samples.parquet"), rows=1, pass_rate=1.0, mean_score=1.0)
    split = stages.PromptSplit(train_path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl"),
                               train=1, eval=1, round_prompts=1)
    config = FlywheelConfig.model_validate({"strategy": {"name": "repair", "repair": {
        "augment_per_row": 2, "types": ["no_commas", "quotation_wrapped"]}}})
    made = stages.build_round_data(config, _context(1, tmp_path), judged, split, base_dir=tmp_path)
    sft = read_table(Path(made.sft_path))
    augmented = sft[sft["origin"].str.startswith("augment:")]
    assert augmented["row_id"].tolist() == ["p-sft0-augment-quotation_wrapped"]
    assert made.stats["repair_augmented"] == 1.0


def test_judge_samples_fails_answers_that_copy_their_instructions_when_the_recipe_says_so(tmp_path):
    import pandas as pd

    from flywheel import stages
    from flywheel.prompts import Prompt, save_prompts
    from flywheel.verifiers import Constraint

    prompt = Prompt(id="p-title", prompt="Describe tea. Your answer must contain a title, wrapped in double angular "
                    "brackets, such as <<my title>>.", constraints=[Constraint(type="title")])
    save_prompts([prompt], tmp_path / "train.jsonl")
    pd.DataFrame([{"request_index": 0, "sample_index": i, "text": text, "n_tokens": 5, "finished": True}
                  for i, text in enumerate(["<<my title>>\n\nTea.", "<<On Tea>>\n\nTea."])]).to_parquet(
        tmp_path / "generations.parquet", index=False)
    split = stages.PromptSplit(train_path=str(tmp_path / "train.jsonl"), eval_path="", train=1, eval=0,
                               round_prompts=1)
    generations = stages.Generations(path=str(tmp_path / "generations.parquet"), prompts=1, samples=2, tokens=10,
                                     seconds=1.0, tokens_per_second=10.0)
    for echo_ngram, passed in ((None, [True, True]), (6, [False, True])):
        config = parse_config({"feedback": {"echo_ngram": echo_ngram}})
        judged = stages.judge_samples(config, _context(1, tmp_path), split, generations)
        assert pd.read_parquet(judged.path)["passed"].tolist() == passed


def test_quality_gate_quarantines_cut_off_rows_of_prompts_with_a_count(tmp_path):
    # The stage reads the limits from the round's prompts: a cut-off row asked for exactly 3 bullets goes to the
    # quarantine with its reason; a cut-off row asked for at least 20 words, and an ended one, train.
    import pandas as pd

    from flywheel import stages
    from flywheel.dataset import read_table, write_parquet
    from flywheel.prompts import Constraint, Prompt, save_prompts

    asked = {"bullets": Constraint(type="bullet_count_exact", args={"num_bullets": 3}),
             "words": Constraint(type="word_count_min", args={"min_words": 20})}
    save_prompts([Prompt(id=name, prompt=f"Describe {name}. {c.describe()}", constraints=[c])
                  for name, c in asked.items()], tmp_path / "train.jsonl")
    save_prompts([Prompt(id="e", prompt="Describe tea. Answer in lowercase.",
                         constraints=[Constraint(type="all_lowercase")])], tmp_path / "eval.jsonl")
    rows = [("bullets", "* a\n* b\n* c is cut", False), ("bullets", "* a\n* b\n* c.", True),
            ("words", "a long answer that was cut", False)]
    sft = pd.DataFrame([{"row_id": f"r{i}", "prompt_id": pid, "prompt": f"Describe {pid}. {asked[pid].describe()}",
                         "completion": text, "score": 1.0, "ended": ended}
                        for i, (pid, text, ended) in enumerate(rows)])
    tables = {"samples": pd.DataFrame(columns=["row_id"]), "pairs": pd.DataFrame(columns=["row_id"]), "sft": sft}
    for name, frame in tables.items():
        write_parquet(frame, tmp_path / f"{name}.parquet")
    data = stages.RoundData(samples_path=str(tmp_path / "samples.parquet"), pairs_path=str(tmp_path / "pairs.parquet"),
                            sft_path=str(tmp_path / "sft.parquet"), samples=0, pairs=0, sft=3, strategy="repair",
                            stats={})
    split = stages.PromptSplit(train_path=str(tmp_path / "train.jsonl"), eval_path=str(tmp_path / "eval.jsonl"),
                               train=2, eval=1, round_prompts=2)
    config = FlywheelConfig()
    workspace = Workspace.from_config(config, tmp_path / "ws")
    context = _context(1, tmp_path / "round")
    result = stages.quality_gate(config, workspace, context, split, data)
    assert read_table(Path(result.clean.sft_path))["row_id"].tolist() == ["r1", "r2"]
    quarantine = read_table(Path(result.quarantine_path))
    assert quarantine[["row_id", "reasons"]].values.tolist() == [
        ["r0", "expect_column_values_to_be_in_set(cut_off_under_limit)"]]
