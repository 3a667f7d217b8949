"""`seal bench rest-em`: the ReST-EM outer loop on SQuAD training passages, through the services.

Builds a policy-training job from training passages (never the 200 evaluation passages: the same
split as `seal bench recipe`, after the passages the recipe study used), submits it to a local stack
(or to `--gateway`), follows it round by round, and writes what the results table needs:
<out>/job.json (the finished job) and <out>/policies.json (round -> policy version and the
directory of its adapter, for `seal bench knowledge --policy roundN=DIR`), and <out>/roundN.json (each
round's E-step job: every self-edit with its text and rewards).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from seal.models import DEFAULT_MODEL
from seal.records import LoraSettings, PolicySettings, PolicyTraining, SamplingSettings, to_dict


def job_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from seal.bench.knowledge import load_training_items

    items = load_training_items(args.data, args.skip + args.contexts, seed=args.seed)[args.skip :]
    documents = [to_dict(item.doc) for item in items]
    training = PolicyTraining(
        rounds=args.rounds,
        selection=args.selection,
        reward_threshold=args.threshold,
        policy=PolicySettings(objective=args.objective, epochs=args.policy_epochs),
        continue_from_last=not args.restart_from_base,
    )
    return {
        "documents": documents,
        "n_self_edits": args.n,
        "seeds": args.seeds,
        "passage_control": False,
        "lora": to_dict(LoraSettings(epochs=args.epochs) if args.epochs else LoraSettings()),
        "sampling": to_dict(SamplingSettings(max_new_tokens=args.max_new_tokens)),
        "policy_training": to_dict(training),
    }


def cmd_rest_em(args: argparse.Namespace) -> int:
    from gateway.api import parse_job_spec
    from gateway.client import GatewayClient
    from seal.cli import render_table, watch_with_progress
    from seal.records import to_json
    from seal.stack import LocalStack

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = parse_job_spec(job_from_args(args))
    (out / "spec.json").write_text(to_json(spec))
    started = time.monotonic()
    stack = None
    if not args.gateway:
        stack = LocalStack(
            model=args.model, data_dir=out / "stack", supervise=True, tls_dir=out / "stack" / "tls"
        )
        stack.start()
    try:
        if stack is not None:
            client = GatewayClient(
                stack.addresses["gateway"], token=stack.operator_token, tls=stack.tls.get("client")
            )
        else:
            client = GatewayClient(args.gateway, token=args.token)
        job = client.submit(spec)
        print(
            f"policy-training job {job.id}: {len(spec.documents)} training contexts, {args.rounds} rounds",
            flush=True,
        )
        job = watch_with_progress(client, job.id)
        for r in job.rounds:  # each round's E-step job: every self-edit with its text, runs and rewards
            (out / f"round{r.round}.json").write_text(to_json(client.get(r.job_id)))
    finally:
        if stack is not None:
            stack.stop()
    (out / "job.json").write_text(to_json(job))
    teacher_dir = (out / "stack" / "teacher" / "policies") if stack is not None else None
    policies = {
        f"round{r.round}": {
            "version": r.trained.version,
            "path": str(teacher_dir / r.trained.version) if teacher_dir is not None else "",
            "mean_reward_of_its_round": r.mean_reward,
            "examples": r.trained.examples,
        }
        for r in job.rounds
        if r.trained is not None
    }
    (out / "policies.json").write_text(json.dumps(policies, indent=2))
    print(render_table(job))
    print(f"\nwall time: {time.monotonic() - started:.0f} s; policies: {out / 'policies.json'}")
    return 0 if job.state.value == "succeeded" else 1


def add_rest_em_command(sub: Any, default_data: Path) -> None:
    p = sub.add_parser(
        "rest-em", help="the ReST-EM outer loop on SQuAD training passages (a policy-training job)"
    )
    p.add_argument("--contexts", type=int, default=8, help="training contexts")
    p.add_argument("--skip", type=int, default=8, help="training passages to skip (the recipe study's)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the training passages")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n", type=int, default=3, help="self-edits per context")
    p.add_argument("--seeds", type=int, default=1, help="training runs per self-edit")
    p.add_argument("--selection", default="best_of_n", choices=["best_of_n", "threshold"])
    p.add_argument("--threshold", type=float, default=0.0, help="reward a selected self-edit must exceed")
    p.add_argument("--objective", default="sft", choices=["sft", "dpo", "discopop"])
    p.add_argument("--policy-epochs", type=int, default=2)
    p.add_argument("--restart-from-base", action="store_true", help="each M-step starts from the base policy")
    p.add_argument("--max-new-tokens", type=int, default=256, help="per self-edit")
    p.add_argument(
        "--epochs", type=int, default=0, help="inner-loop epochs (0: the default recipe's; the table runs 5)"
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, default=default_data)
    p.add_argument("--out", default="bench-out/rest-em")
    p.add_argument("--gateway", default="", help="use this gateway instead of starting a local stack")
    p.add_argument("--token", default="", help="its API token")
    p.set_defaults(func=cmd_rest_em)
