"""The state a DeepSpeed run resumes from exactly: full fp32 trainable weights and Adam moments
(gathered with DeepSpeed's `safe_get_full_*` API, so the same files come out of ZeRO 0/1/2/3 and
resume under another stage or worker count), the LR scheduler, counters and every worker's RNG.
Rank 0 writes every file; loading is a collective under ZeRO-3."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylm.checkpoint.format import FORMAT, META_FILE, PROBE_FILE, RNG_FILE, STATE_DIR

if TYPE_CHECKING:
    import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _base_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def trainable_params(module: Any) -> list[tuple[str, Any]]:
    """(name, parameter) for every parameter that trains, in a stable order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def gather_full(
    engine: Any, params: list[tuple[str, Any]], key: str | None = None
) -> dict[str, torch.Tensor]:
    """Full fp32 copies of `params` (key=None) or of their Adam state `key`, on CPU.

    A collective under ZeRO-3: every worker must call it with the same params.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    state = _base_optimizer(engine).state
    for name, p in params:
        t = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        if t is None:  # no ZeRO: the module holds full tensors and the optimizer keys by param
            t = p.data if key is None else state.get(p, {}).get(key)
        if t is not None:
            out[name] = t.detach().float().cpu().clone()
    return out


def _optimizer_step(engine: Any) -> float | None:
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            return float(st["step"])
    return None


def save_probe(directory: str | Path, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
    """Stores a prompt and the last-position logits the model gave it at this step."""
    from safetensors.torch import save_file

    save_file(
        {"input_ids": input_ids.contiguous(), "logits": logits.float().contiguous()},
        str(Path(directory) / PROBE_FILE),
    )


def save_checkpoint(
    directory: str | Path,
    *,
    engine: Any,
    tokenizer: Any,
    rank: int,
    metadata: dict[str, Any],
    train_state: dict[str, Any],
    lora: bool,
) -> None:
    """Writes this worker's share of a checkpoint into `directory` (a collective under ZeRO-3).

    Rank 0 writes every file (weights, tokenizer, metadata, resume state, all workers' RNG
    states); the others only take part in the gathers. Call `seal` after the last file.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    state_dir = directory / STATE_DIR
    module = engine.module
    params = trainable_params(module)
    weights = gather_full(engine, params)
    moments = {k: gather_full(engine, params, k) for k in ADAM_KEYS}
    # Full weights = the trainable ones just gathered + any frozen rest (none in full fine-tuning).
    frozen = [] if lora else [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
    full = weights if lora else {**gather_full(engine, frozen), **weights}
    rng = _gather_rng()
    if rank != 0:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    save_file({f"rank{r}": t for r, t in enumerate(rng)}, str(state_dir / RNG_FILE))
    dtype = next(iter(module.parameters())).dtype
    to_save = {k: v.to(dtype) for k, v in full.items()}
    module.save_pretrained(directory, state_dict=to_save, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    tensors = {f"param/{k}": v for k, v in weights.items()}
    for key, values in moments.items():
        tensors.update({f"{key}/{k}": v for k, v in values.items()})
    save_file(tensors, str(state_dir / "optim.safetensors"))
    state = dict(train_state)
    state["optimizer_step"] = _optimizer_step(engine)
    state["lr_scheduler"] = engine.lr_scheduler.state_dict() if engine.lr_scheduler else None
    (state_dir / "state.json").write_text(json.dumps(state, indent=2))
    meta = {"format": FORMAT, "created_unix": time.time(), **metadata}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


def _gather_rng() -> list[torch.Tensor]:
    """Every worker's torch RNG state, in rank order (a collective when torch.distributed runs)."""
    import torch
    import torch.distributed as dist

    mine = torch.get_rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    # all_gather_object moves the tensor through the backend's device (CPU for gloo, GPU for NCCL).
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return [t.cpu() for t in states]


def load_weights(directory: str | Path, model: Any) -> None:
    """Copies a checkpoint's fp32 trainable weights into `model` before DeepSpeed wraps it, so
    every ZeRO stage builds its partitions and master copies from the restored values."""
    import torch
    from safetensors import safe_open

    # Only the weights: the Adam moments in the same file are read later, by load_train_state.
    with (
        safe_open(str(Path(directory) / STATE_DIR / "optim.safetensors"), "pt") as f,
        torch.no_grad(),
    ):
        for name, p in trainable_params(model):
            p.data.copy_(f.get_tensor(f"param/{name}").to(p.dtype))


def _prime_optimizer_state(engine: Any) -> None:
    """Creates the Adam state torch (and DeepSpeed's CPU Adam) would create at the first step,
    then lets ZeRO-1/2 link its per-parameter views of it, so moments can be written now."""
    import torch

    base = _base_optimizer(engine)
    int_step = "CPUAdam" in type(base).__name__  # DeepSpeed's CPU Adam counts steps in an int
    params = [p for group in base.param_groups for p in group["params"]]
    # ZeRO-3 swaps its flat fp32 partitions into param_groups only while it steps.
    params += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    for p in params:
        if not base.state.get(p):
            base.state[p] = {
                "step": 0 if int_step else torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def load_train_state(directory: str | Path, engine: Any, rank: int) -> dict[str, Any]:
    """Restores Adam moments and step, the LR scheduler, counters and this worker's RNG into an
    engine whose model got `load_weights` first; returns state.json. Every worker calls it
    (ZeRO-3 partitions are set collectively)."""
    import torch
    from deepspeed.utils import safe_set_full_optimizer_state
    from safetensors import safe_open
    from safetensors.torch import load_file

    state_dir = Path(directory) / STATE_DIR
    state = json.loads((state_dir / "state.json").read_text())
    _prime_optimizer_state(engine)
    base = _base_optimizer(engine)
    # Only the moments: load_weights already restored the weights from this file.
    with safe_open(str(state_dir / "optim.safetensors"), "pt") as f:
        moments = {k: f.get_tensor(k) for k in f.keys() if k.split("/", 1)[0] in ADAM_KEYS}
    for name, p in trainable_params(engine.module):
        for key in ADAM_KEYS:
            value = moments.get(f"{key}/{name}")
            if value is None:
                continue
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, value, key)
            else:  # no ZeRO: the optimizer keys its state by the module's own parameters
                base.state[p][key].copy_(value.to(p.dtype))
    step = state.get("optimizer_step")
    if step is not None:
        for st in base.state.values():
            st["step"] = (
                torch.tensor(step) if torch.is_tensor(st["step"]) else type(st["step"])(step)
            )
    sched = engine.lr_scheduler
    if sched is not None and state.get("lr_scheduler"):
        sched.load_state_dict(state["lr_scheduler"])
        # DeepSpeed's schedulers restore only their counter; the optimizer still holds the LR
        # from construction until the next step, so put the restored step's LR back now.
        for group, lr in zip(sched.optimizer.param_groups, sched.get_lr(), strict=True):
            group["lr"] = lr
    rng = load_file(str(state_dir / RNG_FILE))
    if f"rank{rank}" in rng:  # a resume with more workers than saved starts new ones fresh
        torch.set_rng_state(rng[f"rank{rank}"])
    engine.global_steps = state["step"]
    engine.global_samples = state.get("global_samples", 0)
    return state
