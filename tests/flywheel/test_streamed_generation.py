"""The generate stage streams: prompts are answered in chunks, each chunk written to its own part file, so memory
holds one chunk and a re-run after a crash regenerates only the chunks that are missing or not this chunk's."""

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flywheel import stages
from flywheel.config import parse_config
from flywheel.generation import Completion, EngineError, SamplingParams, user_request
from flywheel.prompts import save_prompts, synthesize_prompts
from flywheel.stages import Champion, PromptSplit, RoundContext, generate_samples

CHUNK = 4
PROMPTS = 10  # three chunks: 4, 4 and 2 prompts
SAMPLES = 3


class FakeEngine:
    """Answers from the prompt text and the sample index alone (so any chunking gives the same rows); records the
    prompts and sampling parameters of every call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[tuple[list[str], SamplingParams]] = []
        self.fail_on_call = fail_on_call
        self.closed = False

    def generate(self, requests, samples, params, progress=None):
        texts = [r.messages[-1]["content"] for r in requests]
        self.calls.append((texts, params))
        if self.fail_on_call == len(self.calls):
            raise RuntimeError("engine died")
        completions = [Completion(request_index=i, sample_index=s, text=f"{text[:24]} #{s}",
                                  n_tokens=len(text) % 7 + s, finished=s % 2 == 0)
                       for i, text in enumerate(texts) for s in range(samples)]
        if progress:
            progress(len(completions))
        return completions

    def close(self):
        self.closed = True


@pytest.fixture
def setup(tmp_path: Path, monkeypatch):
    """A config, a round context and its prompt split; ``engines`` lists every engine the stage made."""
    monkeypatch.setattr(stages, "GENERATION_CHUNK_PROMPTS", CHUNK)
    # A batch no larger than a chunk: chunks hold at least one engine batch of prompts.
    config = parse_config({"generation": {"samples_per_prompt": SAMPLES, "max_new_tokens": 8, "batch_size": 2}})
    work = tmp_path / ".flywheel" / "work" / "round-0001"
    work.mkdir(parents=True)
    prompts = synthesize_prompts(PROMPTS, seed=3)
    save_prompts(prompts, work / "prompts.jsonl")
    context = RoundContext(number=1, name="round-0001", data_dir=str(tmp_path / "data"), work_dir=str(work),
                           run_id="run", config_hash=config.config_hash(),
                           champion=Champion(version="1", path=str(tmp_path / "model"), sha256="abc"))
    split = PromptSplit(train_path=str(work / "prompts.jsonl"), eval_path=str(work / "prompts.jsonl"),
                        train=PROMPTS, eval=0, round_prompts=PROMPTS)
    engines: list[FakeEngine] = []
    next_engine: dict = {}

    def make_engine(*args, **kwargs):
        engines.append(next_engine.pop("engine", None) or FakeEngine())
        return engines[-1]

    monkeypatch.setattr("flywheel.generation.make_engine", make_engine)
    return {"config": config, "context": context, "split": split, "prompts": prompts, "work": work,
            "engines": engines, "next_engine": next_engine}


def _parts(work: Path) -> list[str]:
    return sorted(p.name for p in (work / "generations").iterdir())


def _generated_prompts(engines: list[FakeEngine]) -> list[list[str]]:
    return [texts for engine in engines for texts, _ in engine.calls]


def test_chunks_are_written_as_parts_and_assembled_as_one_call_would_answer(setup):
    progress: list[int] = []
    result = generate_samples(setup["config"], setup["context"], setup["split"], progress.append)

    assert _parts(setup["work"]) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(setup["work"] / "generations" / name).num_rows for name in _parts(setup["work"])] == \
        [CHUNK * SAMPLES, CHUNK * SAMPLES, 2 * SAMPLES]
    texts = [p.prompt for p in setup["prompts"]]
    assert _generated_prompts(setup["engines"]) == [texts[0:4], texts[4:8], texts[8:10]]
    assert len(setup["engines"]) == 1 and setup["engines"][0].closed

    # The same rows, columns and order as the engine answering every prompt in one call: request_index indexes
    # the round's prompt list, not the chunk.
    whole = FakeEngine().generate([user_request(t) for t in texts], SAMPLES, SamplingParams(max_new_tokens=8))
    expected = pd.DataFrame([c.model_dump() for c in whole])
    table = pd.read_parquet(result.path)
    pd.testing.assert_frame_equal(table, expected)
    assert Path(result.path) == setup["work"] / "generations.parquet"
    assert (result.prompts, result.samples, result.tokens) == (PROMPTS, PROMPTS * SAMPLES, int(expected.n_tokens.sum()))
    assert result.tokens_per_second == pytest.approx(result.tokens / max(result.seconds, 1e-9))
    assert sum(progress) == PROMPTS * SAMPLES
    assert not [p for p in setup["work"].rglob("*.tmp")]  # no temporary file left behind


def test_each_chunk_has_its_own_seed_derived_from_the_round_seed_and_chunk_index(setup):
    generate_samples(setup["config"], setup["context"], setup["split"])
    seeds = [params.seed for _, params in setup["engines"][0].calls]
    assert len(set(seeds)) == 3 and all(0 <= seed < 2**31 for seed in seeds)
    # The first chunk keeps the round's own seed: a round of one chunk draws what it drew before chunking.
    assert seeds[0] == setup["config"].seed * 10_000 + setup["context"].number

    (setup["work"] / "generations" / "part-00001.parquet").unlink()
    generate_samples(setup["config"], setup["context"], setup["split"])
    assert [params.seed for _, params in setup["engines"][1].calls] == [seeds[1]]  # the same draw as before

    other = setup["context"].model_copy(update={"number": 2})
    generate_samples(setup["config"], other, setup["split"])
    assert not set(params.seed for _, params in setup["engines"][2].calls) & set(seeds)  # another round, other draws


def test_a_rerun_regenerates_only_the_missing_part_and_a_complete_rerun_loads_no_engine(setup):
    first = generate_samples(setup["config"], setup["context"], setup["split"])
    reference = pd.read_parquet(first.path)

    (setup["work"] / "generations" / "part-00001.parquet").unlink()
    again = generate_samples(setup["config"], setup["context"], setup["split"])
    texts = [p.prompt for p in setup["prompts"]]
    assert _generated_prompts(setup["engines"][1:]) == [texts[4:8]]
    pd.testing.assert_frame_equal(pd.read_parquet(again.path), reference)
    assert (again.samples, again.tokens) == (first.samples, first.tokens)

    generate_samples(setup["config"], setup["context"], setup["split"])
    assert len(setup["engines"]) == 2  # every part complete: the model is not even loaded


def test_a_crash_keeps_the_finished_chunks_and_the_rerun_ends_as_an_uninterrupted_run(setup):
    setup["next_engine"]["engine"] = FakeEngine(fail_on_call=2)
    with pytest.raises(RuntimeError, match="engine died"):
        generate_samples(setup["config"], setup["context"], setup["split"])
    assert _parts(setup["work"]) == ["part-00000.parquet"]
    assert setup["engines"][0].closed

    resumed = generate_samples(setup["config"], setup["context"], setup["split"])
    texts = [p.prompt for p in setup["prompts"]]
    assert _generated_prompts(setup["engines"][1:]) == [texts[4:8], texts[8:10]]
    resumed_table = pd.read_parquet(resumed.path)
    for name in _parts(setup["work"]):
        (setup["work"] / "generations" / name).unlink()
    uninterrupted = generate_samples(setup["config"], setup["context"], setup["split"])
    pd.testing.assert_frame_equal(resumed_table, pd.read_parquet(uninterrupted.path))
    assert [p.seed for _, p in setup["engines"][1].calls] == [p.seed for _, p in setup["engines"][2].calls][1:]


def test_a_part_with_the_wrong_row_count_is_regenerated(setup):
    generate_samples(setup["config"], setup["context"], setup["split"])
    part = setup["work"] / "generations" / "part-00002.parquet"
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 2), part)  # the chunk's own key in its metadata, but rows missing
    assert pq.read_metadata(part).metadata[b"flywheel.part_key"] == table.schema.metadata[b"flywheel.part_key"]

    result = generate_samples(setup["config"], setup["context"], setup["split"])
    assert _generated_prompts(setup["engines"][1:]) == [[p.prompt for p in setup["prompts"][8:10]]]
    assert pq.read_metadata(part).num_rows == 2 * SAMPLES and result.samples == PROMPTS * SAMPLES


def test_a_unreadable_part_is_regenerated(setup):
    generate_samples(setup["config"], setup["context"], setup["split"])
    (setup["work"] / "generations" / "part-00000.parquet").write_bytes(b"not parquet")
    result = generate_samples(setup["config"], setup["context"], setup["split"])
    assert _generated_prompts(setup["engines"][1:]) == [[p.prompt for p in setup["prompts"][0:4]]]
    assert result.samples == PROMPTS * SAMPLES


def test_parts_made_under_another_generation_setup_or_model_are_not_reused(setup):
    generate_samples(setup["config"], setup["context"], setup["split"])
    hotter = setup["config"].model_copy(update={
        "generation": setup["config"].generation.model_copy(update={"temperature": 1.3})})
    generate_samples(hotter, setup["context"], setup["split"])
    assert len(setup["engines"][1].calls) == 3
    assert {params.temperature for _, params in setup["engines"][1].calls} == {1.3}

    promoted = setup["context"].model_copy(update={"champion": Champion(version="2", path="m2", sha256="def")})
    generate_samples(hotter, promoted, setup["split"])
    assert len(setup["engines"][2].calls) == 3


def test_an_engine_returning_too_few_completions_fails_the_stage(setup):
    class Short(FakeEngine):
        def generate(self, requests, samples, params, progress=None):
            return super().generate(requests, samples, params, progress)[:-1]

    setup["next_engine"]["engine"] = Short()
    with pytest.raises(EngineError, match="returned 11 completions for 4 prompts x 3 samples"):
        generate_samples(setup["config"], setup["context"], setup["split"])
    assert not (setup["work"] / "generations").exists() or _parts(setup["work"]) == []


@pytest.mark.parametrize("engine", ["transformers", "ctranslate2"])
def test_a_resumed_generation_on_a_real_engine_draws_the_same_samples(setup, tiny_model_dir, monkeypatch, engine):
    """The tiny model, sampling: a part regenerated on a re-run equals the one it replaces, byte for byte, and the
    chunks' seeds (hashed, far above CTranslate2's 32-bit seed once scaled) are accepted by every engine."""
    import torch

    monkeypatch.undo()  # the real make_engine (and the chunk size, set again)
    monkeypatch.setattr(stages, "GENERATION_CHUNK_PROMPTS", CHUNK)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = parse_config({"seed": 7, "generation": {
            "engine": engine, "samples_per_prompt": 2, "max_new_tokens": 6, "temperature": 1.0, "batch_size": 4,
            "threads": 1, "device": "cpu"}})
        context = setup["context"].model_copy(update={"champion": Champion(version="1", path=str(tiny_model_dir),
                                                                           sha256="tiny")})
        first = generate_samples(config, context, setup["split"])
        table = pd.read_parquet(first.path)
        assert list(table["request_index"].drop_duplicates()) == list(range(PROMPTS)) and len(table) == 2 * PROMPTS

        (setup["work"] / "generations" / "part-00001.parquet").unlink()
        again = generate_samples(config, context, setup["split"])
        pd.testing.assert_frame_equal(pd.read_parquet(again.path), table)
    finally:
        torch.set_num_threads(torch_threads)
