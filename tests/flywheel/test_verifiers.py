import random

import pytest

from flywheel.verifiers import (
    INSTRUCTION_EXAMPLES,
    VERIFIERS,
    Constraint,
    Verdict,
    compatible,
    echoed_instruction,
    limits_length,
    loose_variants,
    verify,
)

# (type, args, a response that passes, a response that fails) -- strict mode. Every registered type needs a row.
CASES = [
    ("keywords_include", {"keywords": ["garden", "morning"]},
     "The garden is lovely in the Morning.", "The garden is lovely at night."),
    ("keywords_include", {"keywords": ["rain"]}, "Rain again.", "The rainbow is out."),  # whole words only
    ("keyword_frequency", {"keyword": "rain", "relation": "at least", "frequency": 2},
     "Rain, rain, go away.", "Rain is wet."),
    ("keyword_frequency", {"keyword": "rain", "relation": "at most", "frequency": 1},
     "Rain is wet.", "Rain and more rain."),
    ("forbidden_words", {"forbidden_words": ["very", "nice"]},
     "Everything is quite good.", "It is very good."),
    ("letter_frequency", {"letter": "z", "relation": "at least", "frequency": 2}, "Pizza is tasty.", "Pasta is tasty."),
    ("letter_frequency", {"letter": "a", "relation": "at most", "frequency": 2}, "A cat sits.", "A cat at a mat."),
    ("word_count_min", {"min_words": 5}, "one two three four five", "one two three four"),
    ("word_count_max", {"max_words": 3}, "one two three.", "one two three four."),
    ("sentence_count", {"relation": "at most", "num_sentences": 2}, "I woke up. I ate.", "I woke up. I ate. I left."),
    ("sentence_count", {"relation": "at least", "num_sentences": 3}, "A b. C d! E f?", "A b. C d"),
    ("paragraph_count", {"num_paragraphs": 2}, "First part.\n\nSecond part.", "Only one paragraph here."),
    ("paragraph_count", {"num_paragraphs": 2}, "First.\n***\nSecond.", "First.\n\nSecond.\n***\nThird."),
    ("bullet_count_exact", {"num_bullets": 2},
     "Tips:\n* Drink water\n- Sleep well", "Tips:\n* Drink water\n* Sleep well\n* Walk"),
    ("numbered_list_count", {"num_items": 3}, "Steps:\n1. Boil\n2. Pour\n3) Sip", "Steps:\n1. Boil\n2. Pour"),
    ("section_count", {"section_word": "SECTION", "num_sections": 2},
     "SECTION 1\nHello.\n**SECTION 2**\nBye.", "SECTION 1\nHello. Section 2 is missing."),
    ("title", {}, "<<A Quiet Morning>>\nThe sun rose.", "<<>> The sun rose."),
    ("highlighted_sections", {"num_highlights": 2},
     "This is *important* and **vital**.", "This is *important* only."),
    ("json_format", {}, '{"answer": "tea", "cups": 2}', "answer: tea"),
    ("json_format", {}, "[1, 2]", '"just a string"'),  # only objects and arrays count
    ("all_lowercase", {}, "all quiet here.", "All quiet here."),
    ("all_lowercase", {}, "tea, please.", "123 !"),  # no letters at all does not count
    ("all_uppercase", {}, "ALL QUIET HERE.", "ALL QUIET Here."),
    ("capital_word_frequency", {"relation": "at least", "frequency": 2},
     "This is VERY IMPORTANT.", "I think this is VERY important."),  # "I" is not emphasis
    ("capital_word_frequency", {"relation": "at most", "frequency": 1}, "Only ONE here.", "TWO WORDS here."),
    ("no_commas", {}, "No commas here.", "Yes, commas here."),
    ("no_digits", {}, "Seven apples.", "7 apples."),
    ("start_with_phrase", {"phrase": "Hello there"}, "  hello there, friend.", "Hi, hello there."),
    ("end_with_phrase", {"phrase": "Hope this helps."},
     "Tea needs hot water. Hope this helps.\n", "Hope this helps. Tea needs hot water."),
    ("ends_with_question", {}, "Shall we go?", "We shall go."),
    ("quotation_wrapped", {}, '"Hello world."', 'Hello "world".'),
    ("quotation_wrapped", {}, "“Hello world.”", '"'),
    ("placeholders", {"num_placeholders": 2}, "Dear [name], see you at [place].", "Dear [name], see you [ ]."),
    ("postscript", {"marker": "P.S."}, "Hi.\n\nP.S. Bring snacks.", "Hi. Bring snacks and PS."),
    ("postscript", {"marker": "P.P.S."}, "Hi.\n**P.P.S.** more", "Hi.\nP.S. more"),
    ("response_language", {"language": "en"}, "The cat sleeps.", "Кошка спит на диване."),
    ("response_language", {"language": "ru"}, "Кошка спит на диване.", "The cat sleeps."),
    ("response_language", {"language": "zh"}, "猫在睡觉。", "猫がねている。"),
    ("response_language", {"language": "ja"}, "猫がねている。", "猫在睡觉。"),
    ("repeat_request", {"prompt_to_repeat": "Describe a snowy morning."},
     "Describe a snowy\nmorning. The snow falls softly.", "The snow falls softly."),
    ("repeat_request", {"prompt_to_repeat": "Describe a snowy morning."},
     "Describe a snowy morning. It is white.", "Describe a snowy morning."),  # repeating alone is no answer
    ("two_responses", {}, "Tea is warm.\n******\nCoffee is strong.", "Tea is warm."),
    ("two_responses", {}, "******\nTea.\n******\nCoffee.", "Tea.\n******\nTea."),  # the two must differ
    ("first_word", {"word": "Today"}, "**Today** we rest.", "We rest today."),
    ("last_word", {"word": "today"}, "We rest TODAY!", "Today we rest."),
    ("nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
     "We woke.\n\nThen we ate.", "We woke.\n\nWe ate."),
    ("nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Then"},
     "We woke.\n***\nthen we ate.", "We woke.\n\nThen we ate.\n\nThen we slept."),
]


