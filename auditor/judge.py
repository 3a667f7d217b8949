"""An LLM judge for τ answers: the SEAL paper's yes/no grading prompt sent to an OpenAI-compatible API.

The deterministic metrics of auditor.grading stay the default; a configured judge grades every answer
beside them (`QuestionScore.judged_correct`), and under the metric "judge" its grade is the one that
counts. Grades are cached per (judge model, question, gold answer, response), so re-scoring a baseline
or resuming a benchmark never pays twice for the same grade. The client is the official `openai` one:
retries, backoff and Retry-After are its job, not ours.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import openai

from auditor.grading import grade_answer
from seal.apikeys import read_api_key
from seal.records import QuestionScore

API_KEY_ENV = "SEAL_JUDGE_API_KEY"

# The reference's judge prompt (GPT-4.1 in the paper), word for word.
JUDGE_PROMPT = (
    "You are a grading assistant. Your job is to determine whether a student's answer correctly answers "
    "the question based solely on the provided gold answer. Do not use any outside knowledge. The student "
    "answer can include additional information, but it must at least fully convey the gold answer and "
    "must not contradict it. Ignore style, phrasing, or extra details that do not affect correctness. "
    "Respond ONLY with 'yes' or 'no'.\n\nQuestion: {question}\nGold answer: {gold}\nStudent answer: {pred}\n"
    "Is the student answer correct based solely on the gold answer? Respond 'yes' or 'no'."
)

_YES = re.compile(r"\byes\b", re.IGNORECASE)
_NO = re.compile(r"\bno\b", re.IGNORECASE)
_ERROR_SNIPPET_CHARS = 300


class JudgeError(Exception):
    """The judge could not grade (down, refusing, or answering nonsense after the client's retries).

    Not a PermanentError: the audit task fails and the work plane retries it later. A grade is never
    guessed.
    """


class Judge(Protocol):
    """What the auditor needs of a judge (LLMJudge, or a fake in tests)."""

    model: str

    def judge_batch(self, items: Sequence[tuple[str, str, str]]) -> list[bool]: ...


class JudgeCache(Protocol):
    def get(self, key: str) -> bool | None: ...

    def put(self, key: str, correct: bool) -> None: ...


def judge_prompt(question: str, gold: str, response: str) -> str:
    """The reference's grading prompt for one answer."""
    return JUDGE_PROMPT.format(question=question, gold=gold, pred=response)


def parse_judgement(reply: str) -> bool:
    """Correct when the reply says "yes" and not "no" (whole words, any case), as the reference reads it."""
    return bool(_YES.search(reply)) and not _NO.search(reply)


def cache_key(model: str, question: str, gold: str, response: str) -> str:
    """sha256 of the four things a grade depends on (JSON-encoded, so no two tuples collide)."""
    encoded = json.dumps([model, question, gold, response], ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def resolve_api_key(key_file: str, environ: Mapping[str, str]) -> str:
    """The judge's API key: the content of `key_file` when one is named, else SEAL_JUDGE_API_KEY.

    Empty when neither is set (a local server without auth). Errors name the file, never its content.
    """
    return read_api_key(key_file, environ.get(API_KEY_ENV, ""), "judge API key")


class LLMJudge:
    """Grades answers with a chat model at temperature 0 behind any OpenAI-compatible API."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        cache: JudgeCache | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        concurrency: int = 4,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.cache = cache
        self.max_retries = max_retries
        self.concurrency = max(1, concurrency)
        self._api_key = api_key
        # The client wants some key; a local server without auth ignores this placeholder.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "unused", timeout=timeout_s, max_retries=max_retries
        )

    def __repr__(self) -> str:  # never show the key
        return f"LLMJudge(base_url={self.base_url!r}, model={self.model!r})"

    def judge(self, question: str, gold: str, response: str) -> bool:
        """Whether `response` answers `question` as `gold` does; an empty response is wrong unasked."""
        if not response.strip():
            return False
        key = cache_key(self.model, question, gold, response)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            return cached
        correct = parse_judgement(self._ask(judge_prompt(question, gold, response)))
        if self.cache is not None:
            self.cache.put(key, correct)
        return correct

    def judge_batch(self, items: Sequence[tuple[str, str, str]]) -> list[bool]:
        """`judge` over (question, gold, response) triples, a few requests at a time, in order."""
        if self.concurrency == 1 or len(items) <= 1:
            return [self.judge(*item) for item in items]
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="judge") as pool:
            return list(pool.map(lambda item: self.judge(*item), items))

    def _ask(self, prompt: str) -> str:
        where = f"judge {self.model!r} at {self.base_url}"
        attempts = self.max_retries + 1
        try:
            completion = self._client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0
            )
        except openai.APIStatusError as exc:
            body = self._redact(_snippet(exc.body))
            raise JudgeError(
                f"{where} answered HTTP {exc.status_code} ({attempts} attempts): {body}"
            ) from None
        except openai.APIConnectionError as exc:
            raise JudgeError(
                f"{where} did not answer ({type(exc).__name__}, {attempts} attempts); is the server up?"
            ) from None
        choices = completion.choices or []
        content = choices[0].message.content if choices else None
        if content is None:
            raise JudgeError(f"{where} returned no message content")
        return content

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "[api key]") if self._api_key else text


def _snippet(body: Any) -> str:
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    return text[:_ERROR_SNIPPET_CHARS]


def judge_scores(judge: Judge, scores: Sequence[QuestionScore], metric: str) -> list[QuestionScore]:
    """`scores` with the judge's grade filled in where it is missing; under "judge" `correct` follows it."""
    todo = [s for s in scores if s.judged_correct is None]
    grades = iter(judge.judge_batch([(s.question, s.answer, s.response) for s in todo]))
    filled = []
    for s in scores:
        judged = s.judged_correct if s.judged_correct is not None else next(grades)
        filled.append(grade_answer(s.question, s.answer, s.response, metric, judged_correct=judged))
    return filled


# --- caches ----------------------------------------------------------------------------------------


class RedisJudgeCache:
    """Grades in one Redis hash (the auditor service's cache, shared by every auditor replica)."""

    def __init__(self, client: Any, key: str, ttl_s: float = 30 * 24 * 3600.0) -> None:
        self.client = client
        self.key = key
        self.ttl_s = ttl_s

    def get(self, key: str) -> bool | None:
        raw = self.client.hget(self.key, key)
        return None if raw is None else raw in (b"1", "1")

    def put(self, key: str, correct: bool) -> None:
        pipe = self.client.pipeline()
        pipe.hset(self.key, key, "1" if correct else "0")
        pipe.expire(self.key, int(self.ttl_s))  # an idle cache goes away as a whole
        pipe.execute()


class FileJudgeCache:
    """Grades in a JSON-lines file, one {"key", "correct"} per line, appended and flushed as they come.

    For benchmarks: a run that dies part-way resumes without asking again. A torn last line (a crash
    mid-write) is cut off when the file is opened, so the next append starts on a clean line.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._grades: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._load()
        self._file = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # everything up to the last full line
        if len(complete) != len(data):
            with self.path.open("r+b") as f:
                f.truncate(len(complete))
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                self._grades[str(record["key"])] = bool(record["correct"])
            except (ValueError, KeyError, TypeError):
                continue  # a damaged line costs one grade, not the cache

    def get(self, key: str) -> bool | None:
        return self._grades.get(key)

    def put(self, key: str, correct: bool) -> None:
        with self._lock:
            self._grades[key] = correct
            self._file.write(json.dumps({"key": key, "correct": correct}) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return len(self._grades)


# --- agreement -------------------------------------------------------------------------------------


def agreement(scores: Sequence[QuestionScore]) -> dict[str, Any]:
    """How the deterministic `correct` and the judge's `judged_correct` agree, over judged scores.

    Counts of the four cells, the fraction that agree and Cohen's kappa. `agreement` is None with no
    judged score; `kappa` is None when chance agreement is 1 (both graders gave every answer the same
    single grade), where kappa is 0/0.
    """
    pairs = [(s.correct, s.judged_correct) for s in scores if s.judged_correct is not None]
    n = len(pairs)
    both = sum(1 for m, j in pairs if m and j)
    metric_only = sum(1 for m, j in pairs if m and not j)
    judge_only = sum(1 for m, j in pairs if j and not m)
    neither = n - both - metric_only - judge_only
    result: dict[str, Any] = {
        "judged": n,
        "unjudged": len(scores) - n,
        "both_correct": both,
        "metric_only": metric_only,
        "judge_only": judge_only,
        "both_wrong": neither,
        "agreement": None,
        "kappa": None,
    }
    if n == 0:
        return result
    observed = (both + neither) / n
    metric_yes, judge_yes = (both + metric_only) / n, (both + judge_only) / n
    chance = metric_yes * judge_yes + (1 - metric_yes) * (1 - judge_yes)
    result["agreement"] = observed
    if chance < 1 - 1e-12:
        result["kappa"] = (observed - chance) / (1 - chance)
    return result
