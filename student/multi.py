"""K LoRA adapters trained together: one batched pass over the shared frozen base per step.

    from contextlib import closing
    from student.multi import attached_in_turn, train_adapters

    results = train_adapters(model, tokenizer, [(texts_0, lora_0), (texts_1, lora_1), ...],
                             compute_dtype="float32", max_tokens=MAX_TOKENS, on_step=None)
    adapters = [adapter for adapter, _ in results]          # TrainedLora, in job order
    stats = [s for _, s in results]                         # student.training.TrainStats
    with closing(attached_in_turn(model, adapters)) as views:
        for index, peft_model in views:                     # a PeftModel holding adapters[index]
            peft_model.save_pretrained(out_dirs[index])     # or student.artifacts.save_adapter, or evaluate

Adapter k comes out as `train_adapter(model, tokenizer, texts_k, lora_k)` would make it alone: the
same LoRA init (PEFT's random draws, replayed from `lora_k.seed`), the same seeded batches, its own
AdamW, learning-rate schedule and gradient clipping at `lora_k.max_grad_norm` (per adapter, not
global), its own replay and KL guard. Only the floating-point rounding differs (batched matrix
products, sums in another order); tests/unit/test_student_multi.py pins how little.

How: every Linear that some adapter targets (as `lora_config` picks them) is swapped for a
`RoutedLoraLinear` holding each adapter's A [r, in] and B [out, r] (or none, for an adapter that does
not target it). Each step takes the step's batch of every adapter still training, sorts the sequences
by length into micro-batches (`length_buckets`: little padding, a bounded number of tokens per
forward), orders each micro-batch's rows by adapter and tells the routed layers where each adapter's
rows are; each layer adds `lora_B(lora_A(x)) * alpha / r` on each adapter's contiguous rows, PEFT's
own arithmetic on a view. The loss is the sum over adapters of each adapter's own mean token loss, so
an adapter's gradient is exactly the gradient of its own loss: rows never mix in a transformer, and no
parameter is shared. Adapters with fewer steps (fewer texts, fewer epochs) simply drop out of the
later steps.

Why per-adapter weights and row segments rather than stacked [K, r, in] tensors gathered per row:
each adapter's weights stay leaves of their own, so its AdamW, schedule and clipping are the single
path's own code; and on a CPU a gathered bmm over rows cost as much as the frozen base's matmuls
(measured: 15 s of bmm against 19 s of base linear in one K=4 run), while the segments' matmuls are
the cheap rank-r products they should be. So any settings can share a pass: rank, alpha, targets,
learning rate, epochs, batch size, seed, schedule, clipping, replay and KL weight may all differ.

Precision: `compute_dtype="bfloat16"` runs the frozen base's matrix products in bf16 (autocast),
while the LoRA weights, their products, the loss and AdamW's state stay fp32. The default is fp32:
bf16 only pays on hardware with native bf16 (AVX512-BF16/AMX CPUs, recent GPUs; "auto" picks it
there), and on this repository's 2-core AVX2 CI machine a bf16 matmul runs ~50x slower than fp32.
Measured on the tiny test model (3 adapters, 2 to 6 steps at lr 5e-3 to 1e-2): bf16 moves the losses
by at most 1.7e-3 relative but the trained weights by 1.4 % to 3.7 % (relative Frobenius norm),
against fp32's 1e-5; whether rewards keep their order under bf16 is for a benchmark on real hardware.

`seconds` in each TrainStats is the group's wall time until that adapter's last step: the adapters
share every forward, so no adapter has a time of its own.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict

from seal.records import LoraSettings
from student.general import KL_BATCH, BaseAnswer, answer_tensors, general_data, kl_batches, mean_kl
from student.sequences import IGNORE_INDEX, batches, pad_batch
from student.training import (
    TrainStats,
    lora_config,
    make_optimizer,
    pad_token_id,
    release_adapter,
    training_sequences,
)

COMPUTE_DTYPES = ("float32", "bfloat16", "auto")
MAX_TOKENS = 2048
"""Padded tokens per forward at most (rows x width): bounds the activations and the fp32 logits."""
FORWARD_OVERHEAD_TOKENS = 32
"""What one more forward costs, in padded tokens: `length_buckets` splits a step's rows where the
padding saved outweighs it. On a CPU a token of a 135M model costs about as much as a forward's fixed
overhead, so padding is what matters; a GPU would want a larger figure."""

Job = tuple[list[str], LoraSettings]
LoraPair = tuple[torch.nn.Parameter, torch.nn.Parameter]


@dataclass
class TrainedLora:
    """One trained adapter: its PEFT config and weights under PEFT's saved key names
    (`base_model.model.<module>.lora_A.weight`), fp32 on the CPU."""

    config: LoraConfig
    state: dict[str, torch.Tensor]


def train_adapters(
    model: Any,
    tokenizer: Any,
    jobs: Sequence[Job],
    compute_dtype: str = "float32",
    max_tokens: int = MAX_TOKENS,
    on_step: Callable[[int, int, float], None] | None = None,
) -> list[tuple[TrainedLora, TrainStats]]:
    """Train one LoRA per (texts, settings) job in one batched pass over the frozen base; results in
    job order. `on_step(job_index, step, loss)` runs after each adapter's every step (1-based). The
    base model is left as it was (its modules, weights and requires_grad flags)."""
    if not jobs:
        return []
    started = time.perf_counter()
    device = next(model.parameters()).device
    dtype = resolve_compute_dtype(compute_dtype, device)
    configs = [lora_config(model, lora) for _, lora in jobs]
    targets = target_linears(model, set().union(*(config.target_modules for config in configs)))
    pad_id = pad_token_id(tokenizer)
    # The base answers its general prompts before any LoRA is routed in: these are the answers to keep.
    runs = [
        new_run(model, tokenizer, targets, config, texts, lora, device)
        for config, (texts, lora) in zip(configs, jobs, strict=True)
    ]
    route = Route([lora.alpha / lora.rank for _, lora in jobs])

    with frozen(model), routed(model, targets, runs, route):
        model.train()
        try:
            for step in range(max(run.steps for run in runs)):
                active = [k for k, run in enumerate(runs) if step < run.steps]
                lm_losses = lm_backward(model, runs, active, route, pad_id, device, dtype, max_tokens)
                kl_losses = kl_backward(model, runs, active, route, pad_id, device, dtype)
                for k in active:
                    finish_step(runs[k], lm_losses[k], kl_losses.get(k))
                    if on_step is not None:
                        on_step(k, len(runs[k].losses), runs[k].losses[-1])
                    if runs[k].steps == step + 1:
                        done(runs[k], targets, started)
        finally:
            model.eval()
    for run in runs:
        if run.steps == 0:
            done(run, targets, started)
    return [
        (
            TrainedLora(config, run.final),
            TrainStats(run.steps, run.losses, run.seconds, run.kls, run.replayed),
        )
        for config, run in zip(configs, runs, strict=True)
    ]


# --- the steps -------------------------------------------------------------------------------------


@dataclass
class AdapterRun:
    """One adapter's training inside a group: its weights, data, optimizer and record."""

    lora: LoraSettings
    # (A, B) for each routed Linear this adapter targets, None for the others; in module order.
    weights: list[LoraPair | None]
    steps: int
    batches: Iterator[list[list[int]]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_stream: Iterator[list[BaseAnswer]] | None
    replayed: int
    losses: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    seconds: float = 0.0
    final: dict[str, torch.Tensor] = field(default_factory=dict)

    def parameters(self) -> list[torch.nn.Parameter]:
        """In PEFT's order (module by module, A then B), so clipping sums the norms as it does."""
        return [p for pair in self.weights if pair is not None for p in pair]


def new_run(
    model: Any,
    tokenizer: Any,
    targets: list[tuple[str, torch.nn.Linear]],
    config: LoraConfig,
    texts: list[str],
    lora: LoraSettings,
    device: torch.device,
) -> AdapterRun:
    general = general_data(model, tokenizer, lora)
    mine = [j for j, (name, _) in enumerate(targets) if name.rsplit(".", 1)[-1] in config.target_modules]
    weights: list[LoraPair | None] = [None] * len(targets)
    for j, pair in zip(
        mine, peft_init([targets[j][1] for j in mine], lora.rank, lora.seed, device), strict=True
    ):
        weights[j] = pair
    sequences = training_sequences(tokenizer, texts, lora, general.replay)
    trainable = [p for pair in weights if pair is not None for p in pair]
    # foreach: one kernel per operation over all of the adapter's tensors (the single path's default
    # loops over them); the same arithmetic, and on a CPU a tenth of the step's time saved.
    optimizer, scheduler = make_optimizer(trainable, lora, len(sequences), foreach=True)
    return AdapterRun(
        lora=lora,
        weights=weights,
        steps=lora.epochs * -(-len(sequences) // lora.batch_size),
        batches=batches(sequences, lora.batch_size, lora.seed, lora.epochs),
        optimizer=optimizer,
        scheduler=scheduler,
        kl_stream=kl_batches(general.kl, KL_BATCH, lora.seed) if general.kl else None,
        replayed=len(general.replay),
    )


def lm_backward(
    model: Any,
    runs: list[AdapterRun],
    active: list[int],
    route: Route,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    max_tokens: int,
) -> dict[int, float]:
    """Forward and backward this step's batch of every active adapter; each adapter's mean token loss."""
    rows = [(ids, k) for k in active for ids in next(runs[k].batches)]
    # Tokens that carry a label (position t predicts t + 1): each adapter's loss is its own mean.
    labelled = [0] * len(runs)
    for ids, k in rows:
        labelled[k] += len(ids) - 1
    counts = torch.tensor(labelled, dtype=torch.float32, device=device).clamp(min=1)
    totals = torch.zeros(len(runs), device=device)
    for longest_first in length_buckets([len(ids) for ids, _ in rows], max_tokens):
        bucket = sorted(longest_first, key=lambda i: rows[i][1])  # each adapter's rows contiguous
        input_ids, attention_mask, labels = (
            torch.tensor(x, device=device) for x in pad_batch([rows[i][0] for i in bucket], pad_id)
        )
        adapter_of_row = [rows[i][1] for i in bucket]
        route.set(adapter_of_row)
        with autocast(device, dtype):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        sums = per_adapter_lm_loss(logits, labels, torch.tensor(adapter_of_row, device=device), len(runs))
        (sums / counts).sum().backward()
        totals += sums.detach()
    means = (totals / counts).tolist()
    return {k: means[k] for k in active}


def kl_backward(
    model: Any,
    runs: list[AdapterRun],
    active: list[int],
    route: Route,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[int, float]:
    """The KL guard of every active adapter that has one, in one batched pair of forwards (base and
    adapted); backward of the weighted sum; each adapter's KL."""
    guarded = [k for k in active if runs[k].kl_stream is not None]
    if not guarded:
        return {}
    rows = [(answer, k) for k in guarded for answer in next(runs[k].kl_stream)]  # type: ignore[arg-type]
    ids, mask, predicts_answer = answer_tensors([a for a, _ in rows], pad_id, device)
    adapter_of_row = torch.tensor([k for _, k in rows], device=device)
    with torch.no_grad(), autocast(device, dtype):
        route.off()
        base = model(input_ids=ids, attention_mask=mask).logits
    route.set([k for _, k in rows])
    with autocast(device, dtype):
        adapted = model(input_ids=ids, attention_mask=mask).logits
    kls = {}
    total = adapted.sum() * 0.0
    for k in guarded:
        positions = predicts_answer & (adapter_of_row == k)[:, None]
        kls[k] = mean_kl(base[positions], adapted[positions])
        total = total + runs[k].lora.kl_weight * kls[k]
    total.backward()
    return {k: kl.item() for k, kl in kls.items()}


def finish_step(run: AdapterRun, lm_loss: float, kl: float | None) -> None:
    """Clip this adapter's own gradient, step its own optimizer and schedule, and record the step."""
    if run.lora.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.parameters(), run.lora.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.losses.append(lm_loss)
    if kl is not None:
        run.kls.append(kl)


def done(run: AdapterRun, targets: list[tuple[str, torch.nn.Linear]], started: float) -> None:
    """Keep the adapter's weights as they are now, under PEFT's key names; it trains no further."""
    run.seconds = time.perf_counter() - started
    for (name, _), pair in zip(targets, run.weights, strict=True):
        if pair is not None:
            run.final[f"base_model.model.{name}.lora_A.weight"] = pair[0].detach().to("cpu", copy=True)
            run.final[f"base_model.model.{name}.lora_B.weight"] = pair[1].detach().to("cpu", copy=True)


# --- pure pieces -----------------------------------------------------------------------------------


def length_buckets(
    lengths: Sequence[int], max_tokens: int, overhead_tokens: int = FORWARD_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Split rows (given by their lengths) into micro-batches of similar length: indices, longest
    first. Minimises padded tokens plus `overhead_tokens` per micro-batch, keeping each micro-batch
    within `max_tokens` (rows x width) unless a single row is longer. Exact (dynamic programming over
    the rows sorted by length)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = [0.0] + [math.inf] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):
            cost = (end - start) * lengths[order[start]]  # the first row of a bucket is its longest
            if cost > max_tokens and end - start > 1:
                break  # an earlier start only makes the bucket wider and fuller
            if best[start] + cost + overhead_tokens < best[end]:
                best[end], cut[end] = best[start] + cost + overhead_tokens, start
    buckets = []
    end = len(order)
    while end > 0:
        buckets.append(order[cut[end] : end])
        end = cut[end]
    return buckets[::-1]


def per_adapter_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, adapter_of_row: torch.Tensor, n_adapters: int
) -> torch.Tensor:
    """Summed next-token cross-entropy of each adapter's rows, [n_adapters]; divide by each adapter's
    label count for `student.training.causal_lm_loss` per adapter."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    token_losses = F.cross_entropy(
        shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    per_row = token_losses.view(labels.size(0), -1).sum(dim=1)
    return torch.zeros(n_adapters, device=logits.device).index_add(0, adapter_of_row, per_row)


# --- the routed LoRA layers ------------------------------------------------------------------------


class Route:
    """Which rows of the current forward go through which adapter, shared by every routed layer."""

    def __init__(self, scalings: list[float]) -> None:
        self.scalings = scalings  # alpha / rank of each adapter, as PEFT scales
        self.segments: list[tuple[int, int, int]] | None = None

    def set(self, adapter_of_row: list[int]) -> None:
        self.segments = segments(adapter_of_row)

    def off(self) -> None:
        """The next forward is the base model's own (the KL guard's reference)."""
        self.segments = None


def segments(adapter_of_row: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive rows of one adapter: (adapter, first row, end row)."""
    runs: list[tuple[int, int, int]] = []
    for row, k in enumerate(adapter_of_row):
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1], row + 1)
        else:
            runs.append((k, row, row + 1))
    return runs


