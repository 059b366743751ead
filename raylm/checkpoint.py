"""Checkpoints: save/load adapters or full weights as safetensors, the tokenizer, metadata, and the
state needed to resume a DeepSpeed run exactly. Nothing here is pickled.

Layout of one checkpoint directory:

    adapter_model.safetensors + adapter_config.json   (LoRA)  | model.safetensors + config.json (full)
    tokenizer files
    raylm.json               metadata: spec, step, metrics, history, template, base model
    probe.safetensors        a fixed prompt and the model's last-position logits at this step
    train_state/
      optim.safetensors      full fp32 trainable weights + Adam moments (world-size independent)
      state.json             step, epoch position, scheduler, optimizer step count
      rng.safetensors        each worker's torch RNG state (`rank{R}`)
    checksums.json           size and sha256 of every file above; written last

Weights and moments are gathered with DeepSpeed's `safe_get_full_*` API, so the same files come
out of ZeRO 0/1/2/3 and can resume under another stage or worker count. Rank 0 writes every file,
so one `checksums.json` covers the whole checkpoint: a copy cut short (a process killed while Ray
uploads it) lacks it or fails it, and is never loaded as if it were whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylm.storage import child_dirs, file_sizes, is_uri, join, read_json, storage_uri

if TYPE_CHECKING:
    import torch

    from raylm.spec import JobSpec

META_FILE = "raylm.json"
PROBE_FILE = "probe.safetensors"
STATE_DIR = "train_state"
FORMAT = "raylm-checkpoint/1"
MANIFEST = "manifest.json"
CHECKSUMS = "checksums.json"
RNG_FILE = "rng.safetensors"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
# Pickle-based formats: a checkpoint carrying one is refused rather than loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _base_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def trainable_params(module: Any) -> list[tuple[str, Any]]:
    """(name, parameter) for every parameter that trains, in a stable order."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def gather_full(engine: Any, params: list[tuple[str, Any]], key: str | None = None) -> dict[str, torch.Tensor]:
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

    save_file({"input_ids": input_ids.contiguous(), "logits": logits.float().contiguous()},
              str(Path(directory) / PROBE_FILE))


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(directory: str | Path) -> None:
    """Writes `checksums.json` (size and sha256 of every other file) last, by rename, so a
    checkpoint with a readable checksums file had all its files written first."""
    root = Path(directory)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel != CHECKSUMS:
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    tmp = root / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
    os.replace(tmp, root / CHECKSUMS)


