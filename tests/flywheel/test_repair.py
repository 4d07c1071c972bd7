"""Verifier-guided repair: each fixer makes its own check pass, fixes compose, and a repair that breaks an instruction
the answer met, or gains nothing, makes no row."""

import itertools
import json
import random
from pathlib import Path

import pandas as pd
import pytest

from flywheel.config import FlywheelConfig, RepairConfig, load_config
from flywheel.prompts import Constraint, Prompt
from flywheel.repair import (
    ANCHOR_ORIGIN,
    FIXERS,
    augment_rows,
    number_words,
    plain_anchor_rows,
    repair,
    repair_samples,
    shorten,
    trim_unfinished,
)
from flywheel.strategies import build_strategy_data
from flywheel.verifiers import VERIFIERS, _paragraphs, compatible, verify

ANSWER = "Gardens are calm, and they are green. We walk there every day, very slowly. Then we go home and"

FIXER_CASES = [
    ("forbidden_words", {"forbidden_words": ["very", "just"]}),
    ("no_commas", {}),
    ("word_count_max", {"max_words": 10}),
    ("bullet_count_exact", {"num_bullets": 2}),
    ("numbered_list_count", {"num_items": 2}),
    ("section_count", {"section_word": "Part", "num_sections": 2}),
    ("highlighted_sections", {"num_highlights": 2}),
    ("title", {}),
    ("start_with_phrase", {"phrase": "Hello there"}),
    ("first_word", {"word": "Today"}),
    ("postscript", {"marker": "P.S."}),
    ("postscript", {"marker": "P.P.S."}),
    ("end_with_phrase", {"phrase": "That is all."}),
    ("ends_with_question", {}),
    ("all_lowercase", {}),
    ("all_uppercase", {}),
    ("quotation_wrapped", {}),
    ("no_digits", {}),
    ("keywords_include", {"keywords": ["water", "morning"]}),
    ("placeholders", {"num_placeholders": 2}),
    ("sentence_count", {"relation": "at most", "num_sentences": 1}),
    ("paragraph_count", {"num_paragraphs": 2}),
    ("repeat_request", {"prompt_to_repeat": "Describe a sunny day."}),
    ("last_word", {"word": "today"}),
    ("capital_word_frequency", {"relation": "at least", "frequency": 2}),
    ("capital_word_frequency", {"relation": "at most", "frequency": 1}),
    ("json_format", {}),
]

# Answers for the cases ANSWER already meets.
CASE_ANSWERS = {
    "no_digits": "We walk 2 miles in 15 minutes, at 7 every day. Our code is 123456. Then we go home and",
    "capital_word_frequency": "Gardens are CALM, and they are GREEN. We walk there EVERY day. Then we go home and",
}


def test_every_fixer_has_a_case_and_a_verifier():
    assert {name for name, _ in FIXER_CASES} == set(FIXERS)
    assert set(FIXERS) <= set(VERIFIERS)


@pytest.mark.parametrize(("kind", "args"), FIXER_CASES)
def test_each_fixer_makes_its_failing_check_pass(kind, args):
    constraint = Constraint(type=kind, args=args)
    answer = CASE_ANSWERS.get(kind, ANSWER) if args.get("relation") != "at least" else ANSWER
    assert not constraint.check(answer)
    fixed = repair([constraint], answer)
    assert constraint.check(fixed), fixed
    assert "home and" not in fixed.lower()  # the answer was cut off mid-sentence: repaired answers end on a sentence


def test_a_first_word_and_no_commas_are_repaired_together():
    # The first-word fix writes "Yes, ..." after the comma fix has run; the comma must go again, whether or not the
    # sampled answer had commas of its own.
    constraints = [Constraint(type="first_word", args={"word": "Yes"}), Constraint(type="no_commas")]
    for answer, fixed in (("I can help, truly. It is fine.", "Yes I can help truly. It is fine."),
                          ("We can help. It is fine.", "Yes we can help. It is fine.")):
        assert repair(constraints, answer) == fixed
        assert verify(constraints, fixed).passed
    # Without no_commas among the types to fix, the comma stays (and the repair does not pass).
    assert repair(constraints, "We can help. It is fine.", types=["first_word"]) == "Yes, we can help. It is fine."


def test_an_added_ending_keeps_the_case_the_answer_met():
    # The answer met all_lowercase and failed only the question: the added question is in lower case too.
    constraints = [Constraint(type="all_lowercase"), Constraint(type="ends_with_question")]
    fixed = repair(constraints, "the morning is quiet. birds sing softly")
    assert fixed == "the morning is quiet. would you like to know more?" and verify(constraints, fixed).passed
    shouting = [Constraint(type="all_uppercase"), Constraint(type="postscript", args={"marker": "P.S."})]
    assert verify(shouting, repair(shouting, "THE OCEAN IS BIG. IT IS BLUE.")).passed


def test_a_last_word_after_a_closing_question_keeps_the_question():
    constraints = [Constraint(type="ends_with_question"), Constraint(type="last_word", args={"word": "soon"})]
    fixed = repair(constraints, "We walk there every day. Then we go home and")
    assert fixed == "We walk there every day. Would you like to know more? One last word: soon?"
    assert verify(constraints, fixed).passed
    assert repair(constraints[1:], "We walk there.") == "We walk there. One last word: soon."


def test_a_fix_run_again_never_costs_another_instruction():
    # Capitals would turn the JSON answer's escaped line break into an invalid escape: the JSON form is kept.
    constraints = [Constraint(type="all_uppercase"), Constraint(type="json_format")]
    fixed = repair(constraints, "1. Sleep well.\n2. Eat breakfast.")
    assert constraints[1].check(fixed) and not constraints[0].check(fixed)


