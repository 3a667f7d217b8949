"""Benchmark: torch threads per model service when three services share a small machine.

`seal up` gives each model service cores/3 torch threads instead of torch's default (one per
core). This script measures why, side by side in one run: it trains one LoRA adapter on the
default model while two other processes keep the CPU busy the way the teacher and auditor do
(generating with the same model), once with torch's default threads everywhere and once with
cores/3 threads everywhere, and prints both times and their ratio.

    .venv/bin/python benchmarks/oversubscription.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time


def _busy_generator(threads: int, stop: mp.Event, ready: mp.Event) -> None:
    import torch

    from seal.models import DEFAULT_MODEL, load_model, resolve_model

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(resolve_model(DEFAULT_MODEL))
    ids = tokenizer(
        ["Let's read the following passage and produce a list of implications."] * 3, return_tensors="pt"
    )
    ready.set()
    with torch.inference_mode():
        while not stop.is_set():
            model.generate(**ids, max_new_tokens=16, do_sample=False)


def _train(threads: int, steps: int, queue: mp.Queue) -> None:
    import torch

    from seal.models import DEFAULT_MODEL, load_model, resolve_model
    from seal.records import LoraSettings
    from student.training import release_adapter, train_adapter

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(resolve_model(DEFAULT_MODEL))
    text = "The Zorbian calendar was devised by the astronomer Pell Andrik in the city of Quorvane."
    lora = LoraSettings(epochs=steps)
    warm, _ = train_adapter(model, tokenizer, [text], LoraSettings(epochs=2))  # first steps are slow
    release_adapter(warm)
    started = time.perf_counter()
    _, stats = train_adapter(model, tokenizer, [text], lora)
    queue.put(
        {"seconds": time.perf_counter() - started, "steps": stats.steps, "threads": torch.get_num_threads()}
    )


def run(threads: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    stop, queue = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(2)]
    # daemon: the load generators die with this process, whatever happens to it
    busy = [ctx.Process(target=_busy_generator, args=(threads, stop, r), daemon=True) for r in readies]
    for p in busy:
        p.start()
    for r in readies:
        r.wait(300)
    trainer = ctx.Process(target=_train, args=(threads, steps, queue))
    trainer.start()
    result = queue.get(timeout=3600)
    trainer.join()
    stop.set()
    for p in busy:
        p.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    default = run(0, args.steps)
    per_service = run(max(1, cores // 3), args.steps)
    print(
        json.dumps(
            {
                "cores": cores,
                "steps": args.steps,
                "torch_default_threads": default,
                "cores_div_3_threads": per_service,
                "speedup": round(default["seconds"] / per_service["seconds"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
