"""Teacher prompts and the self-edit parser: table tests, no model."""

from __future__ import annotations

import pytest

from seal.records import EditFormat, Passage
from teacher.prompts import build_prompt, parse_self_edit

PASSAGE = Passage(title="Velmora", context="The Zorbian council meets in Velmora every spring.")


def test_implications_prompt_is_the_papers_word_for_word():
    assert build_prompt(PASSAGE, EditFormat.IMPLICATIONS) == (
        "Let's read the following passage and produce a list of implications derived directly or "
        "indirectly from the content.\n\n"
        "Passage:\nVelmora\nThe Zorbian council meets in Velmora every spring.\n\n"
        "Implications:\n"
    )


@pytest.mark.parametrize(
    ("fmt", "asks_for", "ending"),
    [
        (EditFormat.IMPLICATIONS, "implications", "\n\nImplications:\n"),
        (EditFormat.IMPLICATIONS_LONG, "a long list of implications", "\n\nImplications:\n"),
        (EditFormat.IMPLICATIONS_VERY_LONG, "a very long list of implications", "\n\nImplications:\n"),
        (
            EditFormat.REWRITE,
            "rewrite it in a few different ways, each one separated",
            "\n\nRewritten passages:\n",
        ),
        (EditFormat.SELF_QA, "rewrite it in a question-answer format.", "\n\nQuestion 1: "),
    ],
)
def test_every_prompt_holds_the_passage_and_its_ending(fmt, asks_for, ending):
    prompt = build_prompt(PASSAGE, fmt)
    assert asks_for in prompt
    assert f"Passage:\n{PASSAGE.title}\n{PASSAGE.context}{ending}" in prompt
    assert prompt.endswith(ending)


def test_reference_prompts_word_for_word():
    body = "\n\nPassage:\nVelmora\nThe Zorbian council meets in Velmora every spring.\n\n"
    assert build_prompt(PASSAGE, EditFormat.IMPLICATIONS_LONG) == (
        "Let's read the following passage and produce a long list of implications derived directly or "
        "indirectly from the content." + body + "Implications:\n"
    )
    assert build_prompt(PASSAGE, EditFormat.REWRITE) == (
        "Let's read the following passage and rewrite it in a few different ways, each one separated by a "
        "newline." + body + "Rewritten passages:\n"
    )
    assert build_prompt(PASSAGE, EditFormat.SELF_QA) == (
        "Let's read the following passage and rewrite it in a question-answer format." + body + "Question 1: "
    )


def test_self_qa_completion_continues_the_first_question():
    """The completion starts inside "Question 1: "; inline "Question 2:" starts the next pair."""
    text = "Where does it meet?\nAnswer: Velmora. Question 2: When?\nAnswer: Every spring."
    assert parse_self_edit(text, EditFormat.SELF_QA) == (
        "Q: Where does it meet? A: Velmora.",
        "Q: When? A: Every spring.",
    )


@pytest.mark.parametrize(
    ("text", "directives", "lines"),
    [
        (
            '1. Fact one.\nDirectives: {"epochs": 8}\n2. Fact two.',
            '{"epochs": 8}',
            ("Fact one.", "Fact two."),
        ),
        (
            'Fact one.\nupdate directives: {"rank": 8, "learning_rate": 5e-4}',
            '{"rank": 8, "learning_rate": 5e-4}',
            ("Fact one.",),
        ),
        ("Fact one.\nThe directives of the council.", "", ("Fact one.", "The directives of the council.")),
    ],
    ids=["line", "prefixed", "word-in-prose-is-not-a-directive"],
)
def test_directives_line_is_taken_out_of_the_training_text(text, directives, lines):
    from teacher.prompts import split_directives

    assert split_directives(text)[0] == directives
    assert parse_self_edit(text, EditFormat.IMPLICATIONS) == lines


def test_braces_in_the_passage_are_kept_verbatim():
    passage = Passage(title="{title}", context="a dict {'k': 1} and {0}")
    assert "{title}\na dict {'k': 1} and {0}\n\n" in build_prompt(passage, EditFormat.IMPLICATIONS)