def test_every_registered_verifier_has_cases():
    assert {case[0] for case in CASES} == set(VERIFIERS)


def test_registry_is_large_enough():
    assert len(VERIFIERS) >= 25
    assert all(name == spec.name for name, spec in VERIFIERS.items())


@pytest.mark.parametrize(("name", "args", "passing", "failing"), CASES)
def test_check_passes_and_fails(name, args, passing, failing):
    check = VERIFIERS[name].check
    assert check(passing, **args) is True
    assert check(failing, **args) is False
    # Loose mode accepts everything strict mode accepts.
    assert check(passing, strict=False, **args) is True


@pytest.mark.parametrize(("name", "args", "passing", "failing"), CASES)
def test_constraint_agrees_with_raw_check(name, args, passing, failing):
    constraint = Constraint(type=name, args=args)
    assert constraint.check(passing) is True
    assert verify([constraint], failing) == Verdict(passed=False, score=0.0, checks=[False])


@pytest.mark.parametrize("name", sorted(VERIFIERS))
@pytest.mark.parametrize("blank", ["", "   \n\t "])
def test_blank_response_fails_every_verifier(name, blank):
    args = Constraint(type=name, args=VERIFIERS[name].sample_args(random.Random(0))).args
    assert VERIFIERS[name].check(blank, **args) is False
    assert VERIFIERS[name].check(blank, strict=False, **args) is False


LOOSE_ONLY = [
    ("all_lowercase", {}, "Here is my answer:\nall lowercase text."),  # first line dropped
    ("start_with_phrase", {"phrase": "Hello there"}, "**Hello there** friend."),  # markdown stripped
    ("json_format", {}, '```json\n{"a": 1}\n```'),  # code fence: first and last line dropped
    ("end_with_phrase", {"phrase": "Hope this helps."}, "Tea is hot. Hope this helps.\nLet me know!"),
    ("quotation_wrapped", {}, 'Sure:\n"All done."'),
    ("first_word", {"word": "Today"}, "Answer\nToday we rest."),
]


@pytest.mark.parametrize(("name", "args", "response"), LOOSE_ONLY)
def test_loose_mode_accepts_what_strict_rejects(name, args, response):
    assert VERIFIERS[name].check(response, strict=True, **args) is False
    assert VERIFIERS[name].check(response, strict=False, **args) is True


def test_loose_mode_still_fails_when_no_variant_passes():
    # The capitalized middle line survives every variant.
    assert VERIFIERS["all_lowercase"].check("Foo\nBar\nBaz", strict=False) is False
    assert VERIFIERS["word_count_max"].check("a b c d\ne f g h\ni j k l", strict=False, max_words=3) is False


def test_loose_variants():
    variants = loose_variants("# *Title*\nbody\nend")
    assert variants[0] == "# *Title*\nbody\nend"
    assert set(variants) == {
        "# *Title*\nbody\nend", "body\nend", "# *Title*\nbody", "body",
        "# Title\nbody\nend", "# Title\nbody",
    }


@pytest.mark.parametrize("name", sorted(VERIFIERS))
def test_describe_and_sample_args(name):
    spec = VERIFIERS[name]
    for seed in range(20):
        args = spec.sample_args(random.Random(seed))
        constraint = Constraint(type=name, args=args)  # sampled arguments always validate
        text = spec.describe(constraint.args)
        assert text.strip() == text and len(text) > 15 and text[-1] in ".:!?"
        assert "\n" not in text
        assert constraint.describe() == text
    if spec.args_model.model_fields:
        assert spec.sample_args(random.Random(0)) != {}
    else:
        assert spec.sample_args(random.Random(0)) == {}


