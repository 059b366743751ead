"""Models: the builtin tiny Llama loads through from_pretrained; LoRA and full fine-tuning; the
packaged MiniLM with classification heads that train fully beside LoRA."""

from __future__ import annotations

import os

import pytest

from raylm.job import spec_from_dict
from raylm.models import build_model, build_tokenizer, materialize_tiny_llama


def test_builtin_is_a_plain_hf_directory_of_safetensors():
    path = materialize_tiny_llama()
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt")) for f in files)
    assert materialize_tiny_llama() == path  # cached, not rebuilt


def test_tokenizer_round_trips_text():
    tok = build_tokenizer(spec_from_dict({}))
    text = "12+30=42\nWhat?"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_lora_trains_only_the_adapter_and_full_trains_everything():
    lora = build_model(spec_from_dict({"lora": {"r": 4}}))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    full = build_model(spec_from_dict({"lora": {"enabled": False}}))
    assert all(p.requires_grad for p in full.parameters())


def test_lora_init_is_identical_for_the_same_seed():
    a = build_model(spec_from_dict({"training": {"seed": 1}}))
    b = build_model(spec_from_dict({"training": {"seed": 1}}))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and (pa == pb).all()


def test_gradient_checkpointing_is_applied():
    model = build_model(spec_from_dict({"model": {"gradient_checkpointing": True}}))
    inner = model.base_model.model
    assert getattr(inner, "is_activation_checkpointing", None) or inner.is_gradient_checkpointing


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_classifier_heads_train_fully_beside_lora_and_name_their_labels(task):
    from raylm.builtins import MINILM

    labels = ["O", "B-PER", "I-PER"] if task == "token_classification" else ["neg", "pos"]
    spec = spec_from_dict({"model": {"name_or_path": MINILM, "task": task}, "lora": {"r": 4}})
    model = build_model(spec, labels=labels)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    head = [n for n in trainable if "lora_" not in n]
    assert head and all(".classifier.modules_to_save." in n for n in head)
    assert any("attention.self.query.lora_A" in n for n in trainable)
    assert not any("classifier" in n and "lora_" in n for n in trainable)  # no LoRA on the head
    assert model.config.id2label == dict(enumerate(labels)) and model.config.num_labels == len(
        labels
    )
    with pytest.raises(ValueError, match="needs its label names"):
        build_model(spec)
