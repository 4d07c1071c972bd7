import json
import shutil
from pathlib import Path

import pytest

from flywheel.ct2_engine import MARKER, CTranslate2Engine, converted_model
from flywheel.generation import SamplingParams, TransformersEngine, make_engine, user_request
from flywheel.models import ModelError, model_sha256
from flywheel.prompts import default_prompts

MAX_NEW = 12
GREEDY = SamplingParams(max_new_tokens=MAX_NEW)
SAMPLED = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.95, seed=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ct2-cache")


@pytest.fixture(scope="module")
def engine(lively_model_dir, cache_dir) -> CTranslate2Engine:
    return CTranslate2Engine(lively_model_dir, batch_size=8, threads=1, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def reference(lively_model_dir) -> TransformersEngine:
    return TransformersEngine(lively_model_dir, batch_size=8)


@pytest.fixture(scope="module")
def requests_():
    by_length = sorted((p.prompt for p in default_prompts()[:8]), key=len)
    mixed = [text for pair in zip(by_length[:4], by_length[::-1][:4]) for text in pair]
    return [user_request(text) for text in mixed]


def _fields(completions):
    return [(c.request_index, c.sample_index, c.text, c.n_tokens, c.finished) for c in completions]


def test_greedy_matches_transformers_token_for_token(engine, reference, requests_):
    assert len({len(engine.encode(r)) for r in requests_}) > 1  # the length sort really reorders
    expected = reference.generate(requests_, 1, GREEDY)
    texts = [c.text for c in expected]
    assert len(set(texts)) == len(texts) and all(texts), "greedy texts should differ per prompt"
    for batch_size in (8, 3, 1):
        engine.batch_size = batch_size
        try:
            assert _fields(engine.generate(requests_, 1, GREEDY)) == _fields(expected)
        finally:
            engine.batch_size = 8
    # Token for token, not only after decoding: compare the raw ids a longer answer is made of.
    long = SamplingParams(max_new_tokens=40)
    ids = [reference.tokenizer.encode(c.text, add_special_tokens=False) for c in reference.generate(requests_, 1, long)]
    assert [reference.tokenizer.encode(c.text, add_special_tokens=False)
            for c in engine.generate(requests_, 1, long)] == ids


def test_stops_at_eos_and_never_passes_max_new_tokens(engine, reference, requests_):
    # No EOS in sight: every answer runs to exactly the limit and is not finished.
    for limit in (1, 5):
        for c in engine.generate(requests_, 1, SamplingParams(max_new_tokens=limit)):
            assert c.n_tokens == limit and c.finished is False
    # Make a token the greedy answer produces mid-way an EOS: each sequence must stop there on its own.
    ids = engine.encode(requests_[0])
    tokens = engine._generator.generate_batch([engine.tokenizer.convert_ids_to_tokens(ids)], max_length=MAX_NEW,
                                              include_prompt_in_result=False)[0].sequences_ids[0]
    cut = next(k for k in range(3, len(tokens)) if tokens[k] not in tokens[:k])
    saved = list(engine.eos_ids)
    engine.eos_ids = sorted({*saved, tokens[cut]})
    try:
        stopped = engine.generate(requests_, 1, GREEDY)
    finally:
        engine.eos_ids = saved
    first = stopped[0]
    assert first.finished is True and first.n_tokens == cut
    assert first.text == engine.tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
    # The same EOS set in the transformers engine gives the same answers for every request, finished or not.
    reference.model.generation_config.eos_token_id = sorted({*saved, tokens[cut]})
    try:
        assert _fields(stopped) == _fields(reference.generate(requests_, 1, GREEDY))
    finally:
        reference.model.generation_config.eos_token_id = saved
    assert any(not c.finished for c in stopped), "other requests must keep going past the stopped one"


def test_sampling_is_reproducible_with_a_seed(engine, requests_):
    first = engine.generate(requests_[:4], 4, SAMPLED)
    greedy = engine.generate(requests_[:4], 1, GREEDY)
    again = engine.generate(requests_[:4], 4, SAMPLED)
    other_seed = engine.generate(requests_[:4], 4, SAMPLED.model_copy(update={"seed": 4}))
    assert _fields(first) == _fields(again)
    assert [c.text for c in first] != [c.text for c in other_seed]
    assert [c.text for c in first if c.sample_index == 0] != [c.text for c in greedy]
    assert len({c.text for c in first if c.request_index == 0}) > 1  # samples of one prompt are separate draws
    for c in first:
        assert 0 <= c.n_tokens <= MAX_NEW and c.finished == (c.n_tokens < MAX_NEW)


def test_progress_counts_every_batch(engine, requests_):
    calls: list[int] = []
    engine.batch_size = 3
    try:
        completions = engine.generate(requests_[:5], 2, SAMPLED, progress=calls.append)
    finally:
        engine.batch_size = 8
    assert calls == [3, 3, 3, 1]
    assert [(c.request_index, c.sample_index) for c in completions] == [(i, s) for i in range(5) for s in range(2)]


def test_conversion_is_cached_by_sha256(lively_model_dir, tmp_path, monkeypatch):
    import ctranslate2.converters

    first = converted_model(lively_model_dir, tmp_path)
    assert first.parent == tmp_path and first.name.startswith(model_sha256(lively_model_dir))
    assert json.loads((first / MARKER).read_text())["sha256"] == model_sha256(lively_model_dir)
    stamp = (first / "model.bin").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("a cached model must not be converted again")

    monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", refuse)
    assert converted_model(lively_model_dir, tmp_path) == first
    assert (first / "model.bin").stat().st_mtime_ns == stamp
    # The same weights in another folder (the store's copy of a version, say) reuse the same conversion.
    copy = tmp_path / "copy"
    shutil.copytree(lively_model_dir, copy)
    assert converted_model(copy, tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, "copy"])