def test_sampled_numbers_stay_small():
    # The policy answers in about a hundred tokens; sampled demands must fit.
    rng = random.Random(1)
    for _ in range(50):
        assert VERIFIERS["word_count_max"].sample_args(rng)["max_words"] <= 60
        assert VERIFIERS["word_count_min"].sample_args(rng)["min_words"] <= 30
        assert 2 <= VERIFIERS["bullet_count_exact"].sample_args(rng)["num_bullets"] <= 4
        assert 2 <= VERIFIERS["sentence_count"].sample_args(rng)["num_sentences"] <= 5


def test_constraint_rejects_unknown_type_and_lists_allowed():
    with pytest.raises(ValueError, match="unknown constraint type 'shout'") as error:
        Constraint(type="shout")
    assert "all_lowercase" in str(error.value) and "word_count_max" in str(error.value)


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("word_count_max", {}, "missing argument 'max_words'"),
        ("word_count_max", {"max_words": "many"}, "bad argument 'max_words'"),
        ("word_count_max", {"max_words": 0}, "bad argument 'max_words'"),
        ("all_lowercase", {"loud": True}, "unexpected argument 'loud'"),
        ("keyword_frequency", {"keyword": "tea", "relation": "exactly", "frequency": 2}, "bad argument 'relation'"),
        ("keywords_include", {"keywords": []}, "bad argument 'keywords'"),
        ("letter_frequency", {"letter": "ab", "relation": "at least", "frequency": 2}, "bad argument 'letter'"),
        ("first_word", {"word": "two words"}, "bad argument 'word'"),
        ("postscript", {"marker": "PS"}, "bad argument 'marker'"),
        ("response_language", {"language": "xx"}, "bad argument 'language'"),
        ("nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "So"},
         "nth_paragraph (3) must not exceed num_paragraphs (2)"),
        ("title", ["not", "a", "dict"], "args must be an object"),
    ],
)
def test_constraint_rejects_bad_args(name, args, expected):
    with pytest.raises(ValueError) as error:
        Constraint(type=name, args=args)
    message = str(error.value)
    assert f"constraint '{name}'" in message
    assert expected in message


def test_constraint_normalizes_args():
    constraint = Constraint(type="keywords_include", args={"keywords": (" tea ", "cake")})
    assert constraint.args == {"keywords": ["tea", "cake"]}
    assert Constraint(type="title").args == {}
    assert Constraint.model_validate({"type": "title", "args": None}).args == {}


def test_constraint_is_frozen_and_forbids_extra_fields():
    constraint = Constraint(type="title")
    with pytest.raises(ValueError):
        constraint.type = "no_commas"
    with pytest.raises(ValueError, match="extra"):
        Constraint(type="title", weight=2)


def test_verify_scores_fraction_satisfied():
    constraints = [Constraint(type="all_lowercase"), Constraint(type="no_commas"),
                   Constraint(type="word_count_max", args={"max_words": 3})]
    assert verify(constraints, "tea and cake") == Verdict(passed=True, score=1.0, checks=[True, True, True])
    partial = verify(constraints, "tea, cake and jam")
    assert (partial.passed, partial.checks) == (False, [True, False, False])
    assert partial.score == pytest.approx(1 / 3)
    assert verify(constraints, "Tea, Cake, Jam, Pie") == Verdict(passed=False, score=0.0, checks=[False] * 3)


def test_verify_strict_vs_loose():
    constraints = [Constraint(type="all_lowercase"), Constraint(type="no_commas")]
    response = "Sure!\nhere you go"
    assert verify(constraints, response).checks == [False, True]
    assert verify(constraints, response, strict=False) == Verdict(passed=True, score=1.0, checks=[True, True])


def test_verify_rejects_empty_constraints():
    with pytest.raises(ValueError, match="nothing to verify"):
        verify([], "anything")


def test_compatible():
    assert compatible(["all_lowercase", "no_commas", "title"]) is True
    assert compatible([]) is True
    assert compatible(["all_lowercase", "all_uppercase"]) is False
    assert compatible(["all_uppercase", "all_lowercase"]) is False
    assert compatible(["capital_word_frequency", "all_lowercase"]) is False
    assert compatible(["json_format", "bullet_count_exact"]) is False
    assert compatible(["two_responses", "json_format"]) is False
    assert compatible(["start_with_phrase", "repeat_request"]) is False
    assert compatible(["no_commas", "no_commas"]) is False  # the same type twice
    with pytest.raises(ValueError, match="unknown constraint type 'nope'"):
        compatible(["title", "nope"])


