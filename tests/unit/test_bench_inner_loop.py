"""`seal bench inner-loop`: the maths (FLOPs, utilization, rank correlation), the reference's padding,
the three configurations end to end on a tiny random Llama through the CLI, resume, the answerer plug.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from seal.bench import inner_loop
from seal.bench.inner_loop import (
    Settings,
    lora_training_flops,
    markdown_tables,
    ranks,
    reference_features,
    spearman,
    summarize_config,
    utilization,
)
from seal.bench.knowledge import RELEASED
from seal.cli import build_parser, main
from seal.models import load_model

# --- maths -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("xs", "ys", "rho"),
    [
        ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
        ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
        ([1, 2, 3], [1, 3, 2], 0.5),
        ([0.0, 0.2, 0.2, 0.4], [0.1, 0.3, 0.3, 0.5], 1.0),  # ties on both sides, same order
        ([1, 2, 3, 4], [1, 1, 2, 2], math.sqrt(0.8)),  # ties on one side
    ],
)
def test_spearman_table(xs, ys, rho):
    assert spearman(xs, ys) == pytest.approx(rho)
    assert spearman(ys, xs) == pytest.approx(rho)  # symmetric


@pytest.mark.parametrize(("xs", "ys"), [([1, 1, 1], [1, 2, 3]), ([0.5], [0.5]), ([], [])])
def test_spearman_undefined_is_none_not_nan(xs, ys):
    assert spearman(xs, ys) is None


def test_spearman_needs_pairs():
    with pytest.raises(ValueError, match="pairs"):
        spearman([1, 2], [1])


def test_ranks_share_ties():
    assert ranks([30, 10, 20, 10]) == [4.0, 1.5, 3.0, 1.5]


def test_flops_are_four_n_per_token_and_utilization_divides():
    assert lora_training_flops(1_000, 10) == 40_000
    assert utilization(4e9, 2.0, 4e9) == pytest.approx(0.5)
    assert utilization(1.0, 0.0, 1.0) is None
    assert utilization(1.0, 1.0, 0.0) is None


def test_settings_are_checked():
    with pytest.raises(ValueError, match="--skip"):
        Settings(skip=("d",))
    with pytest.raises(ValueError, match="--reference-epochs"):
        Settings(epochs=2, reference_epochs=3)
    with pytest.raises(ValueError, match="--epochs"):
        Settings(epochs=0)
    assert Settings(epochs=10, reference_epochs=1).lora("a").epochs == 1
    assert Settings(epochs=10, reference_epochs=1).lora("b").epochs == 10


def test_reference_features_pad_with_loss_on_padding_or_not_at_all(tiny_model):
    _, tokenizer = tiny_model
    texts = ["The Zorbian council meets in Velmora.", "Topic: spring"]
    padded = reference_features(tokenizer, texts, 32, pad=True)
    dynamic = reference_features(tokenizer, texts, 32, pad=False)
    for p, d in zip(padded, dynamic, strict=True):
        n = len(d["input_ids"])
        assert len(p["input_ids"]) == len(p["labels"]) == 32
        # The reference trains on the padding: labels are the input ids, pad tokens included.
        assert p["labels"] == p["input_ids"]
        assert p["input_ids"][n:] == [tokenizer.pad_token_id] * (32 - n)
        assert p["attention_mask"] == [1] * n + [0] * (32 - n)
        assert d["input_ids"] == p["input_ids"][:n] == d["labels"]
    assert len(reference_features(tokenizer, ["word " * 100], 16, pad=False)[0]["input_ids"]) == 16


def test_reduced_reference_epochs_scale_training_time_only():
    settings = Settings(contexts=1, self_edits=1, epochs=10, reference_epochs=2)
    row = {
        "context": 0,
        "edit": 0,
        "generation_seconds": 1.0,
        "train_seconds": 3.0,
        "eval_seconds": 2.0,
        "steps": 4,
        "real_tokens": 100,
        "processed_tokens": 400,
        "final_loss": 1.0,
        "correct": 1,
        "questions": 2,
        "reward": 0.5,
        "rss_peak_mib": 10.0,
    }
    a = summarize_config("a", [row], settings, n_params=1_000, peak_flops=1e6)
    assert a["seconds_per_self_edit"]["training"] == pytest.approx(15.0)
    assert a["self_edits_per_hour"] == pytest.approx(3600 / 18.0)
    assert a["mfu"] == pytest.approx(4 * 1_000 * 100 / 3.0 / 1e6)  # from the measured run
    assert "scaled to 10 epochs" in a["training_extrapolated"]
    b = summarize_config("b", [row], settings, n_params=1_000, peak_flops=1e6)
    assert b["seconds_per_self_edit"]["training"] == 3.0 and "training_extrapolated" not in b


def test_f1_rewards_order_self_edits_that_accuracy_leaves_tied():
    rows = [
        {"kind": "base", "context": 4, "digest": "B", "responses": ["Paris", "no idea"]},
        {"kind": "base", "context": 4, "digest": "old", "responses": ["x", "x"]},
        {"kind": "edit", "context": 4, "edit": 0, "responses": ["Velmora city", "no idea"]},
        {"kind": "edit", "context": 4, "edit": 1, "responses": ["Velmora", "spring"]},
        {"kind": "edit", "context": 9, "edit": 0, "responses": ["?"]},  # no golds: left alone
    ]
    out = inner_loop.with_f1_rewards(rows, {4: ["Velmora", "spring"]}, "B")
    assert out[2]["reward_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert out[3]["reward_f1"] == pytest.approx(1.0)
    assert "reward_f1" not in out[4] and "reward_f1" not in rows[2]  # the input rows are not changed


def test_batched_processed_tokens_counts_each_rows_bucket_width():
    pytest.importorskip("student.multi")
    lora = Settings(epochs=2).lora("c")
    lengths = [[5, 7], [7]]
    processed = inner_loop.batched_processed_tokens(lengths, lora)
    real = [sum(ls) * 2 for ls in lengths]
    assert all(p >= r for p, r in zip(processed, real, strict=True))
    assert processed[1] == real[1]  # adapter 1's row is the longest of every step it is in


# --- end to end --------------------------------------------------------------------------------------


def _record(i: int) -> dict:
    return {
        "title": f"Zorbia {i}",
        "context": f"The Zorbian council meets in Velmora {i} every spring.",
        "questions": [
            {"question": f"Where does council {i} meet?", "answer": "Velmora"},
            {"question": "When does it meet?", "answer": "spring"},
        ],
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """squad_val.json with 2 evaluation passages (base_val.json) and 2 training passages."""
    d = tmp_path_factory.mktemp("data")
    (d / RELEASED["qwen2.5-7b"]).write_text(json.dumps([_record(0), _record(1)]))
    (d / "squad_val.json").write_text(json.dumps([_record(i) for i in range(4)]))
    return d


def _argv(model_dir: Path, data_dir: Path, out: Path) -> list[str]:
    return [
        "bench",
        "inner-loop",
        "--model",
        str(model_dir),
        "--data",
        str(data_dir),
        "--out",
        str(out),
        "--contexts",
        "1",
        "--self-edits",
        "2",
        "--epochs",
        "1",
        "--pad-length",
        "48",
        "--max-new-tokens",
        "16",
        "--answer-tokens",
        "6",
        "--peak-size",
        "256",
        "--threads",
        "1",
    ]


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inner-loop")
    assert main(_argv(tiny_model_dir, data_dir, out)) == 0
    return out


def test_every_field_of_the_json(run_dir: Path, capsys):
    data = json.loads((run_dir / "inner_loop.json").read_text())
    assert set(data) >= {
        "settings",
        "flops_formula",
        "n_params",
        "matmul_peak",
        "contexts",
        "configs",
        "ratios",
        "rank_correlation",
        "targets",
        "answerers",
    }
    assert data["contexts"][0]["index"] in (2, 3)  # a training passage, never an evaluation one
    assert data["matmul_peak"]["flops_per_s"] > 0 and data["matmul_peak"]["threads"] == 1
    assert "4·N·tokens" in data["flops_formula"]
    for name in ("a", "b", "c"):
        config = data["configs"][name]
        assert config["status"] == "complete" and config["self_edits"] == 2
        assert set(config["seconds_per_self_edit"]) == {"generation", "training", "evaluation", "total"}
        assert config["self_edits_per_hour"] > 0 and config["self_edits_per_hour_inner_loop"] > 0
        assert 0 < config["mfu"] <= 1
        assert 0 < config["utilization_processed_tokens"] <= 1
        assert config["processed_tokens"] >= config["real_tokens"] > 0
        assert config["rss_peak_mib"] > 0
        assert set(config["rewards"]) == {f"{data['contexts'][0]['index']}-{i}" for i in range(2)}
    a, b = data["configs"]["a"], data["configs"]["b"]
    assert a["processed_tokens"] == 48 * a["steps"]  # every step is padded to --pad-length
    assert b["processed_tokens"] == b["real_tokens"] == a["real_tokens"]
    assert a["utilization_processed_tokens"] > a["mfu"]
    assert data["configs"]["c"]["trainer"] in (
        "student.multi.train_adapters",
        "student.training.train_adapter",
    )
    assert set(data["ratios"]) == {"c_over_a", "c_over_a_inner_loop", "c_over_b", "c_over_b_inner_loop"}
    assert all(v > 0 for v in data["ratios"].values())
    assert {"spearman", "pairs", "spearman_f1", "pairs_f1"} <= set(data["rank_correlation"]["c_vs_b"])
    assert all(set(data["configs"][n]["rewards_f1"]) == set(data["configs"][n]["rewards"]) for n in "abc")
    answerers = {a["answerer"]: a for a in data["answerers"]}
    assert answerers["transformers (one at a time)"]["questions_per_s"] > 0
    assert answerers["transformers (batched, 16)"]["agreement_with_first"] is not None
    assert answerers["vllm"]["status"] == "not run" and "--answerer" in answerers["vllm"]["why"]
    # The table was printed and written.
    table = (run_dir / "table.md").read_text()
    assert "(c)/(a)" in table and "(c)/(b)" in table and "| vllm | not run" in table
    assert table == markdown_tables(data)


def test_resume_skips_finished_parts(run_dir: Path, tiny_model_dir: Path, data_dir: Path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a finished part ran again")

    rows = (run_dir / "rows.jsonl").read_text().splitlines()
    monkeypatch.setattr(inner_loop, "train_with_trainer", refuse)
    monkeypatch.setattr(inner_loop, "train_ours", refuse)
    monkeypatch.setattr(inner_loop, "measure_matmul_peak", refuse)
    assert main(_argv(tiny_model_dir, data_dir, run_dir)) == 0
    assert (run_dir / "rows.jsonl").read_text().splitlines() == rows

    # A run killed while it wrote (a)'s last self-edit: that row cut mid-line, the answerer rows not yet
    # written. Only those run again.
    cut = max(i for i, line in enumerate(rows) if json.loads(line).get("config") == "a")
    assert all(json.loads(line)["kind"] == "eval" for line in rows[cut + 1 :])
    (run_dir / "rows.jsonl").write_text("\n".join(rows[:cut]) + "\n" + rows[cut][:20])
    monkeypatch.undo()
    monkeypatch.setattr(inner_loop, "train_ours", refuse)
    assert main(_argv(tiny_model_dir, data_dir, run_dir)) == 0
    redone = [json.loads(line) for line in (run_dir / "rows.jsonl").read_text().splitlines()[cut + 1 :]]
    assert [(r["kind"], r["config"]) for r in redone] == [("edit", "a")] + [
        ("eval", json.loads(line)["config"]) for line in rows[cut + 1 :]
    ]
    assert redone[0]["edit"] == json.loads(rows[cut])["edit"]


def test_a_plugged_in_answerer_fills_its_column(run_dir: Path, tiny_model_dir: Path, monkeypatch):
    """An answerer given by the caller (a vLLM one, say) runs on the same adapters; nothing else reruns."""
    asked: list[Path | None] = []

    def factory(model_dir: Path, settings: Settings):
        def answer(prompts, adapter_dir):
            asked.append(adapter_dir)
            return ["Velmora"] * len(prompts)

        return answer

    monkeypatch.setattr(inner_loop, "train_with_trainer", lambda *a, **k: pytest.fail("retrained"))
    settings = Settings(
        model=str(tiny_model_dir),
        contexts=1,
        self_edits=2,
        epochs=1,
        pad_length=48,
        threads=1,
        max_new_tokens=16,
        answer_tokens=6,
        peak_size=256,
    )
    data = inner_loop.run_bench(
        settings, run_dir, _training_docs(run_dir), {"vllm": factory}, log=lambda _: None
    )
    assert asked[0] is None and all(
        p is not None and (p / "adapter_config.json").is_file() for p in asked[1:]
    )
    vllm = next(a for a in data["answerers"] if a["answerer"] == "vllm")
    assert vllm["status"] == "run" and vllm["questions"] == 3 * 2 and "agreement_with_first" in vllm


def _training_docs(run_dir: Path):
    """The run's contexts, rebuilt from the fixture's records (the bench keys rows by passage index)."""
    from seal.bench.knowledge import _document

    contexts = json.loads((run_dir / "inner_loop.json").read_text())["contexts"]
    return [(c["index"], _document(_record(c["index"]))) for c in contexts]


def test_ours_one_adapter_after_another(tiny_model_dir: Path, data_dir: Path, tmp_path: Path):
    """(c) with student.training.train_adapter (the fallback without student.multi), (a) and (b) skipped."""
    argv = _argv(tiny_model_dir, data_dir, tmp_path) + ["--ours-trainer", "single", "--skip", "a,b"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "inner_loop.json").read_text())
    c = data["configs"]["c"]
    assert c["trainer"] == inner_loop.SINGLE and c["status"] == "complete"
    assert c["processed_tokens"] == c["real_tokens"]  # batch 1: no padding
    assert data["configs"]["a"]["status"] == data["configs"]["b"]["status"] == "skipped (--skip)"
    assert data["ratios"]["c_over_a"] is None


def test_the_cli_knows_the_command():
    args = build_parser().parse_args(["bench", "inner-loop", "--skip", "a,b", "--device", "cpu"])
    settings = inner_loop.settings_from_args(args)
    assert settings.skip == ("a", "b") and settings.epochs == 10 and settings.pad_length == 2048
    assert settings.lora().rank == 32 and settings.lora().target_modules == ("q_proj", "v_proj")


def test_loaded_models_are_untouched_by_a_reference_run(tiny_model_dir: Path):
    """(a) wraps the resident base in a fresh PEFT model and strips it again: the base is as it was."""
    import torch

    model, tokenizer = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = Settings(model=str(tiny_model_dir), epochs=1, pad_length=32)
    peft_model, run = inner_loop.train_with_trainer(
        model, tokenizer, ["Zorbia\nVelmora in spring."], settings, pad=True
    )
    assert run.steps == 1 and run.processed_tokens == 32 and 0 < run.real_tokens < 32
    base = peft_model.unload()
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