COMPOSE_ANSWERS = [
    ANSWER,
    "I think the best way to water plants is simple. First, check the soil. Then pour slowly, 2 cups at a time.",
    "1. Sleep well.\n2. Eat breakfast.\n3. Take breaks, often.",
    "Sure! Here's a short poem:\n\nThe sky is blue, the sea is wide,\nAnd I walk slowly by its side.",
    "THE OCEAN IS BIG. IT IS BLUE.",
    "the morning is quiet. birds sing softly",
]


def test_the_default_recipes_fixes_compose_in_pairs():
    # Every compatible pair of the default recipe's repair types: where each fix alone repairs an answer, both
    # together repair it too. The one known exception: capitals cannot reach a JSON answer's escaped line break.
    types = load_config(Path(__file__).resolve().parents[2] / "configs" / "default.yaml").strategy.repair.types
    rng, checked, failed = random.Random(0), 0, []
    for first, second in itertools.combinations(types, 2):
        if not compatible([first, second]):
            continue
        constraints = [Constraint(type=t, args=VERIFIERS[t].sample_args(rng)) for t in (first, second)]
        for answer in COMPOSE_ANSWERS:
            if not all(verify([c], repair([c], answer, types=types)).passed for c in constraints):
                continue
            checked += 1
            if not verify(constraints, repair(constraints, answer, types=types)).passed:
                failed.append((first, second, answer))
    assert checked > 500
    assert {(a, b) for a, b, _ in failed} <= {("all_uppercase", "json_format")}, failed
    assert all("\n" in answer for *_, answer in failed)


def test_the_first_word_fix_keeps_the_pronoun_i_in_capitals():
    today = [Constraint(type="first_word", args={"word": "Today"})]
    assert repair(today, "I'll walk there.") == "Today, I'll walk there."
    assert repair(today, "It is warm.") == "Today, it is warm."


def test_the_first_word_fix_keeps_a_word_in_capitals():
    today = [Constraint(type="first_word", args={"word": "Today"})]
    assert repair(today, "AI helps us. It is new.") == "Today, AI helps us. It is new."


STRUCTURED_ANSWERS = {
    "numbered": ("1. Sleep well.\n2. Eat breakfast.", Constraint(type="numbered_list_count", args={"num_items": 2})),
    "bullets": ("* Sleep well.\n* Eat breakfast.", Constraint(type="bullet_count_exact", args={"num_bullets": 2})),
    "sections": ("SECTION 1\nSleep well.\n\nSECTION 2\nEat breakfast.",
                 Constraint(type="section_count", args={"section_word": "SECTION", "num_sections": 2})),
    "bold sections": ("**PART 1**\nSleep well.\n\n**PART 2**\nEat breakfast.",
                      Constraint(type="section_count", args={"section_word": "PART", "num_sections": 2})),
}


@pytest.mark.parametrize("structure", list(STRUCTURED_ANSWERS))
@pytest.mark.parametrize("opening", [Constraint(type="first_word", args={"word": "Yes"}),
                                     Constraint(type="start_with_phrase", args={"phrase": "Here is my answer"})])
def test_an_opening_goes_on_a_line_of_its_own_before_a_list_or_section(structure, opening):
    # "Yes, 1. Sleep well." or "Here is my answer. SECTION 1" would break the first item or marker; one newline (not
    # a blank line) keeps the structure and the number of paragraphs.
    answer, structured = STRUCTURED_ANSWERS[structure]
    fixed = repair([opening, structured], answer)
    assert fixed.endswith("\n" + answer) and "\n" not in fixed[: -len(answer) - 1]
    assert verify([opening, structured], fixed).passed
    assert len(_paragraphs(fixed)) == len(_paragraphs(answer))


@pytest.mark.parametrize("structure", list(STRUCTURED_ANSWERS))
def test_a_title_is_not_made_of_a_list_or_section_marker(structure):
    # "<<SECTION 1>>" would count as one more section, "<<1>>" says nothing: the title is the first item's words.
    answer, structured = STRUCTURED_ANSWERS[structure]
    fixed = repair([Constraint(type="title"), structured], answer)
    assert fixed.startswith("<<Sleep Well>>\n\n") and verify([Constraint(type="title"), structured], fixed).passed


def test_digits_are_written_out_as_words():
    fixed = repair([Constraint(type="no_digits")], CASE_ANSWERS["no_digits"])
    assert fixed == ("We walk two miles in fifteen minutes, at seven every day. Our code is one two three four five "
                     "six.")
    assert [number_words(n) for n in (0, 42, 105, 1200, 9999)] == [
        "zero", "forty-two", "one hundred five", "one thousand two hundred",
        "nine thousand nine hundred ninety-nine"]


def test_keywords_and_placeholders_come_after_the_first_sentence_and_keep_both_ends():
    constraints = [Constraint(type="keywords_include", args={"keywords": ["garden", "water"]}),
                   Constraint(type="placeholders", args={"num_placeholders": 1}),
                   Constraint(type="start_with_phrase", args={"phrase": "Of course"}),
                   Constraint(type="end_with_phrase", args={"phrase": "That is all."}),
                   Constraint(type="no_commas")]
    answer = "Of course. Gardens need water, light and care. That is all."
    fixed = repair(constraints, answer)
    assert verify(constraints, fixed).passed, fixed
    # "water" is there already: only the missing keyword is added.
    assert fixed == ("Of course. Fill in [name] as needed. Key words: garden. Gardens need water light and care. "
                     "That is all.")
    listed = repair([Constraint(type="keywords_include", args={"keywords": ["quiet"]})], "1. Water it. Then wait")
    assert listed == "1. Water it. Key words: quiet.", listed  # "1. " opens an item: it ends no sentence


