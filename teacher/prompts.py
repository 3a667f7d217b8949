"""The teacher's prompts and the parser that turns its output into training lines.

Pure string work: no torch, no I/O. The implications prompt is the SEAL paper's, word for word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from seal.records import EditFormat, Passage

_PROMPTS: dict[EditFormat, str] = {
    EditFormat.IMPLICATIONS: (
        "Let's read the following passage and produce a list of implications derived directly or "
        "indirectly from the content.\n\nPassage:\n{title}\n{context}\n\nImplications:\n"
    ),
    EditFormat.REWRITE: (
        "Let's read the following passage and rewrite the passage in different words, keeping every "
        "fact, name, date and number.\n\nPassage:\n{title}\n{context}\n\nRewrite:\n"
    ),
    EditFormat.SELF_QA: (
        "Let's read the following passage and write question-answer pairs that cover every fact in it, "
        'one pair per line in the form "Q: <question> A: <answer>".\n\n'
        "Passage:\n{title}\n{context}\n\nQuestions and answers:\n"
    ),
}

# "1." "2)" "(3)" "-" "*" "•" and friends at the start of a line; digits need a separator after them so
# "1999 was..." keeps its year.
_LIST_MARKER = re.compile(r"^(?:\(?\d{1,3}[.)](?=\s|$)|[-*+–—](?=\s|$)|[•‣▪◦·])\s*")
_QUESTION = re.compile(r"^(?:q|question)\s*\d*\s*:\s*", re.IGNORECASE)
_ANSWER = re.compile(r"^(?:a|answer)\s*\d*\s*:\s*", re.IGNORECASE)
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
    """Split a generated self-edit into clean, unique training lines (order kept)."""
    lines = [_strip_list_marker(line) for line in text.splitlines()]
    if fmt is EditFormat.SELF_QA:
        lines = _join_qa_pairs(lines)
    return _dedupe(line for line in lines if _is_content(line))


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
    return len(line) >= _MIN_CHARS and any(ch.isalnum() for ch in line)


def _dedupe(lines: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(lines))