class RoutedLoraLinear(torch.nn.Module):
    """A frozen Linear plus K LoRAs (None: that adapter leaves this layer alone); each run of rows of
    `route.segments` goes through its adapter."""

    def __init__(
        self,
        base: torch.nn.Linear,
        weights: list[LoraPair | None],
        route: Route,
    ) -> None:
        super().__init__()
        self.base = base
        # A plain list, not registered: the adapters' weights stay out of the base's state_dict.
        self.weights = weights
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.route.segments is None:
            return out
        # PEFT's own arithmetic, lora_B(lora_A(x)) * scaling, on each adapter's slice of rows (a view:
        # rows come sorted by adapter), added in place (the base's matmul does not keep its output for
        # backward). The adapters' products stay fp32 whatever the base computes in.
        with torch.autocast(x.device.type, enabled=False):
            for k, start, end in self.route.segments:
                pair = self.weights[k]
                if pair is not None:  # None: an adapter that does not target this layer
                    a, b = pair
                    out[start:end].add_(
                        F.linear(F.linear(x[start:end].to(a.dtype), a), b) * self.route.scalings[k]
                    )
        return out


def target_linears(model: Any, target_modules: Any) -> list[tuple[str, torch.nn.Linear]]:
    """The Linear layers PEFT wraps for these target names, in the order PEFT visits them."""
    names = set(target_modules)
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names
    ]