def test_surplus_paragraphs_and_sentences_are_dropped():
    three = "One is here.\n\nTwo is here.\n\nThree is here."
    assert repair([Constraint(type="paragraph_count", args={"num_paragraphs": 2})], three) == (
        "One is here.\n\nTwo is here.")
    assert repair([Constraint(type="sentence_count", args={"relation": "at most", "num_sentences": 2})], three) == (
        "One is here. Two is here.")
    # Too few sentences to add: an "at least" count and a paragraph split without enough sentences stay as they are.
    at_least = Constraint(type="sentence_count", args={"relation": "at least", "num_sentences": 5})
    assert repair([at_least], three) == three
    assert repair([Constraint(type="paragraph_count", args={"num_paragraphs": 3})], "Only one sentence.") == (
        "Only one sentence.")


def test_capital_words_are_added_for_emphasis_or_lose_their_capitals():
    at_least = repair([Constraint(type="capital_word_frequency", args={"relation": "at least", "frequency": 2})],
                      "I like my garden and the water.")
    assert at_least == "I LIKE my GARDEN and the water."
    at_most = repair([Constraint(type="capital_word_frequency", args={"relation": "at most", "frequency": 1})],
                     "The GARDEN and the WATER are CALM.")
    assert at_most == "The GARDEN and the Water are Calm."


def test_a_json_answer_holds_the_trimmed_text_and_a_repeated_request_comes_first():
    assert json.loads(repair([Constraint(type="json_format")], ANSWER)) == {
        "answer": "Gardens are calm, and they are green. We walk there every day, very slowly."}
    assert repair([Constraint(type="last_word", args={"word": "today"})], ANSWER).endswith(
        "very slowly. One last word: today.")
    shouted = [Constraint(type="json_format"), Constraint(type="all_uppercase")]
    assert verify(shouted, repair(shouted, 'Calm "water".\nBirds sing')).passed
    repeated = repair([Constraint(type="repeat_request", args={"prompt_to_repeat": "Describe a sunny day."})], ANSWER)
    assert repeated.startswith("Describe a sunny day.\n\nGardens are calm")


def test_a_passing_answer_is_left_exactly_as_it_is():
    constraint = Constraint(type="no_commas")
    assert repair([constraint], "No commas here and cut off") == "No commas here and cut off"


def test_types_without_a_fixer_and_types_left_out_are_not_touched():
    keywords = Constraint(type="keyword_frequency", args={"keyword": "water", "relation": "at least", "frequency": 2})
    assert repair([keywords], ANSWER) == ANSWER
    lowercase = Constraint(type="all_lowercase")
    assert repair([lowercase], ANSWER, types=["no_commas"]) == ANSWER


def test_fixes_compose_in_order_case_last_and_quotes_outermost():
    constraints = [Constraint(type="all_uppercase"), Constraint(type="start_with_phrase", args={"phrase": "Of course"}),
                   Constraint(type="no_commas")]
    fixed = repair(constraints, ANSWER)
    assert verify(constraints, fixed).passed, fixed
    assert fixed.startswith("OF COURSE. GARDENS ARE CALM AND")
    wrapped = repair([Constraint(type="all_lowercase"), Constraint(type="quotation_wrapped")], ANSWER)
    assert wrapped.startswith('"gardens') and wrapped.endswith('slowly."')


LIST = "Here are some tips:\n* Eat well.\n* Sleep more.\n* Walk daily.\n* Drink water.\n* Read every"


def test_prose_becomes_the_asked_structure_by_grouping_its_sentences():
    bullets = repair([Constraint(type="bullet_count_exact", args={"num_bullets": 2})], ANSWER)
    assert bullets == "* Gardens are calm, and they are green.\n* We walk there every day, very slowly."
    three = "One is here. Two is here. Three is here."
    assert repair([Constraint(type="numbered_list_count", args={"num_items": 2})], three) == (
        "1. One is here.\n2. Two is here. Three is here.")
    sections = repair([Constraint(type="section_count", args={"section_word": "SECTION", "num_sections": 2})], three)
    assert sections == "SECTION 1\nOne is here.\n\nSECTION 2\nTwo is here. Three is here."


def test_a_list_keeps_its_introduction_and_loses_only_surplus_items():
    three = repair([Constraint(type="bullet_count_exact", args={"num_bullets": 3})], LIST)
    assert three == "Here are some tips:\n* Eat well.\n* Sleep more.\n* Walk daily."
    # A list in the other style is re-marked, its items grouped to the asked count.
    numbered = repair([Constraint(type="numbered_list_count", args={"num_items": 2})], LIST)
    assert numbered == "Here are some tips:\n1. Eat well. Sleep more.\n2. Walk daily. Drink water."
    sections = "Part 1\nA is good.\nPart 2\nB is good.\nPart 3\nC is good."
    assert repair([Constraint(type="section_count", args={"section_word": "Part", "num_sections": 2})], sections) == (
        "Part 1\nA is good.\nPart 2\nB is good.")
    # Markers in another case are re-cased, not added again.
    assert repair([Constraint(type="section_count", args={"section_word": "PART", "num_sections": 2})],
                  "Part 1: A is good.\npart 2: B is good.") == "PART 1: A is good.\nPART 2: B is good."
    # A title stays ahead of the list, and a unit without a letter is not an item.
    titled = repair([Constraint(type="numbered_list_count", args={"num_items": 2})],
                    "<<Sleep>>\nSleep well.\nRest often.\n3.")
    assert titled == "<<Sleep>>\n1. Sleep well.\n2. Rest often."


def test_structure_that_cannot_be_made_is_left_alone():
    # Two sentences cannot become four bullets, and a list with too few items has nothing to split.
    four = Constraint(type="bullet_count_exact", args={"num_bullets": 4})
    assert repair([four], "One point. Two points.") == "One point. Two points."
    assert repair([four], "* One point.\n* Two points.") == "* One point.\n* Two points."


