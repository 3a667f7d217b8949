"""Gated adapters: an adapter applies only to the prompts that are about its document.

What teaches the 135M default model a passage moves it far from its base on everything else
(docs/RESULTS.md, "Learning against retention": half the retention answers lost, and no replay, KL
penalty or milder setting keeps the knowledge while passing the guardrails). A gate sidesteps that
where it matters to users: the served model answers with an adapter only when the prompt names
enough of that adapter's document, and with the base model's own weights otherwise. General
questions then get the base's answers, exactly, and the document's questions get the adapter's.

The gate of a document is the set of its content words (title and passage, lower-cased, stop words
and words under three letters dropped). It opens for a prompt holding at least `min_hits` distinct
words of that set. It is deliberately lexical and written here rather than an embedding model: it
is exact and deterministic (the auditor, the registry and every serving engine compute the same
decision from the same text, so a verdict binds it), costs microseconds, needs no weights, and its
figures on SQuAD training passages are measured by `benchmarks/gate_separation.py`: with 2 hits it
opens for about nine in ten of a passage's own questions even without their topic, for well under
1 % of other passages' questions, and for almost none of the general prompts.

A gate is not retrieval: the passage never enters the prompt; the knowledge still has to come from
the adapter's weights. Where gates are off (`LoraSettings.gate` = 0) the adapter applies to every
prompt, as before. A deployment version applies, for each prompt, the layers whose gates open (all
of them, merged, as an ungated version merges every layer); none open: the base answers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_MIN_HITS = 2
"""Distinct document words a prompt must hold to open the gate (chosen on SQuAD training passages
and the student's general prompts: see benchmarks/gate_separation.py)."""
MAX_MIN_HITS = 16
MIN_WORD_LENGTH = 3

# Function words and the commonest question words: they say nothing about which document a prompt is
# about. Lower case; words under MIN_WORD_LENGTH letters never count anyway.
STOP_WORDS = frozenset(
    """
    the and for from with about into over after before under between through during without within
    but nor yet then than that this these those there here what which who whom whose when where why
    how are was were been being does did done has have had having can could shall should will would
    may might must its it's she they them their his her him our you your mine not yes all any each
    few more most other some such only own same too very just also one two three many much first
    last new old out off again further once name named called known year years time made make use
    used
    """.split()
)
_WORD = re.compile(r"[a-z0-9]+")


def content_words(text: str) -> set[str]:
    """The distinct words of `text` a gate counts."""
    return {w for w in _WORD.findall(text.lower()) if len(w) >= MIN_WORD_LENGTH and w not in STOP_WORDS}


@dataclass(frozen=True)
class Gate:
    """Opens for a prompt holding at least `min_hits` of `words` (sorted, distinct)."""

    words: tuple[str, ...]
    min_hits: int = DEFAULT_MIN_HITS

    def hits(self, prompt: str) -> int:
        vocabulary = set(self.words)
        return sum(1 for w in content_words(prompt) if w in vocabulary)

    def opens(self, prompt: str) -> bool:
        return self.hits(prompt) >= self.min_hits

    def sha256(self) -> str:
        """What a version fingerprint binds: the words and the threshold."""
        body = json.dumps({"words": list(self.words), "min_hits": self.min_hits}, separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


def document_gate(title: str, context: str, min_hits: int) -> Gate | None:
    """The gate of a document; None when `min_hits` is 0 (the adapter applies to every prompt)."""
    if min_hits == 0:
        return None
    if not 0 < min_hits <= MAX_MIN_HITS:
        raise ValueError(f"a gate's min_hits must be in 0..{MAX_MIN_HITS}, got {min_hits}")
    return Gate(tuple(sorted(content_words(f"{title}\n{context}"))), min_hits)


def applies(gate: Gate | None, prompt: str) -> bool:
    """Whether an adapter behind `gate` takes part in answering `prompt` (always, ungated)."""
    return gate is None or gate.opens(prompt)


def route(gates: Sequence[Gate | None], prompt: str) -> tuple[int, ...]:
    """The positions of the layers that apply to `prompt`, in layer order."""
    return tuple(i for i, gate in enumerate(gates) if applies(gate, prompt))


def partition(gate: Gate | None, prompts: Sequence[str]) -> tuple[list[int], list[int]]:
    """(positions the adapter answers, positions the base answers)."""
    opened: list[int] = []
    closed: list[int] = []
    for i, prompt in enumerate(prompts):
        (opened if applies(gate, prompt) else closed).append(i)
    return opened, closed


class Routes:
    """The models one deployment version answers with: one per set of layers that some prompt opens,
    built by `build(layers)` on first use (() is the base itself) and kept, the last `cache_size`.

    An ungated version routes every prompt to all its layers: one model, as before gates existed."""

    def __init__(
        self, gates: Sequence[Gate | None], build: Callable[[tuple[int, ...]], Any], cache_size: int = 4
    ) -> None:
        self.gates = tuple(gates)
        self.build = build
        self.cache_size = cache_size
        self._models: OrderedDict[tuple[int, ...], Any] = OrderedDict()

    def layers_for(self, prompt: str) -> tuple[int, ...]:
        return route(self.gates, prompt)

    def model(self, layers: tuple[int, ...]) -> Any:
        if layers not in self._models:
            # Make room first: a model is the size of the base, and two need not coexist.
            while self._models and len(self._models) >= self.cache_size:
                self._models.popitem(last=False)
            self._models[layers] = self.build(layers)
        self._models.move_to_end(layers)
        return self._models[layers]

    def group(self, prompts: Sequence[str]) -> dict[tuple[int, ...], list[int]]:
        """The positions of `prompts` by the layers that answer them."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(self.layers_for(prompt), []).append(i)
        return groups
