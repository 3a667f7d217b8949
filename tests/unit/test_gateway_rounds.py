"""The outer loop's pure rules: which self-edits a round selects, how pairs are built, round ids."""

from __future__ import annotations

import pytest

from gateway.rounds import contexts_done, mean_reward, policy_task, round_job_id, round_spec, select_examples
from seal.errors import InvalidArgument
from seal.records import (
    QA,
    AdapterRef,
    Document,
    DocumentResult,
    EditFormat,
    EditResult,
    Job,
    JobSpec,
    JobState,
    LoraSettings,
    PolicySettings,
    PolicyTraining,
    QuestionScore,
    SeedRun,
    SelfEdit,
    Verdict,
)
from teacher.prompts import build_prompt

DOCS = tuple(
    Document(f"Doc {i}", f"Context {i} has facts.", (QA(f"Question {i}?", f"answer {i}"),)) for i in range(2)
)
SPEC = JobSpec(documents=DOCS, n_self_edits=3, seeds=2)


def _edit(doc: int, index: int, rewards: list[float], leak: bool = False) -> EditResult:
    fmt = EditFormat.PASSAGE if index < 0 else EditFormat.IMPLICATIONS
    se = SelfEdit(
        f"j/{doc}/{index}",
        "j",
        doc,
        index,
        fmt,
        DOCS[doc].passage(),
        f"text {doc}/{index}",
        (),
        LoraSettings(),
    )
    score = QuestionScore("q", "a", "r", False, 0.0, False, False)
    runs = []
    for run, reward in enumerate(rewards):
        sha = f"{doc}{index}{run}".ljust(64, "0")
        adapter = AdapterRef(sha, se.id, "m", "fp", 1, 1.0, 1, 0.1)
        checks = ("tau_leak:fail:q",) if leak else ("tau_leak:pass",)
        verdict = Verdict(
            "j", doc, se.id, sha, "fp", 0.0, reward, reward, (score,), (score,), 1.0, reward > 0, checks
        )
        runs.append(SeedRun(run, adapter, verdict))
    mean = sum(rewards) / len(rewards) if rewards else None
    return EditResult(se, runs[0].adapter, runs[0].verdict, tuple(runs[1:]), reward=mean)


def _job(edits_by_doc: list[list[EditResult]], spec: JobSpec = SPEC) -> Job:
    documents = tuple(
        DocumentResult(i, DOCS[i].title, 0.0, tuple(edits)) for i, edits in enumerate(edits_by_doc)
    )
    return Job("j", JobState.SUCCEEDED, spec, 0.0, documents=documents)


ROUND = _job(
    [
        [
            _edit(0, 0, [0.0, 0.5]),
            _edit(0, 1, [1.0, 1.0], leak=True),
            _edit(0, 2, [0.5, 0.5]),
            _edit(0, -1, [1.0, 1.0]),
        ],
        [_edit(1, 0, [0.0, 0.0]), _edit(1, 1, [0.0, 0.0]), _edit(1, 2, [0.0, -0.5])],
    ]
)


def test_best_of_n_keeps_the_best_mean_per_context_above_the_threshold() -> None:
    """Doc 0: edit 1 leaked τ and the control never counts; edits 0 and 2 tie at 0.25/0.5 -> edit 2.
    Doc 1: its best mean is 0, not above the default threshold 0: nothing to learn from it."""
    (example,) = select_examples(ROUND, PolicyTraining(), "sft")
    assert (example.context_id, example.chosen, example.chosen_reward) == ("0", "text 0/2", 0.5)
    assert example.prompt == build_prompt(DOCS[0].passage(), EditFormat.IMPLICATIONS)
    assert example.rejected == ""
    # Both training runs of the chosen self-edit are its evidence.
    assert example.evidence == (f"j/0/2@{'020'.ljust(64, '0')}", f"j/0/2@{'021'.ljust(64, '0')}")


def test_best_of_n_ties_go_to_the_lower_index_and_a_lower_threshold_admits_zero_reward() -> None:
    examples = select_examples(ROUND, PolicyTraining(reward_threshold=-1.0), "sft")
    assert [(e.context_id, e.chosen) for e in examples] == [("0", "text 0/2"), ("1", "text 1/0")]