def test_highlights_and_titles_mark_up_the_answers_own_words():
    highlighted = repair([Constraint(type="highlighted_sections", args={"num_highlights": 2})], "* Eat well.\n* Rest.")
    assert highlighted == "* **Eat well.**\n* **Rest.**"
    both = [Constraint(type="highlighted_sections", args={"num_highlights": 2}),
            Constraint(type="bullet_count_exact", args={"num_bullets": 2})]
    assert verify(both, repair(both, "* Eat well.\n* Rest *now*.")).passed
    assert repair([Constraint(type="title")], "Tea, in short, is good.") == "<<Tea>>\n\nTea, in short, is good."
    assert repair([Constraint(type="title")], LIST).startswith("<<Here Are Some Tips>>\n\nHere are some tips:\n")


def test_trim_unfinished_keeps_complete_sentences_and_lines():
    assert trim_unfinished("One. Two! Three and") == "One. Two!"
    assert trim_unfinished("* a point\n* another poi") == "* a point"
    assert trim_unfinished('He said "stop." Then') == 'He said "stop."'
    assert trim_unfinished("no sentence end at all") == "no sentence end at all"
    assert trim_unfinished("1. Water the garden.\n\n2. Wait") == "1. Water the garden."  # not "...\n\n2."


def _prompt(pid, constraints):
    return Prompt(id=pid, prompt=f"Write about {pid}.", constraints=constraints)


def _samples(rows, finished=True):
    return pd.DataFrame([
        {"row_id": f"{pid}-s{i}", "prompt_id": pid, "prompt": f"Write about {pid}.", "sample_index": i,
         "response": text, "n_tokens": 5, "finished": finished, "score": score, "passed": score == 1.0,
         "checks": json.dumps({}), "judge": "verifier", "verdict": verdict, "critique": "", "llm_verdict": "",
         "llm_critique": ""}
        for pid, i, text, score, verdict in rows
    ])


def test_a_repair_ends_its_turn_when_its_answer_ended_or_the_fix_gave_it_an_ending():
    prompts = [_prompt("lower", [Constraint(type="all_lowercase")]),
               _prompt("phrase", [Constraint(type="end_with_phrase", args={"phrase": "That is all."})])]
    rows = [("lower", 0, "Cut Off. And", 0.0, "fail"), ("phrase", 0, "Cut off. And", 0.0, "fail")]
    cut_off = repair_samples(prompts, _samples(rows, finished=False), RepairConfig()).sft
    assert dict(zip(cut_off["prompt_id"], cut_off["ended"])) == {"lower": False, "phrase": True}
    finished = repair_samples(prompts, _samples(rows, finished=True), RepairConfig()).sft
    assert finished["ended"].tolist() == [True, True]


def test_repair_samples_pairs_the_best_repair_with_its_own_original():
    prompts = [
        _prompt("lower", [Constraint(type="all_lowercase"), Constraint(type="no_commas")]),
        # Adding the closing phrase would break the word limit the answer meets: no repair counts.
        _prompt("limit", [Constraint(type="word_count_max", args={"max_words": 3}),
                          Constraint(type="end_with_phrase", args={"phrase": "That is all and more."})]),
        _prompt("none", [Constraint(type="word_count_min", args={"min_words": 20})]),
    ]
    samples = _samples([
        ("lower", 0, "Cats, dogs and Birds. More, More, more.", 0.0, "fail"),
        ("lower", 1, "cats, dogs.", 0.5, "fail"),  # the smaller edit wins among equal repairs
        ("limit", 0, "Short one.", 0.5, "fail"),
        ("none", 0, "Too short.", 0.0, "fail"),
        ("none", 1, "Also none.", 0.0, "none"),  # no verdict: never used
    ])
    result = repair_samples(prompts, samples, RepairConfig())
    assert list(result.pairs["prompt_id"]) == ["lower"]
    pair = result.pairs.iloc[0]
    assert (pair.chosen, pair.rejected) == ("cats dogs.", "cats, dogs.")
    assert (pair.chosen_score, pair.rejected_score) == (1.0, 0.5)
    assert (pair.origin, pair.judge) == ("repair:pair", "verifier")
    # One SFT row per prompt: the paired repair, not every sample's near-copy.
    assert list(result.sft["completion"]) == ["cats dogs."] and list(result.sft["origin"]) == ["repair:accepted"]
    assert result.stats == {"attempted": 3.0, "improved": 2.0, "pairs": 1.0, "passed": 1.0}


def test_a_repair_that_improves_without_passing_makes_a_pair_but_no_sft_row():
    prompts = [_prompt("p", [Constraint(type="no_commas"), Constraint(type="word_count_min",
                                                                    args={"min_words": 20})])]
    result = repair_samples(prompts, _samples([("p", 0, "A, b.", 0.0, "fail")]), RepairConfig())
    assert list(result.pairs["chosen"]) == ["A b."] and result.pairs.iloc[0].chosen_score == 0.5
    assert result.sft.empty and {"completion", "origin", "judge"} <= set(result.sft.columns)


def test_a_repair_that_copies_its_instructions_is_not_accepted_with_echo_ngram():
    prompts = [_prompt("titled", [Constraint(type="title"), Constraint(type="all_lowercase")])]
    samples = _samples([("titled", 0, "<<my title>>\n\nTea Is Good.", 0.5, "fail"),
                        ("titled", 1, "<<On Tea>>\n\nTea Is Good.", 0.0, "fail")])
    # Without the setting the copy, the earlier sample, wins; with it, only the answer's own title counts.
    assert repair_samples(prompts, samples, RepairConfig()).sft["completion"].tolist() == [
        "<<my title>>\n\ntea is good."]
    result = repair_samples(prompts, samples, RepairConfig(), echo_ngram=6)
    assert result.sft["completion"].tolist() == ["<<on tea>>\n\ntea is good."]
    assert result.stats["echoes"] == 1.0 and result.stats["passed"] == 1.0


def test_unknown_samples_prompt_is_an_error():
    with pytest.raises(ValueError, match="not among the round's prompts"):
        repair_samples([], _samples([("ghost", 0, "A, b.", 0.0, "fail")]), RepairConfig())