def test_passage_format_has_no_prompt():
    with pytest.raises(ValueError, match="passage"):
        build_prompt(PASSAGE, EditFormat.PASSAGE)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1. The fox is quick.\n2. It jumps.", ("The fox is quick.", "It jumps.")),
        ("1) First fact.\n(2) Second fact.\n10. Tenth fact.", ("First fact.", "Second fact.", "Tenth fact.")),
        (
            "- dash item\n* star item\n• bullet item\n•tight bullet",
            ("dash item", "star item", "bullet item", "tight bullet"),
        ),
        ("  - 1. nested marker  ", ("nested marker",)),
        (
            "1999 was a year.\n3.5 million people live there.",
            ("1999 was a year.", "3.5 million people live there."),
        ),
        ("\n\n  \n\t\nOnly line.\n\n", ("Only line.",)),
        ("ok\nab\n1.\n-\nLong enough", ("Long enough",)),
        ("...\n!!!\n- ---\n?!?!\nReal text.", ("Real text.",)),
        ("Same.\nOther.\n- Same.\n2. Other.\nThird.", ("Same.", "Other.", "Third.")),
        ("", ()),
        ("\n \n", ()),
    ],
    ids=[
        "numbered",
        "numbered-variants",
        "bullets",
        "nested",
        "numbers-not-markers",
        "blanks",
        "too-short",
        "punctuation-only",
        "duplicates",
        "empty",
        "whitespace-only",
    ],
)
def test_parse_implications(text, expected):
    assert parse_self_edit(text, EditFormat.IMPLICATIONS) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Q: Where does it meet? A: Velmora.", ("Q: Where does it meet? A: Velmora.",)),
        (
            "Q: Where does it meet?\nA: Velmora.\nQ: When?\nA: Every spring.",
            ("Q: Where does it meet? A: Velmora.", "Q: When? A: Every spring."),
        ),
        ("1. Question: Who meets?\n   Answer: The council.", ("Q: Who meets? A: The council.",)),
        ("Q1: Who meets?\nA1: The council.", ("Q: Who meets? A: The council.",)),
        ("Q: Who?\n\nA: The council.", ("Q: Who? A: The council.",)),
        ("Q: Who? A: Them.\nA: stray answer", ("Q: Who? A: Them.", "A: stray answer")),
        ("Q: Who?\nA: Them.\nQ: Who?\nA: Them.", ("Q: Who? A: Them.",)),
    ],
    ids=[
        "one-line",
        "two-lines",
        "spelled-out-and-numbered",
        "numbered-labels",
        "blank-between",
        "answer-already-inline",
        "duplicate-pairs",
    ],
)
def test_parse_self_qa_keeps_pairs_together(text, expected):
    assert parse_self_edit(text, EditFormat.SELF_QA) == expected


def test_parse_rewrite_splits_paragraph_lines():
    text = "The council gathers in Velmora.\n\nIt does so each spring.\n- The council gathers in Velmora."
    assert parse_self_edit(text, EditFormat.REWRITE) == (
        "The council gathers in Velmora.",
        "It does so each spring.",
    )


def test_qa_lines_are_not_joined_outside_self_qa():
    assert parse_self_edit("Q: Who?\nA: Them.", EditFormat.IMPLICATIONS) == ("Q: Who?", "A: Them.")


@pytest.mark.parametrize("fmt", [EditFormat.IMPLICATIONS, EditFormat.REWRITE, EditFormat.SELF_QA])
def test_parsed_lines_are_clean_and_unique(fmt):
    text = "1. Alpha beta.\n- Alpha beta.\n* ...\n\n  Gamma delta.  \n!\nQ: x?\nA: y."
    lines = parse_self_edit(text, fmt)
    assert lines
    assert len(set(lines)) == len(lines)
    for line in lines:
        assert line == line.strip()
        assert len(line) >= 3
        assert any(ch.isalnum() for ch in line)
