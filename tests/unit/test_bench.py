"""`seal bench`: interval maths, no best-of-N, resume, cached self-edits, outputs, the commands end to end.

A tiny random Llama and fixture data written here; only the last test reads ../shared/data (and skips
when it is absent).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from seal.bench import report
from seal.bench.knowledge import (
    RELEASED,
    TEACHER,
    Bench,
    Condition,
    Item,
    Setup,
    Student,
    combined_self_edit,
    condition_digest,
    default_data_dir,
    edit_indices,
    knowledge_conditions,
    load_eval_items,
    load_training_items,
    lora_key,
    plan_of,
)
from seal.cli import main
from seal.records import EditFormat, LoraSettings, Passage
from student.sequences import build_training_texts

TINY_LORA = LoraSettings(rank=2, alpha=4.0, epochs=1, max_seq_len=48)


def _record(i: int, completions: int = 2) -> dict:
    return {
        "title": f"Zorbia {i}",
        "context": f"The Zorbian council meets in Velmora {i} every spring.",
        "questions": [{"question": f"Where does council {i} meet?", "answer": "Velmora"}],
        "completions": [
            f"The council of Zorbia {i} meets in Velmora.\nEdit {c} of passage {i}."
            for c in range(completions)
        ],
    }


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """base/gpt/iter2 files over passages 0-2, and a squad_val.json of those plus 3 training passages."""
    d = tmp_path / "data"
    d.mkdir()
    evals = [_record(i) for i in range(3)]
    for name in RELEASED.values():
        (d / name).write_text(json.dumps(evals))
    squad = [{k: v for k, v in r.items() if k != "completions"} for r in [_record(i) for i in range(6)]]
    (d / "squad_val.json").write_text(json.dumps(squad))
    return d


# --- interval maths --------------------------------------------------------------------------------------


def test_normal_interval_matches_the_hand_computed_one() -> None:
    # mean 0.5; sd = sqrt((0.25 + 0.25 + 0 + 0) / 3) = 0.408248; half = 1.96 * 0.408248 / 2 = 0.400083
    low, high = report.normal_interval([0.0, 1.0, 0.5, 0.5])
    assert low == pytest.approx(0.099917, abs=1e-6)
    assert high == pytest.approx(0.900083, abs=1e-6)
    assert report.sample_sd([0.0, 1.0, 0.5, 0.5]) == pytest.approx(math.sqrt(1 / 6))


def test_intervals_of_one_passage_or_none_are_undefined_not_zero_width() -> None:
    assert all(math.isnan(x) for x in report.normal_interval([0.4]))
    assert all(math.isnan(x) for x in report.normal_interval([]))
    assert all(math.isnan(x) for x in report.bootstrap_interval([]))
    assert all(math.isnan(x) for x in report.bootstrap_interval([0.4]))


def test_bootstrap_interval_is_seeded_and_takes_the_percentiles() -> None:
    assert report.bootstrap_interval([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3))
    # Two passages: resampled means are 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so 2.5 % -> 0 and 97.5 % -> 1.
    assert report.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    values = [0.0, 0.2, 0.2, 0.5, 1.0, 0.4]
    first = report.bootstrap_interval(values)
    assert first == report.bootstrap_interval(values)
    assert 0.0 <= first[0] < report.mean(values) < first[1] <= 1.0


# --- no best-of-N, digests, stale rows --------------------------------------------------------------------


def _row(condition: str, digest: str, passage: int, sample: int, accuracy: float) -> dict:
    return {
        "condition": condition,
        "digest": digest,
        "passage": passage,
        "sample": sample,
        "accuracy": accuracy,
        "generation_seconds": 1.0,
        "train_seconds": 2.0,
        "eval_seconds": 3.0,
        "edit_chars": 100,
        "edit_lines": 4,
    }


def test_passage_score_is_the_mean_of_its_samples_and_incomplete_or_stale_passages_wait() -> None:
    plan = report.Plan("teacher", "ours", "d1", samples=2, self_edits=True)
    rows = [
        _row("teacher", "d1", 0, 0, 0.0),
        _row("teacher", "d1", 0, 1, 1.0),
        _row("teacher", "d1", 1, 0, 1.0),  # sample 1 of passage 1 not in yet
        _row("teacher", "old", 2, 0, 1.0),  # another recipe's rows
        _row("teacher", "old", 2, 1, 1.0),
    ]
    s = report.summarize(rows, plan)
    assert s.per_passage == {0: 0.5}  # not 1.0: the best sample gets no say of its own
    assert (s.passages, s.accuracy, s.seconds_per_passage) == (1, 0.5, 12.0)


def test_markdown_table_names_its_intervals_and_rows() -> None:
    rows = [_row("passage", "d", p, 0, a) for p, a in enumerate([0.0, 0.5, 1.0])]
    s = report.summarize(rows, report.Plan("passage", "passage only", "d", 1, False))
    text = report.markdown_table([s], "Knowledge", ["a note"])
    assert "| passage only | 50.0 % | " in text
    assert "| 3 | 1 | – | – | 6.0 |" in text  # passages, samples, no self-edit lengths, seconds
    assert "95 % CI (normal)" in text and "95 % CI (bootstrap)" in text
    assert "mean ± 1.96·sd/√n" in text and "seed 0" in text and "a note" in text


def test_a_round_against_the_untrained_teacher_is_paired_by_passage(tmp_path: Path) -> None:
    untrained = [_row("teacher", "d", p, 0, a) for p, a in enumerate([0.0, 0.2, 0.6, 0.4])]
    trained = [_row("policy-r1", "d", p, 0, a) for p, a in enumerate([0.2, 0.4, 0.8])]  # passage 3 not in
    base = report.summarize(untrained, report.Plan("teacher", "ours (untrained)", "d", 1, True))
    r1 = report.summarize(trained, report.Plan("policy-r1", "ours, round 1", "d", 1, True))
    d = report.paired_difference(r1, base)
    # Three shared passages, each +0.2: the difference is exact and the paired interval has no width,
    # while the unpaired intervals of the two rows overlap widely.
    assert (d.passages, d.against) == (3, "teacher")
    assert math.isclose(d.difference, 0.2)
    assert all(math.isclose(b, 0.2) for b in d.bootstrap_95)
    assert r1.bootstrap_95[0] < base.bootstrap_95[1]
    text = report.paired_table([d], base.label)
    assert "### Against ours (untrained), paired by passage" in text
    assert "| ours, round 1 | +20.0 | 20.0–20.0 | 3 |" in text
    # The bench's table carries it when the run has the untrained teacher and a later round.
    bench = Bench(tmp_path, Setup("m", "m"), Student(None, None), None, rounds=["teacher", "policy-r1"])
    assert "paired by passage" in bench._table([base, r1])
    assert "paired by passage" not in bench._table([base])


def test_plot_is_a_png(tmp_path: Path) -> None:
    rows = [_row(name, "d", p, 0, a) for name in ("teacher", "policy-r1") for p, a in enumerate([0.2, 0.6])]
    summaries = [report.summarize(rows, report.Plan(n, n, "d", 1, True)) for n in ("teacher", "policy-r1")]
    report.write_plot(summaries, tmp_path / "accuracy.png", "t", rounds=["teacher", "policy-r1"])
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_n_update_trains_on_the_union_of_the_self_edits_lines() -> None:
    cond = Condition("all", "all", "all", TEACHER, n=2)
    passage = Passage("Zorbia", "The council meets in Velmora.")
    edit = combined_self_edit(
        cond, passage, ["1. First fact.\n2. Shared fact.", "- Shared fact.\n- Third fact."]
    )
    assert edit.lines == ("First fact.", "Shared fact.", "Third fact.")
    assert build_training_texts(edit) == [
        "Zorbia\nThe council meets in Velmora.",
        "Zorbia\nFirst fact.",
        "Zorbia\nShared fact.",
        "Zorbia\nThird fact.",
    ]


def test_a_changed_recipe_changes_the_digest_but_not_no_adaptation() -> None:
    setup = Setup("student", "teacher")
    for data in ("passage", "one"):
        cond = Condition("c", "c", data, "qwen2.5-7b" if data == "one" else "")
        changed = replace(cond, lora=replace(cond.lora, epochs=3))
        assert plan_of(cond, setup).digest != plan_of(changed, setup).digest
    none = Condition("none", "none", "none")
    assert plan_of(none, setup).digest == plan_of(replace(none, lora=TINY_LORA), setup).digest


def test_fields_added_to_the_recipe_later_change_the_digest_only_when_switched_on() -> None:
    """Rows written before LoraSettings had replay and a KL penalty are reused while both are off; the
    gate (where a served adapter applies, not what it learns) never changes a row."""
    setup = Setup("student", "teacher")
    cond = Condition("passage", "passage", "passage")
    written_before = {k: v for k, v in asdict(cond.lora).items() if k not in ("replay", "kl_weight", "gate")}
    assert lora_key(cond.lora) == written_before
    for on in (replace(cond.lora, replay=8), replace(cond.lora, kl_weight=1.0)):
        assert plan_of(replace(cond, lora=on), setup).digest != plan_of(cond, setup).digest
    assert (
        plan_of(replace(cond, lora=replace(cond.lora, gate=0)), setup).digest == plan_of(cond, setup).digest
    )


# --- the engine on a tiny model: resume, cache, outputs -------------------------------------------------


class CountingSampler:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, cond: Condition, passage: Passage, seed: int) -> tuple[str, float]:
        self.calls.append((passage.title, seed))
        return f"{passage.title} is in Velmora.\nSample {seed} says spring.", 0.5


def _conditions(lora: LoraSettings) -> list[Condition]:
    return [
        Condition("none", "no adaptation", "none", lora=lora),
        Condition("passage", "passage only", "passage", lora=lora),
        Condition("teacher", "ours", "one", TEACHER, lora),
        Condition("qwen2.5-7b", "Qwen", "one", "qwen2.5-7b", lora),
    ]


def _bench(out: Path, tiny_model, sampler: CountingSampler) -> Bench:
    setup = Setup("tiny", "tiny", samples=2, answer_tokens=4)
    return Bench(out, setup, Student(*tiny_model), sampler, rounds=["teacher"], log=lambda _: None)


def _result_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_resume_skips_finished_rows_and_reuses_cached_self_edits(
    tmp_path: Path, data_dir: Path, tiny_model
) -> None:
    items = load_eval_items(data_dir, 2)
    out = tmp_path / "out"
    sampler = CountingSampler()
    summaries = _bench(out, tiny_model, sampler).run(_conditions(TINY_LORA), items)
    # 2 passages × (none 1 + passage 1 + teacher 2 samples + qwen 2 samples)
    assert len(_result_lines(out)) == 12
    assert sorted(sampler.calls) == [("Zorbia 0", 0), ("Zorbia 0", 1), ("Zorbia 1", 0), ("Zorbia 1", 1)]
    assert [s.passages for s in summaries] == [2, 2, 2, 2]
    for name in ("table.md", "summary.json", "accuracy.png", "self_edits.jsonl"):
        assert (out / name).is_file()
    teacher_row = next(r for r in _result_lines(out) if r["condition"] == "teacher")
    assert teacher_row["edit_lines"] == 2 and teacher_row["steps"] == 3 and teacher_row["responses"]
    assert teacher_row["generation_seconds"] == 0.5

    # A restart (a fresh Bench on the same folder) redoes nothing and samples nothing.
    again = CountingSampler()
    _bench(out, tiny_model, again).run(_conditions(TINY_LORA), items)
    assert len(_result_lines(out)) == 12 and again.calls == []

    # A changed recipe reruns every trained row (not no adaptation) on the cached self-edits.
    changed = CountingSampler()
    summaries = _bench(out, tiny_model, changed).run(_conditions(replace(TINY_LORA, epochs=2)), items)
    new_rows = _result_lines(out)[12:]
    assert len(new_rows) == 10 and {r["condition"] for r in new_rows} == {"passage", "teacher", "qwen2.5-7b"}
    assert changed.calls == []
    assert all(s.passages == 2 for s in summaries)
    summary = json.loads((out / "summary.json").read_text())
    assert [c["name"] for c in summary["conditions"]] == ["none", "passage", "teacher", "qwen2.5-7b"]

    # A shorter run in the same folder tables its own passages only, not the longer run's others.
    shorter = _bench(out, tiny_model, CountingSampler()).run(_conditions(TINY_LORA), items[:1])
    assert all(s.passages == 1 for s in shorter)


def test_a_truncated_last_line_is_redone(tmp_path: Path, data_dir: Path, tiny_model) -> None:
    items = load_eval_items(data_dir, 1)
    out = tmp_path / "out"
    conditions = _conditions(TINY_LORA)[:2]
    _bench(out, tiny_model, CountingSampler()).run(conditions, items)
    text = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(text[: len(text) - 20])  # a crash in the middle of the last append
    _bench(out, tiny_model, CountingSampler()).run(conditions, items)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["condition"] == "passage"
    assert [c.passages for c in _bench(out, tiny_model, CountingSampler()).summaries(conditions)] == [1, 1]


def test_training_split_excludes_the_evaluation_passages(data_dir: Path) -> None:
    items = load_training_items(data_dir, 10)
    assert sorted(i.index for i in items) == [3, 4, 5]
    assert load_training_items(data_dir, 2) == load_training_items(data_dir, 2)


# --- the commands -------------------------------------------------------------------------------------


def test_seal_bench_knowledge_and_multi_doc(tmp_path: Path, data_dir: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    common = ["--model", str(tiny_model_dir), "--data", str(data_dir), "--out", str(out), "--passages", "2"]
    tiny = ["--epochs", "1", "--rank", "2", "--max-new-tokens", "6", "--answer-tokens", "4"]
    argv = ["bench", "knowledge", *common, *tiny, "--conditions", "none,gpt-4.1"]
    assert main([*argv, "--multi-doc", "2", "--multi-doc-edits", "2"]) == 0
    table = (out / "table.md").read_text()
    assert "| no adaptation |" in table and "| passage + GPT-4.1 (released) |" in table
    multidoc = (out / "table_multidoc.md").read_text()
    assert (
        "2 passages in one update" in multidoc and "| passage + our teacher (untrained), 2 each |" in multidoc
    )
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["multidoc"]) == 5 and all(m["passages"] == 2 for m in summary["multidoc"])
    assert len((out / "self_edits.jsonl").read_text().splitlines()) == 4  # our teacher: 2 passages × 2 seeds


def test_seal_bench_recipe_uses_training_passages_only(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path
) -> None:
    out = tmp_path / "out"
    argv = ["bench", "recipe", "--model", str(tiny_model_dir), "--data", str(data_dir), "--out", str(out)]
    argv += ["--passages", "2", "--n", "2", "--max-new-tokens", "6", "--answer-tokens", "4", "--rank", "2"]
    assert main([*argv, "--conditions", "passage,all-e5-constant"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["passage"] for r in rows} <= {3, 4, 5} and len(rows) == 4
    assert {r["condition"] for r in rows} == {"passage", "all-e5-constant"}
    # The all-N row's update holds the lines of both cached self-edits.
    assert all(r["edit_indices"] == [0, 1] for r in rows if r["condition"] == "all-e5-constant")


def test_join_makes_every_self_edit_row_the_default_recipes_joined_update() -> None:
    single = knowledge_conditions(TINY_LORA, EditFormat.IMPLICATIONS, [("r1", "/p")])
    joined = knowledge_conditions(TINY_LORA, EditFormat.IMPLICATIONS, [("r1", "/p")], join=3)
    by_name = {c.name: c for c in joined}
    assert set(by_name) == {
        "none",
        "passage",
        "teacher-join3",
        "qwen2.5-7b-join3",
        "gpt-4.1-join3",
        "seal-round2-join3",
        "policy-r1-join3",
    }
    assert all(c.data == "all" and c.n == 3 for c in joined if c.self_edits)
    assert by_name["policy-r1-join3"].policy_path == "/p"
    assert edit_indices(by_name["teacher-join3"], 0) == [0, 1, 2]
    # Rows without self-edits are the same rows (same digest: reused), the joined ones are new.
    setup = Setup("student", "teacher")
    digests = {c.name: plan_of(c, setup).digest for c in single if not c.policy}
    assert plan_of(by_name["passage"], setup).digest == digests["passage"]
    assert plan_of(by_name["qwen2.5-7b-join3"], setup).digest != digests["qwen2.5-7b"]
    with pytest.raises(ValueError, match="--join must be at least 1"):
        knowledge_conditions(TINY_LORA, EditFormat.IMPLICATIONS, join=0)


def test_seal_bench_knowledge_join_trains_the_joined_completions_and_refuses_too_few(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["bench", "knowledge", "--model", str(tiny_model_dir), "--data", str(data_dir), "--out", str(out)]
    argv += ["--passages", "2", "--epochs", "1", "--rank", "2", "--answer-tokens", "4"]
    assert main([*argv, "--join", "2", "--conditions", "gpt-4.1-join2"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["condition"], r["edit_indices"]) for r in rows] == [("gpt-4.1-join2", [0, 1])] * 2
    assert "2 self-edits joined" in (out / "table.md").read_text()
    # The fixture's released files hold 2 completions per passage: joining 3 is refused before training.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--join", "3", "--conditions", "gpt-4.1-join3"])
    assert exc.value.code == 2
    assert "needs 3 self-edits per passage; the released file has 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--join", "2", "--samples", "2", "--conditions", "gpt-4.1-join2"])
    assert "with --join each row is one joined update" in capsys.readouterr().err


def test_unknown_condition_names_are_refused(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "recipe", "--data", str(data_dir), "--out", str(tmp_path), "--conditions", "nope"])
    assert exc.value.code == 2


# --- the real files ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not (default_data_dir() / "squad_val.json").is_file(), reason="../shared/data absent")
def test_real_files_split_disjoint_and_released_completions_load() -> None:
    data = default_data_dir()
    evals = load_eval_items(data)
    assert len(evals) == 200
    assert all(len(i.released[s]) == 5 for i in evals[:5] for s in RELEASED)
    held_out = {(i.doc.title, i.doc.context) for i in evals}
    train = load_training_items(data, 3000)
    assert train and not {(i.doc.title, i.doc.context) for i in train} & held_out
    assert len(train) + len(held_out) == len(json.loads((data / "squad_val.json").read_text()))
    assert isinstance(train[0], Item)


def _rest_em_args(data_dir: Path, **over: object):
    import argparse

    from seal.bench.rest_em import add_rest_em_command

    parser = argparse.ArgumentParser()
    add_rest_em_command(parser.add_subparsers(), data_dir)
    flags = ["rest-em", "--contexts", "2", "--skip", "1", "--data", str(data_dir)]
    for name, value in over.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    return parser.parse_args(flags)


def test_rest_em_job_trains_its_updates_with_the_epochs_asked_for(data_dir: Path) -> None:
    from seal.bench.rest_em import job_from_args

    default = job_from_args(_rest_em_args(data_dir))
    assert default["lora"]["epochs"] == LoraSettings().epochs
    five = job_from_args(_rest_em_args(data_dir, epochs=5))
    assert five["lora"]["epochs"] == 5
    # The contexts are training passages after the skipped ones, never evaluation passages.
    assert [d["title"] for d in five["documents"]] == [
        item.doc.title for item in load_training_items(data_dir, 3)[1:]
    ]


def _benchmark(name: str):  # noqa: ANN202
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_host():  # noqa: ANN202
    return _benchmark("rest_em_one_host")


def test_seed_spread_pairs_two_conditions_over_the_passages_both_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def row(condition: str, passage: int, accuracy: float, sample: int = 0, digest: str = "d") -> dict:
        return {
            "condition": condition,
            "passage": passage,
            "sample": sample,
            "accuracy": accuracy,
            "digest": digest,
        }

    rows = [row("teacher", p, 0.2 * p) for p in range(3)] + [
        row("teacher", p, 0.2, sample=1) for p in range(3)
    ]
    rows += [row("qwen", 0, 0.5), row("qwen", 1, 0.5), row("qwen", 1, 0.0, sample=1)]  # no passage 2
    rows.append({**row("qwen", -1, 1.0), "multidoc": True})  # the CPT row: never paired
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spread = _benchmark("seed_spread")
    assert spread.main([str(results), "--pair", "qwen,teacher"]) == 0
    out = capsys.readouterr().out
    assert "seed 1 - seed 0 (run-to-run): +0.0 points" in out
    # Passages 0 and 1: (0.5 - 0.0 + 0.5 - 0.2) / 2 = +0.4.
    assert "qwen - teacher (2 passages, 50.0 % against 10.0 %): +40.0 points" in out
    # A row of another recipe (an older digest) is left out, and said to be.
    results.write_text(results.read_text() + json.dumps(row("qwen", 2, 1.0, digest="other")) + "\n")
    assert spread.main([str(results), "--pair", "qwen,teacher"]) == 0
    out = capsys.readouterr().out
    assert "(qwen: 1 row(s) of another recipe left out, digest d kept)" in out
    assert "qwen - teacher (2 passages, 50.0 % against 10.0 %): +40.0 points" in out
    # A run without the untrained row (a --join table, say) still pairs its own rows.
    joined = tmp_path / "joined.jsonl"
    joined.write_text(
        "".join(
            json.dumps(row(c, p, a)) + "\n"
            for c, p, a in [("a", 0, 0.5), ("b", 0, 0.25), ("a", 1, 0.5), ("b", 1, 0.25)]
        )
    )
    capsys.readouterr()
    assert spread.main([str(joined), "--pair", "a,b"]) == 0
    assert (
        capsys.readouterr().out
        == "a - b (2 passages, 50.0 % against 25.0 %): +25.0 points (95 % +25.0 to +25.0)\n"
    )


def test_one_host_rest_em_keeps_each_contexts_best_self_edit_above_the_threshold() -> None:
    module = _one_host()
    rows = [
        {"context": 7, "sample": 0, "reward": 0.2},
        {"context": 7, "sample": 1, "reward": 0.4},
        {"context": 7, "sample": 2, "reward": 0.4},  # a tie: the lower sample wins
        {"context": 9, "sample": 0, "reward": 0.0},  # nothing taught: not learnt from
        {"context": 11, "sample": 0, "reward": -0.2},
        {"context": 11, "sample": 1, "reward": 0.2},
    ]
    chosen = module.select_best(rows, threshold=0.0)
    assert [(r["context"], r["sample"]) for r in chosen] == [(7, 1), (11, 1)]
    assert [r["context"] for r in module.select_best(rows, threshold=-1.0)] == [7, 9, 11]


def test_a_policy_row_is_keyed_by_the_adapters_content_not_only_its_path(tmp_path: Path) -> None:
    from seal.bench import knowledge

    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "adapter_config.json").write_text("{}")
    (policy / "adapter_model.safetensors").write_bytes(b"weights of round 1")
    setup = Setup("m", "m")
    cond = Condition("policy-r1", "ours, r1", "one", TEACHER, policy="r1", policy_path=str(policy))
    untrained = Condition("teacher", "ours", "one", TEACHER)
    first = condition_digest(cond, setup)
    (policy / "adapter_model.safetensors").write_bytes(b"weights retrained in place")
    knowledge._policy_sha256.cache_clear()
    assert condition_digest(cond, setup) != first
    # Moved elsewhere, config rewritten (PEFT records a local path there): the same row.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter_config.json").write_text('{"base_model_name_or_path": "smollm2-135m"}')
    (moved / "adapter_model.safetensors").write_bytes(b"weights retrained in place")
    assert condition_digest(replace(cond, policy_path=str(moved)), setup) == condition_digest(cond, setup)
    # The untrained teacher's key is as it always was: its rows stay valid.
    assert "policy_sha256" not in knowledge.teacher_source_key(untrained, setup)


def test_one_host_rest_em_resumes_a_cut_round_and_writes_its_policy_whole(
    tmp_path: Path, data_dir: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import sys

    module = _one_host()
    out = tmp_path / "out"
    flags = ["x", "--model", str(tiny_model_dir), "--data", str(data_dir), "--out", str(out), "--skip", "0"]
    flags += ["--contexts", "2", "--n", "2", "--chunk", "1", "--rounds", "1", "--epochs", "1"]
    flags += ["--max-new-tokens", "8", "--threshold", "-1"]
    monkeypatch.setattr(sys, "argv", flags)
    assert module.main() == 0
    policy = out / "round1-policy"
    assert (policy / "adapter_model.safetensors").is_file() and not (policy / "README.md").exists()
    assert json.loads((out / "round1.json").read_text())["examples"] == 2
    # A crash cut the last row short and the policy was never renamed into place: the rerun redoes
    # that context only, and trains the policy again.
    text = (out / "round1.jsonl").read_text()
    first = json.loads(text.splitlines()[0])["context"]
    (out / "round1.jsonl").write_text(text[: len(text) - 40])
    shutil.rmtree(policy)
    assert module.main() == 0
    rows = [
        json.loads(line) for line in (out / "round1.jsonl").read_text().splitlines() if line.endswith("}")
    ]
    assert sum(r["context"] == first for r in rows) == 2  # the context finished before the cut: kept
    assert len(rows) == 5 and len({(r["context"], r["sample"]) for r in rows}) == 4  # the other: redone
    assert (policy / "adapter_config.json").is_file() and not (out / "round1-policy.partial").exists()