def test_repair_strategy_replaces_the_best_of_n_pair_of_its_prompt(tmp_path):
    config = FlywheelConfig.model_validate({"strategy": {"name": "repair"}})
    prompts = [_prompt("a", [Constraint(type="all_lowercase")]), _prompt("b", [Constraint(type="all_lowercase")])]
    samples = _samples([("a", 0, "Big Words.", 0.0, "fail"), ("a", 1, "small words.", 1.0, "pass"),
                        ("b", 0, "Only Capitals.", 0.0, "fail"), ("b", 1, "Still Capitals.", 0.0, "fail")])
    made = build_strategy_data(config, prompts, samples, champion_dir=tmp_path, base_dir=tmp_path, device="cpu")
    assert dict(zip(made.pairs["prompt_id"], made.pairs["origin"])) == {"a": "repair:pair", "b": "repair:pair"}
    assert set(made.sft["origin"]) == {"best_of_n:accepted", "repair:accepted"}
    assert made.stats["repair_pairs"] == 2.0 and made.stats["best_of_n_pairs"] == 1.0


def test_the_repair_strategy_passes_feedback_echo_ngram_to_its_repairs(tmp_path):
    prompts = [_prompt("titled", [Constraint(type="title"), Constraint(type="all_lowercase")])]
    samples = _samples([("titled", 0, "<<my title>>\n\nTea Is Good.", 0.5, "fail")])
    config = FlywheelConfig.model_validate({"strategy": {"name": "repair"}, "feedback": {"echo_ngram": 6}})
    made = build_strategy_data(config, prompts, samples, champion_dir=tmp_path, base_dir=tmp_path, device="cpu")
    assert made.sft.empty and made.stats["repair_echoes"] == 1.0


def test_repair_config_is_checked():
    with pytest.raises(ValueError, match="no repair for instruction type 'word_count_min'"):
        RepairConfig(types=["word_count_min"])
    with pytest.raises(ValueError, match="leave types out"):
        RepairConfig(types=[])
    with pytest.raises(ValueError, match="needs 'verifier' in feedback.judges"):
        FlywheelConfig.model_validate({"strategy": {"name": "repair"}, "feedback": {"judges": ["self"],
                                                                                     "llm_scope": "all"}})


def _sft(rows):
    return pd.DataFrame([{"row_id": f"{pid}-r{i}", "prompt_id": pid, "prompt": f"Write about {pid}.",
                          "completion": text, "score": score, "origin": "best_of_n:accepted", "judge": "verifier",
                          "ended": ended} for i, (pid, text, score, ended) in enumerate(rows)])


def test_augment_relabels_an_answer_that_already_meets_the_new_instruction():
    prompts = [_prompt("calm", [Constraint(type="keywords_include", args={"keywords": ["water"]})])]
    made = augment_rows(prompts, _sft([("calm", "The water is calm and still.", 1.0, True)]),
                        RepairConfig(types=["no_commas"], augment_per_row=1), seed=0)
    row = made.sft.iloc[0]
    assert row.prompt == "Write about calm. " + Constraint(type="no_commas").describe()
    assert (row.completion, row.origin, row.judge, row.prompt_id) == (
        "The water is calm and still.", "augment:relabelled", "verifier", "calm")
    assert made.stats == {"augmented": 1.0, "augment_relabelled": 1.0, "augment_repaired": 0.0}
    assert made.pairs.empty


def test_augment_repairs_an_answer_to_meet_the_new_instruction_and_keeps_its_own():
    prompts = [_prompt("calm", [Constraint(type="keywords_include", args={"keywords": ["water"]})])]
    made = augment_rows(prompts, _sft([("calm", "The water is calm. Birds sing, and", 1.0, False)]),
                        RepairConfig(types=["all_uppercase"], augment_per_row=1), seed=0)
    row = made.sft.iloc[0]
    assert row.completion == "THE WATER IS CALM."  # fixed and cut back to its last complete sentence
    assert row.origin == "augment:repaired" and not row.ended  # a case fix gives the answer no ending
    constraints = [*prompts[0].constraints, Constraint(type="all_uppercase")]
    assert verify(constraints, row.completion).passed


def test_augment_adds_distinct_compatible_instructions_deterministically():
    prompts = [_prompt("low", [Constraint(type="all_lowercase")])]
    sft = _sft([("low", "the sea is wide and blue.", 1.0, True), ("low", "not accepted, this one.", 0.5, True)])
    settings = RepairConfig(types=["all_uppercase", "no_commas", "ends_with_question", "quotation_wrapped"],
                            augment_per_row=2)
    made = augment_rows(prompts, sft, settings, seed=3)
    added = [row_id.rsplit("-augment-", 1)[1] for row_id in made.sft["row_id"]]
    assert len(added) == 2 and len(set(added)) == 2
    assert "all_uppercase" not in added  # it conflicts with the prompt's all_lowercase
    assert set(made.sft["prompt_id"]) == {"low"}  # the row below its score was not used
    assert augment_rows(prompts, sft, settings, seed=3).sft.equals(made.sft)
    for row in made.sft.itertuples():
        extra = row.prompt.removeprefix("Write about low. ")
        assert extra != row.prompt and row.completion.startswith(('"', "the sea"))


def test_augment_adds_only_augment_types_and_repairs_with_types():
    prompts = [_prompt(f"p{i}", [Constraint(type="keywords_include", args={"keywords": ["water"]})]) for i in range(6)]
    sft = _sft([(f"p{i}", "The water is calm, and still.", 1.0, True) for i in range(6)])
    types = ["no_commas", "all_uppercase", "all_lowercase", "quotation_wrapped", "ends_with_question"]
    everything = augment_rows(prompts, sft, RepairConfig(types=types, augment_per_row=1), seed=0)
    assert len({row_id.rsplit("-augment-", 1)[1] for row_id in everything.sft["row_id"]}) > 1
    only = augment_rows(prompts, sft, RepairConfig(types=types, augment_per_row=1, augment_types=["no_commas"]),
                        seed=0)
    assert {row_id.rsplit("-augment-", 1)[1] for row_id in only.sft["row_id"]} == {"no_commas"}
    assert list(only.sft["completion"]) == ["The water is calm and still."] * 6  # repaired by the comma fix
    assert set(only.sft["origin"]) == {"augment:repaired"}