def test_threshold_keeps_every_self_edit_above_it() -> None:
    examples = select_examples(ROUND, PolicyTraining(selection="threshold", reward_threshold=0.2), "sft")
    assert [e.chosen for e in examples] == ["text 0/2", "text 0/0"]  # 0.5, then 0.25; never the leak


@pytest.mark.parametrize("objective", ["dpo", "discopop"])
def test_preference_pairs_put_the_best_against_the_worst_of_a_context(objective: str) -> None:
    examples = select_examples(ROUND, PolicyTraining(), objective)
    first, second = examples
    assert (first.chosen, first.rejected, first.chosen_reward, first.rejected_reward) == (
        "text 0/2",
        "text 0/0",
        0.5,
        0.25,
    )
    # Doc 1: 0.0 against -0.25, strictly better, so a pair (the threshold does not apply to best_of_n pairs).
    assert (second.chosen, second.rejected) == ("text 1/0", "text 1/2")
    assert len(first.evidence) == 4  # two runs of each


def test_no_pair_where_every_self_edit_scored_the_same() -> None:
    flat = _job([[_edit(0, 0, [0.0]), _edit(0, 1, [0.0])], []])
    assert select_examples(flat, PolicyTraining(), "dpo") == []


def test_an_empty_selection_is_refused_with_the_reason() -> None:
    parent = Job(
        "p",
        JobState.RUNNING,
        JobSpec(documents=DOCS, policy_training=PolicyTraining(reward_threshold=0.9)),
        0.0,
    )
    with pytest.raises(InvalidArgument, match="selected no self-edit: none of its 2 contexts"):
        policy_task(parent, 1, ROUND, "")


def test_policy_task_continues_from_the_last_version_unless_told_to_restart() -> None:
    version = "ab" * 32
    training = PolicyTraining(policy=PolicySettings(objective="sft", epochs=3))
    parent = Job(
        "p", JobState.RUNNING, JobSpec(documents=DOCS, policy_training=training, teacher_model="t"), 0.0
    )
    task = policy_task(parent, 2, ROUND, version)
    assert (task.job_id, task.round, task.parent, task.teacher_model) == ("p", 2, version, "t")
    assert task.settings.epochs == 3 and len(task.examples) == 1
    assert task.round_mean_reward == pytest.approx(mean_reward(ROUND))
    restart = Job(
        "p",
        JobState.RUNNING,
        JobSpec(documents=DOCS, policy_training=PolicyTraining(continue_from_last=False)),
        0.0,
    )
    assert policy_task(restart, 2, ROUND, version).parent == ""


def test_round_mean_reward_and_contexts_done() -> None:
    # Sampled, non-leaking edits: doc 0 -> 0.25, 0.5; doc 1 -> 0, 0, -0.25.
    assert mean_reward(ROUND) == pytest.approx((0.25 + 0.5 + 0 + 0 - 0.25) / 5)
    # Doc 0 has 4 edits (3 + control) with both runs; doc 1 has 3 (no control): not done.
    assert contexts_done(ROUND) == 1
    one_run_short = _job([[_edit(0, i, [0.1]) for i in (0, 1, 2, -1)], []])
    assert contexts_done(one_run_short) == 0  # seeds = 2, one run each


def test_round_job_ids_are_fixed_and_distinct_and_round_specs_name_their_parent() -> None:
    assert round_job_id("p1", 1) == round_job_id("p1", 1)
    assert len({round_job_id("p1", 1), round_job_id("p1", 2), round_job_id("p2", 1)}) == 3
    assert len(round_job_id("p1", 1)) == 16 and int(round_job_id("p1", 1), 16) >= 0
    spec = round_spec(JobSpec(documents=DOCS, policy_training=PolicyTraining()), "p1", "cd" * 32)
    assert (spec.policy_training, spec.parent_job_id, spec.policy_version) == (None, "p1", "cd" * 32)
