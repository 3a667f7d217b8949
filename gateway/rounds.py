"""The outer loop's bookkeeping: ReST-EM rounds of a policy-training job, as pure functions.

A policy-training job runs R rounds. Round r's E-step is an ordinary knowledge-incorporation job
(its "round job") whose self-edits the current policy writes; every self-edit is trained once per
seed and audited. When the round job is complete, the selection rule picks the self-edits the
policy learns from, and the M-step (a PolicyTask for a teacher) fine-tunes the policy on them; the
trained version writes round r+1. No transport and no Redis here: gateway.conductor does the I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import statistics

from gateway.core import rankable
from seal.errors import InvalidArgument
from seal.records import (
    DocumentResult,
    EditResult,
    Job,
    JobSpec,
    PolicyExample,
    PolicyTask,
    PolicyTraining,
    PolicyVersion,
    RoundResult,
)
from seal.validation import PREFERENCE_OBJECTIVES
from teacher.prompts import build_prompt


def round_job_id(parent_id: str, round_number: int) -> str:
    """The E-step job of round `round_number`: a fixed id, so starting a round twice starts it once."""
    return hashlib.sha256(f"{parent_id}/round/{round_number}".encode()).hexdigest()[:16]


def round_spec(parent: JobSpec, parent_id: str, policy_version: str) -> JobSpec:
    """The knowledge-incorporation job of one round: the parent's contexts, written by `policy_version`."""
    return dataclasses.replace(
        parent, policy_training=None, parent_job_id=parent_id, policy_version=policy_version
    )


def candidates(doc: DocumentResult) -> list[EditResult]:
    """A context's sampled, audited self-edits that may be learnt from (never the control or a leak)."""
    return [e for e in doc.edits if e.reward is not None and rankable(e)]


def select_examples(round_job: Job, training: PolicyTraining, objective: str) -> list[PolicyExample]:
    """What the M-step learns from, by the job's selection rule and objective.

    - sft + best_of_n: per context the self-edit with the highest mean reward (ties: the first), as
      the reference keeps, if that reward exceeds `reward_threshold` (0 by default: a self-edit that
      taught nothing has nothing to teach the policy).
    - sft + threshold: every self-edit whose mean reward exceeds `reward_threshold`, as the paper's
      ReST-EM equation (a binary reward) states.
    - dpo / discopop: per context the best and the worst self-edit as (chosen, rejected) when the best
      is strictly better; under "threshold" the chosen one must also exceed it.
    """
    examples = []
    for doc in round_job.documents:
        pool = candidates(doc)
        if not pool:
            continue
        spec_doc = round_job.spec.documents[doc.doc_index]
        prompt = build_prompt(spec_doc.passage(), round_job.spec.edit_format)
        # Sort by mean reward, best first; ties keep the lower sample index first.
        ranked = sorted(pool, key=lambda e: (-(e.reward or 0.0), e.self_edit.index))
        if objective in PREFERENCE_OBJECTIVES:
            best, worst = ranked[0], ranked[-1]
            good_enough = training.selection != "threshold" or best.reward > training.reward_threshold  # type: ignore[operator]
            if best.reward > worst.reward and good_enough:  # type: ignore[operator]
                examples.append(_example(doc.doc_index, prompt, best, worst))
        elif training.selection == "best_of_n":
            if ranked[0].reward > training.reward_threshold:  # type: ignore[operator]
                examples.append(_example(doc.doc_index, prompt, ranked[0]))
        else:
            examples += [
                _example(doc.doc_index, prompt, e)
                for e in ranked
                if e.reward > training.reward_threshold  # type: ignore[operator]
            ]
    return examples


def _example(
    doc_index: int, prompt: str, chosen: EditResult, rejected: EditResult | None = None
) -> PolicyExample:
    evidence = [
        f"{r.verdict.self_edit_id}@{r.verdict.adapter_sha256}"
        for e in (chosen, rejected)
        if e is not None
        for r in e.runs()
        if r.verdict is not None
    ]
    return PolicyExample(
        context_id=str(doc_index),
        prompt=prompt,
        chosen=chosen.self_edit.text,
        rejected=rejected.self_edit.text if rejected is not None else "",
        chosen_reward=chosen.reward or 0.0,
        rejected_reward=(rejected.reward or 0.0) if rejected is not None else 0.0,
        evidence=tuple(evidence),
    )


def mean_reward(round_job: Job) -> float | None:
    """Mean over the round's audited sampled self-edits of their mean reward (the control excluded)."""
    rewards = [e.reward for d in round_job.documents for e in d.edits if e.reward is not None and rankable(e)]
    return statistics.fmean(rewards) if rewards else None  # type: ignore[arg-type]


def contexts_done(round_job: Job) -> int:
    """Contexts whose every self-edit has a verdict for every seed."""
    per_doc = round_job.spec.n_self_edits + int(round_job.spec.passage_control)
    seeds = max(round_job.spec.seeds, 1)
    return sum(
        len(d.edits) == per_doc
        and all(r.verdict is not None for e in d.edits for r in e.runs())
        and all(len(e.runs()) == seeds for e in d.edits)
        for d in round_job.documents
    )


def policy_task(parent: Job, round_number: int, round_job: Job, parent_version: str) -> PolicyTask:
    """The M-step of `round_number`; InvalidArgument when the selection is empty (nothing to learn)."""
    training = parent.spec.policy_training
    assert training is not None, "policy_task is for policy-training jobs"
    examples = select_examples(round_job, training, training.policy.objective)
    if not examples:
        raise InvalidArgument(
            "policy_training.reward_threshold",
            f"selected no self-edit: none of its {len(round_job.documents)} contexts "
            f"had a self-edit with mean reward above {training.reward_threshold}"
            + (
                " and a worse one to pair it with"
                if training.policy.objective in PREFERENCE_OBJECTIVES
                else ""
            ),
        )
    return PolicyTask(
        job_id=parent.id,
        round=round_number,
        parent=parent_version if training.continue_from_last else "",
        settings=training.policy,
        examples=tuple(examples),
        round_mean_reward=mean_reward(round_job) or 0.0,
        teacher_model=parent.spec.teacher_model,
    )


def round_result(
    round_number: int,
    round_job: Job | None,
    policy_version: str,
    trained: PolicyVersion | None,
    selected: int,
) -> RoundResult:
    """One round as the parent job reports it."""
    if round_job is None:
        return RoundResult(
            round=round_number, policy_version=policy_version, trained=trained, selected=selected
        )
    return RoundResult(
        round=round_number,
        job_id=round_job.id,
        policy_version=policy_version,
        contexts=len(round_job.spec.documents),
        contexts_done=contexts_done(round_job),
        mean_reward=mean_reward(round_job),
        trained=trained,
        selected=selected,
    )