def test_augment_passes_over_an_answer_that_copies_the_added_instruction_with_echo_ngram():
    # The answer carries the title instruction's own example: relabelled with that instruction, it would meet the
    # check by copying it, the row the verifier judge fails when it is a sample.
    prompts = [_prompt("low", [Constraint(type="all_lowercase")])]
    sft = _sft([("low", "<<my title>>\n\nthe sea is wide.", 1.0, True)])
    settings = RepairConfig(types=["title", "no_commas"], augment_per_row=1, augment_types=["title"])
    assert list(augment_rows(prompts, sft, settings, seed=0).sft["origin"]) == ["augment:relabelled"]
    assert augment_rows(prompts, sft, settings, seed=0, echo_ngram=6).sft.empty


def test_the_repair_strategy_passes_feedback_echo_ngram_to_augmentation(tmp_path):
    prompts = [_prompt("low", [Constraint(type="all_lowercase")])]
    samples = _samples([("low", 0, "<<my title>>\n\nthe sea is wide.", 1.0, "pass")])
    made = {}
    for echo in (None, 6):
        config = FlywheelConfig.model_validate({"strategy": {"name": "repair", "repair": {
            "types": ["title", "all_lowercase"], "augment_per_row": 1, "augment_types": ["title"]}},
            "feedback": {"echo_ngram": echo}})
        made[echo] = build_strategy_data(config, prompts, samples, champion_dir=tmp_path, base_dir=tmp_path,
                                         device="cpu")
    assert made[None].stats["repair_augmented"] == 1.0 and made[6].stats["repair_augmented"] == 0.0


def test_augment_types_are_checked():
    with pytest.raises(ValueError, match="no repair for instruction type 'word_count_min'"):
        RepairConfig(augment_per_row=1, augment_types=["word_count_min"])
    with pytest.raises(ValueError, match="leave augment_types out"):
        RepairConfig(augment_per_row=1, augment_types=[])
    with pytest.raises(ValueError, match="augment_per_row is 0"):
        RepairConfig(augment_types=["no_commas"])
    with pytest.raises(ValueError, match=r"augment_types \['all_uppercase'\] are not among types"):
        RepairConfig(types=["no_commas"], augment_per_row=1, augment_types=["no_commas", "all_uppercase"])
    assert RepairConfig(augment_per_row=1, augment_types=["all_uppercase"]).augment_types == ["all_uppercase"]


def test_augment_names_an_unknown_prompt():
    with pytest.raises(ValueError, match="not among the round's prompts"):
        augment_rows([], _sft([("ghost", "text.", 1.0, True)]), RepairConfig(augment_per_row=1), seed=0)


def test_the_repair_strategy_adds_augmented_rows_only_when_asked(tmp_path):
    prompts = [_prompt("a", [Constraint(type="all_lowercase")])]
    samples = _samples([("a", 0, "Big Words.", 0.0, "fail"), ("a", 1, "small words.", 1.0, "pass")])
    made = {}
    for per_row in (0, 1):
        config = FlywheelConfig.model_validate({"strategy": {"name": "repair", "repair": {
            "augment_per_row": per_row, "types": ["all_lowercase", "no_commas", "ends_with_question"]}}})
        made[per_row] = build_strategy_data(config, prompts, samples, champion_dir=tmp_path, base_dir=tmp_path,
                                            device="cpu")
    assert set(made[0].sft["origin"]) == {"best_of_n:accepted", "repair:accepted"}
    assert "repair_augmented" not in made[0].stats
    augmented = made[1].sft[made[1].sft["origin"].str.startswith("augment:")]
    assert len(augmented) == 2 == made[1].stats["repair_augmented"]  # one per accepted answer
    assert made[1].pairs.equals(made[0].pairs)


def test_shorten_keeps_the_leading_whole_sentences_within_the_word_limit():
    text = "One two three. Four five six. Seven eight nine."
    assert shorten(text, 6) == "One two three. Four five six."
    assert shorten(text, 5) == "One two three."
    assert shorten(text, 2) == "One two three."  # at least the first sentence
    assert shorten(text, 9) == text
    assert shorten("Intro line.\n1. First item here.\n2. Second item here.\n3.", 6) == "Intro line.\n1. First item here."
    assert shorten("no sentence end in these many words", 3) == "no sentence end in these many words"


def test_repair_shortens_only_answers_that_need_an_ending():
    ending = [Constraint(type="end_with_phrase", args={"phrase": "That is all."})]
    long = "One two three. Four five six. Seven eight."
    assert repair(ending, long, max_words=4) == "One two three. That is all."
    assert repair(ending, long) == "One two three. Four five six. Seven eight. That is all."
    met = "One two three. Four five six. That is all."
    assert repair(ending, met, max_words=4) == met
    # Only the ending needs room: a case fix keeps the whole answer.
    assert repair([Constraint(type="all_lowercase")], long, max_words=4) == long.lower()


