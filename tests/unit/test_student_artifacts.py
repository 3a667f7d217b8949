"""Adapter artifacts: safetensors + PEFT config + provenance, content addressed, moved in chunks."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from seal.digests import directory_manifest, manifest_sha256
from seal.models import load_model
from seal.records import EditFormat, LoraSettings, Passage, SelfEdit
from student.artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PROVENANCE,
    TransferLimitError,
    adapter_path,
    iter_adapter_chunks,
    list_adapters,
    prune_adapters,
    save_adapter,
    verify_adapter,
    write_adapter_chunks,
)
from student.core import apply_self_edit
from student.sequences import build_training_texts, training_data_sha256
from student.training import train_adapter

TEXTS = ["Velmora\nThe Zorbian council meets in the city of Velmora every spring.", "Velmora\nShort."]
PROBE = "Velmora\nThe council meets"


@pytest.fixture()
def trained(tiny_model):
    """A PEFT model trained far enough that its LoRA changes the logits."""
    peft_model, _ = train_adapter(*tiny_model, TEXTS, LoraSettings(epochs=2, learning_rate=1e-2))
    return peft_model, tiny_model[1]


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROBE, return_tensors="pt")).logits


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_sha(path: Path) -> str:
    return manifest_sha256(directory_manifest(path))


def test_save_writes_a_self_describing_content_addressed_adapter(trained, tmp_path: Path) -> None:
    peft_model, _ = trained
    sha, path, files = save_adapter(peft_model, tmp_path, {"self_edit_id": "e1"})
    assert path == tmp_path / sha == adapter_path(tmp_path, sha)
    assert sha == _manifest_sha(path) and verify_adapter(path) == files
    assert {f.name for f in files} >= {ADAPTER_WEIGHTS, ADAPTER_CONFIG, PROVENANCE}
    assert next(f for f in files if f.name == ADAPTER_WEIGHTS).sha256 == _sha(path / ADAPTER_WEIGHTS)
    assert json.loads((path / PROVENANCE).read_text()) == {"self_edit_id": "e1"}
    config = LoraConfig.from_pretrained(str(path))
    assert config.r == 16 and "q_proj" in config.target_modules
    assert all(not p.name.endswith((".bin", ".pt", ".pkl")) for p in path.iterdir())  # never pickle
    assert all("lora_" in k for k in load_file(path / ADAPTER_WEIGHTS))
    assert sorted(p.name for p in tmp_path.iterdir()) == [sha]  # no staging left behind


def test_saved_then_loaded_adapter_equals_the_in_memory_one(
    trained, tiny_model_dir: Path, tmp_path: Path
) -> None:
    peft_model, tokenizer = trained
    in_memory = _logits(peft_model, tokenizer)
    _, path, _ = save_adapter(peft_model, tmp_path, {})
    base, _ = load_model(tiny_model_dir)
    base_logits = _logits(base, tokenizer)
    loaded = PeftModel.from_pretrained(base, path)
    assert not torch.allclose(in_memory, base_logits, atol=1e-4)  # the adapter does something
    assert torch.equal(_logits(loaded, tokenizer), in_memory)


def test_saving_the_same_adapter_twice_keeps_one_directory(trained, tmp_path: Path) -> None:
    peft_model, _ = trained
    sha, path, _ = save_adapter(peft_model, tmp_path, {"created_at": 1})
    again_sha, again_path, _ = save_adapter(peft_model, tmp_path, {"created_at": 1})
    assert (again_sha, again_path) == (sha, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [sha]
    # Other provenance, same weights: another address (the manifest covers every file).
    other_sha, _, _ = save_adapter(peft_model, tmp_path, {"created_at": 2})
    assert other_sha != sha and sorted(p.name for p in tmp_path.iterdir()) == sorted([sha, other_sha])


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "g" * 64, "a" * 63, "a" * 65, "../" + "a" * 61, None])
def test_adapter_path_rejects_anything_but_a_sha256(bad, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        adapter_path(tmp_path, bad)


def test_verify_adapter_detects_an_edited_config(trained, tmp_path: Path) -> None:
    """Raising the rank in adapter_config.json changes behaviour: it must change the address too."""
    _, path, _ = save_adapter(trained[0], tmp_path, {})
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    config["lora_alpha"] = config["lora_alpha"] * 8
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="corrupt or altered"):
        verify_adapter(path)


def test_verify_adapter_detects_a_flipped_byte(trained, tmp_path: Path) -> None:
    _, path, _ = save_adapter(trained[0], tmp_path, {})
    weights = path / ADAPTER_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        verify_adapter(path)


def test_chunk_round_trip_reproduces_every_file(trained, tmp_path: Path) -> None:
    sha, path, _ = save_adapter(trained[0], tmp_path / "a", {"self_edit_id": "e1"})
    chunks = list(iter_adapter_chunks(path, chunk_size=4096))
    assert len({name for name, _, _ in chunks}) == len(list(path.iterdir()))
    assert sum(1 for name, _, _ in chunks if name == ADAPTER_WEIGHTS) > 1  # really split
    received = write_adapter_chunks(iter(chunks), tmp_path / "b", sha)
    assert received == tmp_path / "b" / sha
    assert {p.name: p.read_bytes() for p in received.iterdir()} == {
        p.name: p.read_bytes() for p in path.iterdir()
    }
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [sha]


def test_an_empty_file_survives_the_chunk_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / ADAPTER_WEIGHTS).write_bytes(b"weights")
    (src / ADAPTER_CONFIG).write_text("{}")
    (src / "empty.txt").write_bytes(b"")
    dst = write_adapter_chunks(iter_adapter_chunks(src), tmp_path / "dst", _manifest_sha(src))
    assert (dst / "empty.txt").read_bytes() == b""


def _edit_config_chunk(chunks):
    return [(n, o, d.replace(b'"r": 16', b'"r": 64') if n == ADAPTER_CONFIG else d) for n, o, d in chunks]


def _corrupt_last_weights_chunk(chunks):
    index = max(i for i, (name, _, _) in enumerate(chunks) if name == ADAPTER_WEIGHTS)
    name, offset, data = chunks[index]
    chunks[index] = (name, offset, bytes([data[0] ^ 0xFF]) + data[1:])
    return chunks


@pytest.mark.parametrize(
    "tamper",
    [
        _corrupt_last_weights_chunk,
        lambda chunks: [c for c in chunks if c[0] != ADAPTER_CONFIG],  # a missing config
        lambda chunks: [("../escape", 0, b"x"), *chunks],  # a path out of the staging dir
        lambda chunks: [(n, o + 1 if o else o, d) for n, o, d in chunks],  # a gap in a file
        lambda chunks: [*chunks, ("extra.json", 0, b"{}")],  # a file the manifest does not list
        _edit_config_chunk,
    ],
)
def test_a_bad_transfer_raises_and_leaves_nothing_behind(trained, tmp_path: Path, tamper) -> None:
    sha, path, _ = save_adapter(trained[0], tmp_path / "a", {})
    root = tmp_path / "b"
    (root / "existing").mkdir(parents=True)
    chunks = tamper(list(iter_adapter_chunks(path, chunk_size=4096)))
    with pytest.raises(ValueError):
        write_adapter_chunks(iter(chunks), root, sha)
    assert sorted(p.name for p in root.iterdir()) == ["existing"]
    assert not (tmp_path / "escape").exists()


def test_apply_self_edit_trains_saves_with_provenance_and_restores_the_base(
    tiny_model, tmp_path: Path
) -> None:
    model, tokenizer = tiny_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit = SelfEdit(
        id="e1",
        job_id="j1",
        doc_index=2,
        index=0,
        format=EditFormat.IMPLICATIONS,
        passage=Passage("Velmora", "The Zorbian council meets in Velmora every spring."),
        text="The council is Zorbian.\nVelmora hosts it.",
        lines=("The council is Zorbian.", "Velmora hosts it."),
        lora=LoraSettings(epochs=2, rank=4),
        teacher_model="teacher-x",
    )
    steps: list[int] = []
    ref = apply_self_edit(
        model,
        tokenizer,
        edit,
        "tiny",
        "f" * 64,
        tmp_path,
        student_id="student-1",
        on_step=lambda step, loss: steps.append(step),
    )

    path = adapter_path(tmp_path, ref.sha256)
    assert verify_adapter(path) == ref.files and path.name == ref.sha256
    assert (ref.self_edit_id, ref.base_model, ref.base_fingerprint, ref.student_id) == (
        "e1",
        "tiny",
        "f" * 64,
        "student-1",
    )
    assert ref.steps == 6 and steps == [1, 2, 3, 4, 5, 6]
    assert ref.size_bytes == sum(p.stat().st_size for p in path.iterdir())

    provenance = json.loads((path / PROVENANCE).read_text())
    assert provenance["final_loss"] == ref.final_loss == provenance["losses"][-1]
    assert provenance["lora"]["rank"] == 4 and provenance["format"] == "implications"
    assert provenance["data_sha256"] == training_data_sha256(build_training_texts(edit))
    assert {
        k: provenance[k] for k in ("self_edit_id", "job_id", "doc_index", "teacher_model", "base_model")
    } == {
        "self_edit_id": "e1",
        "job_id": "j1",
        "doc_index": 2,
        "teacher_model": "teacher-x",
        "base_model": "tiny",
    }

    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # The restored base serves the next self-edit, and a different edit gives a different adapter.
    other = apply_self_edit(
        model, tokenizer, replace(edit, id="e2", format=EditFormat.PASSAGE), "tiny", "f" * 64, tmp_path
    )
    assert other.sha256 != ref.sha256 and other.steps == 2


@pytest.mark.parametrize(
    "max_bytes, max_files, match",
    [(1000, 8, "exceeds 1000 bytes"), (10**9, 2, "more than 2 files")],
    ids=["bytes", "files"],
)
def test_a_transfer_over_the_caps_is_refused_and_leaves_nothing(
    trained, tmp_path: Path, max_bytes: int, max_files: int, match: str
) -> None:
    sha, path, _ = save_adapter(trained[0], tmp_path / "a", {})
    root = tmp_path / "b"
    with pytest.raises(TransferLimitError, match=match):
        write_adapter_chunks(iter_adapter_chunks(path, chunk_size=512), root, sha, max_bytes, max_files)
    assert list(root.iterdir()) == []


def test_prune_keeps_the_newest_adapters(trained, tmp_path: Path) -> None:
    import os

    shas = []
    for i in range(4):
        sha, path, _ = save_adapter(trained[0], tmp_path, {"n": i})
        os.utime(path, (1000 + i, 1000 + i))
        shas.append(sha)
    assert prune_adapters(tmp_path, 0) == []  # 0 keeps all
    now = time.time()
    os.utime(tmp_path / shas[2], (now - 10, now - 10))  # young: its audit may not have fetched it yet
    os.utime(tmp_path / shas[3], (now, now))
    assert prune_adapters(tmp_path, 1) == shas[:2]  # the two old ones go; the young one is spared
    assert [p.name for p in list_adapters(tmp_path)] == shas[2:]
    assert prune_adapters(tmp_path, 1, min_age_s=0) == [shas[2]]
    assert [p.name for p in list_adapters(tmp_path)] == shas[3:]
