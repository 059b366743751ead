"""`builtin:tiny-llama`: a 2-layer Llama with a character tokenizer, built and briefly
pretrained here (seconds, no download), saved as a normal HF directory in raylm's cache."""

from __future__ import annotations

import random
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raylm.models.cache import cache_dir, materialize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Bump when the builtin's config, tokenizer or pretraining changes, so stale caches are not reused.
TINY_LLAMA_VERSION = "v2"
# A random-init base gives LoRA nothing to adapt, so the builtin is briefly pretrained on digit
# text (subtraction and counting; never addition, which builtin:arithmetic asks) when first built.
TINY_LLAMA_PRETRAIN_STEPS = 1000
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
# Llama-style system/user/assistant turns. Its `{% generation %}` markers serve tools that ask
# for `return_assistant_tokens_mask`; raylm finds assistant turns by rendering prefixes instead
# (raylm.data.tokenize_chat), so templates without markers train as well.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer made with the `tokenizers` library (no download)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    chars = list(string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", ""))
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


def materialize_tiny_llama(seed: int = 0) -> Path:
    """Builds the builtin tiny Llama once (briefly pretrained on digit text), saves it as an HF
    directory in raylm's cache, and returns its path."""
    target = cache_dir() / "models" / f"tiny-llama-{TINY_LLAMA_VERSION}-seed{seed}"
    return materialize(target, lambda out: _build_tiny_llama(out, seed))


def _build_tiny_llama(out: Path, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA_CONFIG,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        _pretrain_digits(model, tokenizer, seed, TINY_LLAMA_PRETRAIN_STEPS)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _digit_text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        a, b = sorted((rng.randrange(100), rng.randrange(100)), reverse=True)
        return f"{a}-{b}={a - b}"
    start = rng.randrange(95)
    return " ".join(str(start + i) for i in range(rng.randrange(2, 6)))


def _pretrain_digits(model: Any, tokenizer: Any, seed: int, steps: int) -> None:
    """A few seconds of full training on digit text, single-threaded so every machine gets
    bit-identical weights (adapters trained on one node must fit the base on another)."""
    import torch

    rng = random.Random(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(steps):
            rows = [
                tokenizer(_digit_text(rng))["input_ids"] + [tokenizer.eos_token_id]
                for _ in range(32)
            ]
            width = max(map(len, rows))
            ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
            labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
            model(
                input_ids=ids, attention_mask=(labels != -100).long(), labels=labels
            ).loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