def test_repair_samples_shortens_targets_unless_that_breaks_an_instruction():
    question = Constraint(type="ends_with_question")
    prompts = [_prompt("short", [question]),
               _prompt("min", [question, Constraint(type="word_count_min", args={"min_words": 12})])]
    text = "One two three four five. Six seven eight nine ten. Eleven twelve"
    rows = [("short", 0, text, 0.0, "fail"), ("min", 0, text, 0.5, "fail")]
    settings = RepairConfig(max_kept_words=8)
    sft = repair_samples(prompts, _samples(rows, finished=False), settings).sft.set_index("prompt_id")
    asked = " Would you like to know more?"
    assert sft.loc["short", "completion"] == "One two three four five." + asked
    # Shortened, "min" would lose its minimum length: the unshortened repair is kept.
    assert sft.loc["min", "completion"] == "One two three four five. Six seven eight nine ten." + asked
    unlimited = repair_samples(prompts, _samples(rows, finished=False), RepairConfig()).sft
    assert unlimited["completion"].tolist() == ["One two three four five. Six seven eight nine ten." + asked] * 2
    with pytest.raises(ValueError):
        RepairConfig(max_kept_words=4)


def _described(pid, task, constraints):
    """A prompt worded as the synthesizer words it: the task, then each instruction's own sentence."""
    return Prompt(id=pid, prompt=" ".join([task, *(c.describe() for c in constraints)]), constraints=constraints)


def _samples_of(prompt, rows, finished=True):
    table = _samples([(prompt.id, i, text, score, "fail") for i, (text, score) in enumerate(rows)], finished)
    return table.assign(prompt=prompt.prompt)


CONTRAST = RepairConfig(contrast_types=["quotation_wrapped", "all_lowercase", "ends_with_question"])


def test_a_contrast_row_answers_the_prompt_without_the_instruction_with_the_other_fixes_alone():
    quoted, commas = Constraint(type="quotation_wrapped"), Constraint(type="no_commas")
    prompt = _described("p", "Describe a garden.", [quoted, commas])
    result = repair_samples([prompt], _samples_of(prompt, [("Cats, dogs and birds. Then more.", 0.0)]), CONTRAST)
    rows = result.sft.set_index("origin")
    assert rows.loc["repair:accepted", "completion"] == '"Cats dogs and birds. Then more."'
    other = rows.loc["repair:contrast"]
    assert other.prompt == f"Describe a garden. {commas.describe()}" and other.prompt_id == "p"
    assert other.completion == "Cats dogs and birds. Then more."  # the same answer: commas gone, no quotes
    assert other.row_id == "p-contrast-quotation_wrapped" and other.ended and other.score == 1.0
    assert result.stats["contrast"] == 1.0 and result.stats["passed"] == 1.0
    # Off by default: the same samples give no contrast row.
    plain = repair_samples([prompt], _samples_of(prompt, [("Cats, dogs and birds. Then more.", 0.0)]),
                           RepairConfig())
    assert list(plain.sft["origin"]) == ["repair:accepted"] and "contrast" not in plain.stats


def test_a_contrast_without_other_instructions_is_the_trimmed_sample_and_keeps_it_open():
    lower = Constraint(type="all_lowercase")
    prompt = _described("p", "Describe a garden.", [lower])
    result = repair_samples([prompt], _samples_of(prompt, [("Big Words here. And then", 0.0)], finished=False),
                            CONTRAST)
    other = result.sft[result.sft["origin"] == "repair:contrast"].iloc[0]
    assert (other.prompt, other.completion, other.ended) == ("Describe a garden.", "Big Words here.", False)


def test_no_contrast_where_the_pair_would_not_show_the_instruction():
    lower, question = Constraint(type="all_lowercase"), Constraint(type="ends_with_question")
    cases = [
        # Not among contrast_types.
        (_described("a", "Describe a garden.", [Constraint(type="no_commas")]), "Cats, dogs.", finished := True),
        # The user's own wording: the instruction's sentence is not in the prompt to take out.
        (Prompt(id="b", prompt="Describe a garden, in lower case.", constraints=[lower]), "Big Words.", finished),
        # Without the instruction the answer opens a quotation nobody asked for.
        (_described("c", "Describe a garden.", [lower]), '"Big Words," he said. Then more.', finished),
    ]
    for prompt, text, done in cases:
        result = repair_samples([prompt], _samples_of(prompt, [(text, 0.0)], finished=done), CONTRAST)
        assert list(result.sft["origin"]) == ["repair:accepted"], prompt.id
        assert result.stats["contrast"] == 0.0
    # The answer met the question already: that instruction was not fixed, so it is not the one taken out.
    prompt = _described("d", "Describe a garden.", [question, lower])
    result = repair_samples([prompt], _samples_of(prompt, [("Is It Green?", 0.5)]), CONTRAST)
    other = result.sft[result.sft["origin"] == "repair:contrast"].iloc[0]
    assert other.row_id == "d-contrast-all_lowercase" and other.completion == "Is It Green?"


def test_a_contrast_prompt_that_is_a_held_out_one_is_passed_over(tmp_path):
    lower, commas = Constraint(type="all_lowercase"), Constraint(type="no_commas")
    prompt = _described("p", "Describe a garden in spring with flowers and birds and a small pond.", [commas, lower])
    held_out = _described("h", "Describe a garden in spring with flowers and birds and a small pond.", [commas])
    samples = _samples_of(prompt, [("Big Words, here.", 0.0)])
    made = {}
    for name, avoid in (("clean", ()), ("held", (held_out,))):
        config = FlywheelConfig.model_validate({"strategy": {"name": "repair", "repair": {
            "contrast_types": ["all_lowercase"]}}})
        made[name] = build_strategy_data(config, [prompt], samples, champion_dir=tmp_path, base_dir=tmp_path,
                                         device="cpu", held_out=avoid)
    assert made["clean"].stats["repair_contrast"] == 1.0
    assert made["clean"].sft.loc[made["clean"].sft["origin"] == "repair:contrast", "prompt"].tolist() == \
        [held_out.prompt]
    assert made["held"].stats["repair_contrast"] == 0.0
    assert "repair:contrast" not in set(made["held"].sft["origin"])


