"""The teacher's prompts and the parser that turns its output into training lines.

Pure string work: no torch, no I/O. Every prompt is the SEAL reference's, word for word (its
knowledge-incorporation code: implications, the "long" and "very long" list variants, rewrite and
self-QA, whose prompt ends inside the first question so the completion continues it).

A self-edit may also carry update directives: one line `Directives: {"learning_rate": 5e-4,
"epochs": 8, "rank": 16}` anywhere in it, as SEAL's few-shot self-edits choose their own training
settings. `split_directives` takes that line out of the training text; teacher.core applies it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from seal.records import EditFormat, Passage

_IMPLICATIONS = (
    "Let's read the following passage and produce {list} of implications derived directly or "
    "indirectly from the content.\n\nPassage:\n{{title}}\n{{context}}\n\nImplications:\n"
)
# The self-QA prompt ends inside "Question 1: ": the completion is the first question onwards.
SELF_QA_LEAD = "Question 1: "
_PROMPTS: dict[EditFormat, str] = {
    EditFormat.IMPLICATIONS: _IMPLICATIONS.format(list="a list"),
    EditFormat.IMPLICATIONS_LONG: _IMPLICATIONS.format(list="a long list"),
    EditFormat.IMPLICATIONS_VERY_LONG: _IMPLICATIONS.format(list="a very long list"),
    EditFormat.REWRITE: (
        "Let's read the following passage and rewrite it in a few different ways, each one separated by "
        "a newline.\n\nPassage:\n{title}\n{context}\n\nRewritten passages:\n"
    ),
    EditFormat.SELF_QA: (
        "Let's read the following passage and rewrite it in a question-answer format.\n\n"
        "Passage:\n{title}\n{context}\n\n" + SELF_QA_LEAD
    ),
}

# "1." "2)" "(3)" "-" "*" "•" and friends at the start of a line; digits need a separator after them so
# "1999 was..." keeps its year.
_LIST_MARKER = re.compile(r"^(?:\(?\d{1,3}[.)](?=\s|$)|[-*+–—](?=\s|$)|[•‣▪◦·])\s*")
_QUESTION = re.compile(r"^(?:q|question)\s*\d*\s*:\s*", re.IGNORECASE)
_ANSWER = re.compile(r"^(?:a|answer)\s*\d*\s*:\s*", re.IGNORECASE)
# "Question 2:" written inline after an answer starts a new pair.
_INLINE_QUESTION = re.compile(r"\s+(?=Question\s*\d+\s*:)")
_DIRECTIVES = re.compile(
    r"^[ \t]*(?:update[ \t]+)?directives[ \t]*:[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE
)
_MIN_CHARS = 3


def build_prompt(passage: Passage, fmt: EditFormat) -> str:
    """The prompt that asks the teacher for a self-edit of `passage` in format `fmt`."""
    template = _PROMPTS.get(fmt)
    if template is None:
        raise ValueError(
            f"edit format {fmt.value!r} has no teacher prompt (it trains on the passage alone); "
            f"choose one of {[f.value for f in _PROMPTS]}"
        )
    return template.format(title=passage.title, context=passage.context)


def parse_self_edit(text: str, fmt: EditFormat) -> tuple[str, ...]:
    """Split a generated self-edit into clean, unique training lines (order kept).

    A directives line is not training data and never becomes a line. Self-QA completions continue
    the prompt's "Question 1: ", which is put back so the first pair is whole.
    """
    text = split_directives(text)[1]
    if fmt is EditFormat.SELF_QA:
        if not _QUESTION.match(_strip_list_marker(text.lstrip().split("\n", 1)[0])):
            text = SELF_QA_LEAD + text.lstrip()
        text = _INLINE_QUESTION.sub("\n", text)
    lines = [_strip_list_marker(line) for line in text.splitlines()]
    if fmt is EditFormat.SELF_QA:
        lines = _join_qa_pairs(lines)
    return _dedupe(line for line in lines if _is_content(line))


def split_directives(text: str) -> tuple[str, str]:
    """(the first directives line's value, the text without any directives line); ("", text) if none."""
    found = _DIRECTIVES.search(text)
    if found is None:
        return "", text
    return found.group(1).strip(), _DIRECTIVES.sub("", text)


def _strip_list_marker(line: str) -> str:
    line = line.strip()
    # Loop because models nest markers ("- 1. foo").
    while (stripped := _LIST_MARKER.sub("", line, count=1)) != line:
        line = stripped.strip()
    return line


def _join_qa_pairs(lines: list[str]) -> list[str]:
    """Normalise "Question:"/"Answer:" to "Q:"/"A:" and put a pair split over two lines on one."""
    out: list[str] = []
    for line in (line for line in lines if line):
        answer = _ANSWER.match(line)
        if answer and out and _QUESTION.match(out[-1]) and " A: " not in out[-1]:
            out[-1] = f"{out[-1]} A: {line[answer.end() :]}".strip()
        elif question := _QUESTION.match(line):
            out.append(f"Q: {line[question.end() :]}".strip())
        else:
            out.append(line)
    return out


def _is_content(line: str) -> bool:
    # A bare "Q:" label is not content: "Q: !!!" says nothing.
    body = _ANSWER.sub("", _QUESTION.sub("", line, count=1), count=1)
    return len(line) >= _MIN_CHARS and any(ch.isalnum() for ch in body)


def _dedupe(lines: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(lines))