def peft_init(linears: list[torch.nn.Linear], rank: int, seed: int, device: torch.device) -> list[LoraPair]:
    """LoRA weights exactly as `torch.manual_seed(seed); get_peft_model(...)` initialises them for the
    Linear layers it targets (`linears`, in module order).

    PEFT builds lora_A = nn.Linear(in, r) and lora_B = nn.Linear(r, out) (each drawing its default
    init) and then redraws A with kaiming_uniform(a=sqrt 5) and zeroes B, module by module: three draws
    per module from the global generator, replayed here in the same order (tests check it against
    PEFT itself)."""
    torch.manual_seed(seed)
    weights = []
    for linear in linears:
        a = torch.empty(rank, linear.in_features)
        b = torch.empty(linear.out_features, rank)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        weights.append(
            (torch.nn.Parameter(a.to(device)), torch.nn.Parameter(torch.zeros_like(b, device=device)))
        )
    return weights


@contextlib.contextmanager
def routed(
    model: Any, targets: list[tuple[str, torch.nn.Linear]], runs: list[AdapterRun], route: Route
) -> Iterator[None]:
    """Swap each target Linear for its routed LoRA layer; put the original back on exit."""
    try:
        for j, (name, linear) in enumerate(targets):
            layer = RoutedLoraLinear(linear, [run.weights[j] for run in runs], route)
            set_submodule(model, name, layer)
        yield
    finally:
        for name, linear in targets:
            set_submodule(model, name, linear)