def test_contrast_types_are_checked():
    with pytest.raises(ValueError, match="no repair for instruction type 'word_count_min'"):
        RepairConfig(contrast_types=["word_count_min"])
    with pytest.raises(ValueError, match=r"contrast_types \['postscript'\] are not among types"):
        RepairConfig(types=["all_lowercase"], contrast_types=["postscript"])
    assert RepairConfig(types=["all_lowercase"], contrast_types=["all_lowercase"]).contrast_types == ["all_lowercase"]


def _tasked(pid, task, constraints):
    return _described(pid, task, constraints).model_copy(update={"topic": task})


def test_plain_anchors_ask_each_task_alone_with_its_first_judged_sample():
    lower, commas = Constraint(type="all_lowercase"), Constraint(type="no_commas")
    prompts = [_tasked("a1", "Describe a garden.", [lower]), _tasked("a2", "Describe a garden.", [commas]),
               _tasked("b", "Explain rain.", [commas]),
               # Another language asked: its sample answers that, not the task in English.
               _tasked("c", "Explain snow.", [Constraint(type="response_language", args={"language": "ru"})]),
               # A user's prompt without a task sentence of its own.
               Prompt(id="d", prompt="Write a poem.", constraints=[lower], topic="Write a poem."),
               Prompt(id="e", prompt="Write a song.", constraints=[lower])]
    samples = pd.concat([
        _samples([("a1", 0, "Unjudged.", 0.0, "none"), ("a1", 1, "Gardens grow.", 0.0, "fail"),
                  ("a1", 2, "Later one.", 0.0, "fail"), ("a2", 0, "Other prompt.", 0.0, "fail"),
                  ("b", 0, "Rain falls, often.", 0.0, "fail"), ("c", 0, "Schnee.", 0.0, "fail"),
                  ("d", 0, "roses are red.", 1.0, "pass"), ("e", 0, "la la.", 1.0, "pass")], finished=False),
    ])
    rows = plain_anchor_rows(prompts, samples, 10, seed=0)
    assert sorted(zip(rows["prompt"], rows["completion"], rows["prompt_id"])) == [
        ("Describe a garden.", "Gardens grow.", "a1"), ("Explain rain.", "Rain falls, often.", "b")]
    assert set(rows["origin"]) == {ANCHOR_ORIGIN} and set(rows["row_id"]) == {"a1-anchor", "b-anchor"}
    assert rows["ended"].tolist() == [False, False] and rows["score"].tolist() == [1.0, 1.0]
    # At most `count` tasks, drawn by the seed: the same on every call, other draws on other seeds.
    tasks = [_tasked(f"t{i}", f"Task number {i}.", [lower]) for i in range(40)]
    many = _samples([(p.id, 0, f"Answer {i}.", 0.0, "fail") for i, p in enumerate(tasks)])
    drawn = {seed: list(plain_anchor_rows(tasks, many, 5, seed=seed)["prompt"]) for seed in (0, 0, 1)}
    assert len(drawn[0]) == 5 and drawn[0] == list(plain_anchor_rows(tasks, many, 5, seed=0)["prompt"])
    assert drawn[1] != drawn[0]


def test_the_repair_strategy_adds_plain_anchors_only_when_asked(tmp_path):
    prompt = _tasked("a", "Describe a garden.", [Constraint(type="all_lowercase")])
    samples = _samples_of(prompt, [("Big Words.", 0.0), ("small words.", 1.0)])
    made = {}
    for anchors in (0, 4):
        config = FlywheelConfig.model_validate({
            "strategy": {"name": "repair", "repair": {"plain_anchors": anchors}},
            "training": {"method": "sft", "kl_weight": 1.0}})
        made[anchors] = build_strategy_data(config, [prompt], samples, champion_dir=tmp_path, base_dir=tmp_path,
                                            device="cpu")
    assert ANCHOR_ORIGIN not in set(made[0].sft["origin"]) and "repair_anchors" not in made[0].stats
    anchor = made[4].sft[made[4].sft["origin"] == ANCHOR_ORIGIN]
    assert anchor[["prompt", "completion"]].values.tolist() == [["Describe a garden.", "Big Words."]]
    assert made[4].stats["repair_anchors"] == 1.0
    assert made[4].pairs.equals(made[0].pairs)
    assert made[4].sft[made[4].sft["origin"] != ANCHOR_ORIGIN].equals(made[0].sft)


def test_plain_anchors_need_sft_with_its_kl_term():
    for training in ({"method": "sft", "kl_weight": 0.0}, {"method": "dpo"},
                     {"method": "sft", "kl_weight": 1.0, "kl_tokens": "answer"}):
        with pytest.raises(ValueError, match="plain_anchors needs training.method 'sft' with training.kl_weight > 0"):
            FlywheelConfig.model_validate({"strategy": {"name": "repair", "repair": {"plain_anchors": 8}},
                                           "training": training})
    with pytest.raises(ValueError):
        RepairConfig(plain_anchors=-1)


def test_a_plain_anchor_whose_task_a_held_out_prompt_shares_is_passed_over(tmp_path):
    lower = Constraint(type="all_lowercase")
    prompts = [_tasked("a", "Describe a garden in spring.", [lower]), _tasked("b", "Explain how rain forms.", [lower])]
    samples = pd.concat([_samples_of(p, [("Big Words.", 0.0)]) for p in prompts])
    held_out = [_tasked("h", "Describe a garden in spring.", [Constraint(type="no_commas")])]
    config = FlywheelConfig.model_validate({
        "strategy": {"name": "repair", "repair": {"plain_anchors": 8}},
        "training": {"method": "sft", "kl_weight": 1.0}, "quality": {"decontamination_ngram": 4}})
    made = build_strategy_data(config, prompts, samples, champion_dir=tmp_path, base_dir=tmp_path, device="cpu",
                               held_out=held_out)
    anchors = made.sft[made.sft["origin"] == ANCHOR_ORIGIN]
    assert anchors["prompt"].tolist() == ["Explain how rain forms."] and made.stats["repair_anchors"] == 1.0