def test_a_failed_conversion_leaves_nothing_behind(lively_model_dir, tmp_path, monkeypatch):
    import ctranslate2.converters

    real = ctranslate2.converters.TransformersConverter

    class Crashing(real):
        def convert(self, output_dir, *args, **kwargs):
            Path(output_dir, "model.bin").write_bytes(b"half")  # a partial write, then the crash
            raise OSError("disk full")

    monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", Crashing)
    with pytest.raises(ModelError, match="CTranslate2 cannot convert this model: disk full"):
        converted_model(lively_model_dir, tmp_path)
    assert list(tmp_path.iterdir()) == []
    # A folder under the final name without the completion marker (left by anything) is never loaded: replaced.
    monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", real)
    import ctranslate2

    stale = tmp_path / f"{model_sha256(lively_model_dir)}-ct2-{ctranslate2.__version__}"
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"half")
    path = converted_model(lively_model_dir, tmp_path)
    assert path == stale and (path / MARKER).is_file() and (path / "model.bin").stat().st_size > 4
    assert [p.name for p in tmp_path.iterdir()] == [stale.name]


def test_bad_model_folders_fail_clearly(lively_model_dir, tmp_path):
    with pytest.raises(ModelError, match="model folder not found"):
        CTranslate2Engine(tmp_path / "missing", cache_dir=tmp_path / "cache")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        CTranslate2Engine(empty, cache_dir=tmp_path / "cache")
    odd = tmp_path / "odd"
    shutil.copytree(lively_model_dir, odd)
    (odd / "model.safetensors").write_bytes(b"not safetensors")  # looks complete, cannot be read
    with pytest.raises(ModelError, match=f"{odd}: CTranslate2 cannot convert this model"):
        CTranslate2Engine(odd, cache_dir=tmp_path / "cache")
    assert not any(p.name.startswith(".") for p in (tmp_path / "cache").iterdir())


def test_unsupported_compute_type_is_refused(lively_model_dir, tmp_path):
    with pytest.raises(ValueError, match="compute_type 'float16' is not supported by CTranslate2 on cpu"):
        CTranslate2Engine(lively_model_dir, compute_type="float16", cache_dir=tmp_path)


def test_make_engine_builds_it(lively_model_dir, cache_dir):
    engine = make_engine("ctranslate2", lively_model_dir, "cpu", 4, compute_type="int8", threads=1, cache_dir=cache_dir)
    assert isinstance(engine, CTranslate2Engine)
    assert (engine.batch_size, engine.compute_type, engine.threads) == (4, "int8", 1)
    assert engine.path.parent == cache_dir


def test_a_recipe_selects_it():
    from flywheel.config import parse_config

    gen = parse_config({"generation": {"engine": "ctranslate2", "compute_type": "int8", "threads": 2}}).generation
    assert (gen.engine, gen.compute_type, gen.threads) == ("ctranslate2", "int8", 2)