def set_submodule(model: Any, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def frozen(model: Any) -> Iterator[None]:
    """No gradient for the base's own weights while inside; their requires_grad flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The base's compute dtype by name; "auto" is bf16 where the hardware computes it natively."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware here (else they are emulated, and slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


# --- back to PEFT ----------------------------------------------------------------------------------


def attached_in_turn(model: Any, adapters: Sequence[TrainedLora]) -> Iterator[tuple[int, PeftModel]]:
    """(index, a PeftModel over `model` holding adapters[index]) for each adapter in turn.

    The base is wrapped once per distinct config and each adapter's weights loaded in turn, so a
    PeftModel is only valid until the next item; the LoRA is stripped after each config's run and when
    the generator is closed (use `contextlib.closing`). The global RNG is left as it was."""
    by_config: list[tuple[LoraConfig, list[int]]] = []
    for i, adapter in enumerate(adapters):
        for config, indices in by_config:
            if config == adapter.config:
                indices.append(i)
                break
        else:
            by_config.append((adapter.config, [i]))
    for config, indices in by_config:
        with torch.random.fork_rng(devices=[]):  # PEFT draws an init we overwrite at once
            peft_model = get_peft_model(model, config)
        try:
            for i in indices:
                load_weights(peft_model, adapters[i])
                yield i, peft_model
        finally:
            release_adapter(peft_model)


def load_weights(peft_model: PeftModel, adapter: TrainedLora) -> None:
    result = set_peft_model_state_dict(peft_model, adapter.state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"adapter weights do not fit the model: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing[:3]}"
        )
