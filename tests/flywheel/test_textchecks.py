"""Tests for flywheel.textchecks: the pure scorers behind the quality gate's derived columns."""

from __future__ import annotations

import pytest

from flywheel.textchecks import (
    CHECKS,
    NgramIndex,
    TextLimits,
    count_tokens,
    detect_language,
    is_refusal,
    langid_identifier,
    langid_model,
    is_repetitive,
    max_ngram_repeats,
    max_unit_run,
    shares_ngram,
    wrong_language,
)

LIMITS = TextLimits(language="en", language_min_letters=40, repetition_ngram=3, repetition_max_repeats=3)
ENGLISH = "The water cycle moves water between the oceans, the air and the land through evaporation and rain."
RUSSIAN = "Круговорот воды переносит воду между океанами, воздухом и сушей через испарение и дожди."


def test_count_tokens_counts_words_and_punctuation() -> None:
    assert count_tokens("Hello, world!") == 4
    assert count_tokens("   ") == 0
    assert count_tokens(None) is None


@pytest.mark.parametrize(("text", "flagged"), [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot assist with this request.", True),
    ("As an AI language model, I cannot browse the internet.", True),
    ("I must decline.", True),
    ("Sure! Here are three tips for a good night's sleep.", False),
    ("I can't wait to see you: bring the book I can help you carry.", False),
    (None, False),
])
def test_is_refusal(text, flagged) -> None:
    assert is_refusal(text, LIMITS) is flagged


def test_refusal_is_looked_for_at_the_start_only() -> None:
    late = "A long and helpful answer about bread. " * 8 + "I can't help with that."
    assert not is_refusal(late, LIMITS)


def test_is_repetitive() -> None:
    assert max_ngram_repeats("the cat sat " * 4, 3) == 4
    assert is_repetitive("the cat sat " * 4, LIMITS)
    assert not is_repetitive("the cat sat " * 3, LIMITS)  # at the limit, not over it
    assert not is_repetitive(ENGLISH, LIMITS)
    assert not is_repetitive(None, LIMITS)


def test_is_repetitive_sees_loops_of_symbols() -> None:
    limits = TextLimits(repetition_ngram=4, repetition_max_repeats=4)  # the recipe's defaults
    assert max_unit_run("Rating: " + "⚖" * 30) == 30 and is_repetitive("Rating: " + "⚖" * 30, limits)
    assert max_unit_run("* * * " * 6) == 18 and is_repetitive("* * * " * 6, limits)  # whitespace ignored
    assert max_unit_run("<ab>" * 17) == 17 and is_repetitive("<ab>" * 17, limits)  # a 4-character unit
    # 16 units are as long as the longest loop of words the limits allow (4 words x 4 times): not flagged.
    assert max_unit_run("-" * 16) == 16 and not is_repetitive("Intro\n" + "-" * 16 + "\nText", limits)
    assert not is_repetitive("Wait... really?!! Yes -- 1000 cats.", limits)
    assert max_unit_run(None) == 0 and max_unit_run("") == 0


def test_wrong_language() -> None:
    assert detect_language(ENGLISH) == "en" and detect_language(RUSSIAN) == "ru"
    assert not wrong_language(ENGLISH, LIMITS)
    assert wrong_language(RUSSIAN, LIMITS)
    assert not wrong_language(RUSSIAN, LIMITS.model_copy(update={"language": "ru"}))  # the prompt asked for it
    assert not wrong_language("Круговорот воды.", LIMITS)  # too short to tell
    assert not wrong_language(RUSSIAN, LIMITS.model_copy(update={"language": None}))  # unchecked
    assert not wrong_language(None, LIMITS)


def test_an_answer_in_capital_letters_is_identified_as_its_language() -> None:
    # An answer to "respond in all capital letters" that langid alone calls Norwegian.
    shouting = ("A WALK THROUGH A BUSY MARKET CAN BE A THRILLING EXPERIENCE, FILLED WITH THE SIGHTS AND SMELLS OF "
                "THE MARKET. EVERY STEP IS A CHALLENGE, AND THE MARKET OFFERS A WIDE RANGE OF PRODUCTS AND "
                "EXPERIENCES. FROM THE COLORFUL STALLS SELLING LOCAL DELICACIES TO THE BUSTLING MARKET STALLS "
                "SELLING SPICES AND SPICES, THERE'S ALWAYS SOMETHING TO SEE AND DO.")
    assert detect_language(shouting) == detect_language(shouting.lower()) == "en"
    assert not wrong_language(shouting, LIMITS)
    assert detect_language(RUSSIAN.upper()) == "ru"


LANGUAGES = [ENGLISH, RUSSIAN, "Le cycle de l'eau est important pour la vie sur la Terre.",
             "Der Wasserkreislauf ist wichtig für das Leben.", "1234 ## !!", ""]


@pytest.fixture(scope="module")
def reference():
    """The identifier as langid builds it from its packaged model string."""
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def test_langid_model_from_its_cache_classifies_as_the_package_does(tmp_path, monkeypatch, reference) -> None:
    import bz2

    from langid.langid import model

    decoded = langid_model(model, tmp_path)
    assert len(list(tmp_path.glob("langid-*.npz"))) == 1
    monkeypatch.setattr(bz2, "decompress", lambda data: pytest.fail("decoded again despite the cache"))
    cached = langid_model(model, tmp_path)
    for built in (decoded, cached):
        identifier = langid_identifier(built)
        assert identifier.nb_ptc.dtype == reference.nb_ptc.dtype and identifier.tk_output == reference.tk_output
        assert [identifier.classify(text) for text in LANGUAGES] == [reference.classify(text) for text in LANGUAGES]


def test_langid_cache_rebuilt_when_unreadable_and_skipped_when_unwritable(tmp_path, reference) -> None:
    from langid.langid import model

    expected = [reference.classify(text) for text in LANGUAGES]
    langid_model(model, tmp_path)
    [cached] = tmp_path.glob("langid-*.npz")
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated, as by a full disk
    assert [langid_identifier(langid_model(model, tmp_path)).classify(text) for text in LANGUAGES] == expected
    assert cached.stat().st_size > 1000  # written whole again
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    assert [langid_identifier(langid_model(model, blocked / "cache")).classify(text) for text in LANGUAGES] == expected


def test_checks_share_one_signature() -> None:
    for name, check in CHECKS.items():
        assert check(None, LIMITS) is False, name
        assert isinstance(check(ENGLISH, LIMITS), bool), name


def test_shares_ngram() -> None:
    index = NgramIndex.build(["Describe the water cycle in detail for a class of ten year olds.",
                              "Name the capital of France."], 8)
    assert shares_ngram("Kindly describe the water cycle in detail for a class of adults.", index)
    assert not shares_ngram("Describe the water cycle for adults, in detail.", index)
    # Shorter than n words (but at least n/2): the whole word sequence inside the other text counts.
    assert shares_ngram("the water cycle in detail", index)
    assert shares_ngram("Please name the capital of France, then Spain.", index)
    assert not shares_ngram("the water", index)  # too short to mean anything
    assert not shares_ngram("the capital of Spain", index)
    assert not shares_ngram(None, index)