def checkpoint_problems(path: str | Path, hashes: bool = True) -> list[str]:
    """Why a checkpoint (local directory or URI) cannot be trusted: [] when every file has its
    recorded size and, for a local directory with `hashes`, its sha256."""
    path = str(path)
    try:
        files = read_json(join(path, CHECKSUMS))["files"]
    except FileNotFoundError:
        return [f"no {CHECKSUMS} (the checkpoint was not completely written)"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{CHECKSUMS} is unreadable ({exc})"]
    sizes = file_sizes(path)
    problems = []
    for rel, want in files.items():
        if rel not in sizes:
            problems.append(f"{rel} is missing")
        elif sizes[rel] != want["size"]:
            problems.append(f"{rel} has {sizes[rel]} bytes, {want['size']} were written")
        elif hashes and not is_uri(path) and _sha256(Path(path, rel)) != want["sha256"]:
            problems.append(f"{rel} does not match its sha256")
    return problems


def check_checkpoint(directory: str | Path) -> None:
    """Raises ValueError naming each problem if a raylm checkpoint or export fails its checksums.
    Plain HF model directories (no raylm.json) carry none and are not checked."""
    if not Path(directory, META_FILE).exists():
        return
    problems = checkpoint_problems(directory)
    if problems:
        raise ValueError(f"{directory} is damaged or incomplete: {'; '.join(problems)}")


_STEP = re.compile(r"^checkpoint_(\d+)")


def checkpoint_step(name: str) -> int:
    """The step in a checkpoint directory name (`checkpoint_0000040[-r1]`), -1 if none."""
    m = _STEP.match(os.path.basename(name.rstrip("/")))
    return int(m.group(1)) if m else -1


def load_weights(directory: str | Path, model: Any) -> None:
    """Copies a checkpoint's fp32 trainable weights into `model` before DeepSpeed wraps it, so
    every ZeRO stage builds its partitions and master copies from the restored values."""
    import torch
    from safetensors import safe_open

    # Only the weights: the Adam moments in the same file are read later, by load_train_state.
    with safe_open(str(Path(directory) / STATE_DIR / "optim.safetensors"), "pt") as f, torch.no_grad():
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
            base.state[p] = {"step": 0 if int_step else torch.tensor(0.0),
                             "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
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
            st["step"] = torch.tensor(step) if torch.is_tensor(st["step"]) else type(st["step"])(step)
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


def run_uri(spec: JobSpec) -> str:
    """`<storage_path>/<name>` as Ray sees it: an absolute local path or a URI."""
    return join(storage_uri(spec.storage_path), spec.name)


def manifest_path(spec: JobSpec) -> str:
    """Where a sweep's promoted trial is recorded: `<storage_path>/<name>/best/manifest.json`."""
    return join(run_uri(spec), "best", MANIFEST)


def read_manifest(spec: JobSpec) -> dict[str, Any]:
    """The promoted trial of a job's sweep; raises FileNotFoundError if none was promoted."""
    return read_json(manifest_path(spec))


def best_run_checkpoint(spec: JobSpec) -> str | None:
    """The best whole checkpoint (by `checkpoint.metric`) a `raylm train` run of this job kept,
    if any; a damaged or half-written one is skipped with a warning."""
    scored = []
    for d in child_dirs(run_uri(spec), "checkpoint_"):
        problems = checkpoint_problems(d, hashes=False)  # sizes here; sha256 when it is loaded
        if problems:
            warnings.warn(f"skipping damaged checkpoint {d}: {'; '.join(problems)}", stacklevel=2)
            continue
        try:
            value = read_json(join(d, META_FILE)).get("metrics", {}).get(spec.checkpoint.metric)
        except FileNotFoundError:
            continue
        if isinstance(value, (int, float)):
            scored.append((value if spec.checkpoint.mode == "min" else -value, d))
    return min(scored)[1] if scored else None


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's raylm.json; raises FileNotFoundError if it is not a raylm checkpoint."""
    path = Path(directory) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a raylm checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def refuse_pickles(directory: str | Path) -> None:
    """Raises ValueError if the directory carries a pickle-format weight file."""
    bad = sorted(f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES))
    if bad:
        raise ValueError(f"{directory} holds pickle-format files {bad}; raylm loads safetensors only")


def inference_metadata(directory: str | Path) -> dict[str, Any]:
    """raylm.json of a checkpoint or export; `{}` for a plain HF model directory."""
    if not Path(directory, META_FILE).exists() and Path(directory, "config.json").exists():
        return {}
    return read_metadata(directory)


def task_of(directory: str | Path) -> str:
    """What a checkpoint, export or plain HF model directory does: `causal_lm`,
    `sequence_classification` or `token_classification` (from raylm.json, else config.json)."""
    meta = inference_metadata(directory)
    if meta.get("task"):
        return str(meta["task"])
    try:
        architectures = json.loads(Path(directory, "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        architectures = []
    for arch in architectures:
        if arch.endswith("ForSequenceClassification"):
            return "sequence_classification"
        if arch.endswith("ForTokenClassification"):
            return "token_classification"
    return "causal_lm"


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Any:
    """Only transformers' errors are logged inside (when `quiet`)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_for_inference(
    directory: str | Path, trust_remote_code: bool = False, more_adapters: Sequence[str | Path] = ()
) -> tuple[Any, Any]:
    """Loads (tokenizer, model) with plain transformers + peft, in eval mode, with the task's
    `AutoModelFor…` head (a classifier's label names from the checkpoint).

    `directory` is a raylm checkpoint (LoRA or full), an export, or a plain HF model directory.
    `more_adapters` are further LoRA checkpoints over the same base, loaded as peft adapters
    `"1"`, `"2"`, … next to `"default"`. Raises ValueError for pickles, a checkpoint that fails
    its checksums, or mismatched bases.
    """
    from transformers import AutoTokenizer

    from raylm.models import auto_class, label_kwargs

    for d in (directory, *more_adapters):
        refuse_pickles(d)
        check_checkpoint(d)
    meta = inference_metadata(directory)
    auto = auto_class(task_of(directory))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not Path(directory, "adapter_config.json").exists():
        if more_adapters:
            raise ValueError(f"{directory} holds full weights; extra LoRA adapters need a LoRA checkpoint")
        # A full checkpoint's config.json already names its labels.
        model = auto.from_pretrained(directory, trust_remote_code=trust_remote_code, use_safetensors=True)
        return tokenizer, model.eval()
    from peft import PeftModel

    # The base gets a head of the right size; the adapter's saved copy of the head replaces it,
    # so transformers' report of a "missing" head is noise here, not news.
    with _quiet_transformers(meta.get("labels") is not None):
        base = auto.from_pretrained(meta["base_model"], trust_remote_code=trust_remote_code,
                                    use_safetensors=True, **label_kwargs(meta.get("labels")))
    model = PeftModel.from_pretrained(base, directory)
    for i, extra in enumerate(more_adapters, start=1):
        other = inference_metadata(extra).get("base_model")
        if not Path(extra, "adapter_config.json").exists() or other != meta["base_model"]:
            raise ValueError(f"{extra} is not a LoRA adapter over {meta['base_model']} (base: {other})")
        model.load_adapter(str(extra), adapter_name=str(i))
    return tokenizer, model.eval()


@dataclass
class Served:
    """Models loaded for serving: one base with an adapter per served name (or one full model)."""

    names: list[str]
    metadata: dict[str, dict[str, Any]]
    tokenizer: Any
    model: Any
    adapter: dict[str, str]  # served name → peft adapter name
    multi: bool  # more than one adapter: each batch must say which


def load_served(models: Sequence[tuple[str, str | Path]], trust_remote_code: bool | None = None) -> Served:
    """Loads (served name, checkpoint dir) pairs, the first being the default, for an inference
    engine; a name may alias another's dir. `trust_remote_code` None lets the job that trained the
    first checkpoint decide. Raises ValueError for no models, duplicate names or what
    `load_for_inference` refuses."""
    if not models:
        raise ValueError("no model to serve")
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    paths = list(dict.fromkeys(str(p) for _, p in models))
    metas = [inference_metadata(p) for _, p in models]
    if trust_remote_code is None:
        trust_remote_code = bool(metas[0].get("spec", {}).get("model", {}).get("trust_remote_code"))
    tokenizer, model = load_for_inference(paths[0], trust_remote_code, paths[1:])
    # load_for_inference names adapters "default", "1", "2", … in the order of `paths`.
    adapter = {n: "default" if paths.index(str(p)) == 0 else str(paths.index(str(p))) for n, p in models}
    return Served(names, dict(zip(names, metas, strict=True)), tokenizer, model, adapter, len(paths) > 1)


def export_merged(directory: str | Path, out_dir: str | Path, trust_remote_code: bool = False) -> Path:
    """Writes a plain HF model directory (safetensors + tokenizer) that the task's
    `AutoModelFor…` class loads alone: a LoRA adapter is merged into its base (a classifier's
    trained head with it); full weights are re-saved.

    Returns `out_dir`; raises FileExistsError rather than overwrite a non-empty directory.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    tokenizer, model = load_for_inference(directory, trust_remote_code=trust_remote_code)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = read_metadata(directory)
    meta.update(exported_from=str(directory), base_model=None, exported_unix=time.time())
    (out / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    seal(out)
    return out