def test_conflicts_are_symmetric_and_known():
    for name, spec in VERIFIERS.items():
        assert name not in spec.conflicts
        for other in spec.conflicts:
            assert other in VERIFIERS
            assert name in VERIFIERS[other].conflicts
            assert compatible([name, other]) is False
            assert compatible([other, name]) is False


# --- answers that copy their instructions ------------------------------------------------------------------------

@pytest.mark.parametrize("kind, args, echo", [
    ("bullet_count_exact", {"num_bullets": 2}, "* This is a point.\n* This is a point."),
    ("numbered_list_count", {"num_items": 2}, "1. This is an item\n2. Tea"),
    ("title", {}, "<<My Title>>\n\nTea is a drink."),
    ("highlighted_sections", {"num_highlights": 1}, "*highlighted section* Tea is a drink."),
    ("last_word", {"word": "again"}, 'The last word of your response must be "again".'),
    ("all_uppercase", {}, "YOUR ENTIRE RESPONSE MUST BE IN ENGLISH AND IN ALL CAPITAL LETTERS."),
])
def test_an_answer_that_copies_its_instruction_is_named(kind, args, echo):
    constraint = Constraint(type=kind, args=args)
    assert constraint.check(echo)  # the check alone is met by the copy
    found = echoed_instruction([constraint], echo)
    assert found is not None
    if kind in INSTRUCTION_EXAMPLES:
        assert found == f'the example "{INSTRUCTION_EXAMPLES[kind][0]}"'
    else:
        assert constraint.describe() in found


@pytest.mark.parametrize("kind, args, answer", [
    ("bullet_count_exact", {"num_bullets": 2}, "* Boil the water.\n* Steep the leaves."),
    ("title", {}, "<<A Cup of Tea>>\n\nTea is a drink."),
    # The words an instruction asks for are not a copy, however long.
    ("end_with_phrase", {"phrase": "Is there anything else I can help with?"},
     "Tea is a drink. Is there anything else I can help with?"),
    ("start_with_phrase", {"phrase": "Let me explain it to you in detail"},
     "Let me explain it to you in detail: tea is a drink."),
    ("repeat_request", {"prompt_to_repeat": "Describe your favourite kind of tea in a few words"},
     "Describe your favourite kind of tea in a few words. Green tea, fresh and grassy."),
    ("postscript", {"marker": "P.S."}, "Tea is a drink.\n\nP.S. Try it with lemon."),
])
def test_an_answer_that_follows_its_instruction_copies_nothing(kind, args, answer):
    constraint = Constraint(type=kind, args=args)
    assert constraint.check(answer)
    assert echoed_instruction([constraint], answer) is None


def test_echo_ngram_sets_how_many_words_make_a_copy():
    constraint = Constraint(type="last_word", args={"word": "again"})
    answer = "Remember: the last word of your answer is again"  # shares "the last word of your" (5 words)
    assert echoed_instruction([constraint], answer, ngram=5) is not None
    assert echoed_instruction([constraint], answer, ngram=6) is None
    with pytest.raises(ValueError, match="at least 2"):
        echoed_instruction([constraint], answer, ngram=1)


@pytest.mark.parametrize(("name", "args", "limits"), [
    ("bullet_count_exact", {"num_bullets": 3}, True),
    ("numbered_list_count", {"num_items": 2}, True),
    ("paragraph_count", {"num_paragraphs": 2}, True),
    ("section_count", {"section_word": "SECTION", "num_sections": 2}, True),
    ("word_count_max", {"max_words": 40}, True),
    ("two_responses", {}, True),
    ("sentence_count", {"relation": "at most", "num_sentences": 3}, True),
    ("capital_word_frequency", {"relation": "at most", "frequency": 2}, True),
    ("sentence_count", {"relation": "at least", "num_sentences": 3}, False),
    ("word_count_min", {"min_words": 20}, False),
    ("highlighted_sections", {"num_highlights": 2}, False),
    ("no_commas", {}, False),
    ("end_with_phrase", {"phrase": "That is all."}, False),
])
def test_limits_length_holds_for_exact_counts_and_upper_limits(name, args, limits) -> None:
    """A longer answer can break these once met, so a cut-off answer meeting them has not shown it would stop."""
    assert limits_length(name, args) is limits


@pytest.mark.parametrize(("name", "args", "met", "more"), [
    ("bullet_count_exact", {"num_bullets": 3}, "* a\n* b\n* c", "\n* d"),
    ("word_count_max", {"max_words": 40}, "short answer", " word" * 40),
])
def test_more_text_breaks_a_met_instruction_that_limits_length(name, args, met, more) -> None:
    assert limits_length(name, args)
    assert verify([Constraint(type=name, args=args)], met).passed
    assert not verify([Constraint(type=name, args=args)], met + more).passed


def test_limits_length_refuses_an_unknown_type() -> None:
    with pytest.raises(KeyError, match="unknown constraint type 'bullets'"):
        limits_length("bullets", {})
