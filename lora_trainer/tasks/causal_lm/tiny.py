"""A tiny random-weight LLaMA and a tokenizer made offline, for tests and `demo --task causal_lm`.

The tokenizer is a byte-level BPE trained (in well under a second) on the demo text with the
`tokenizers` library, saved as tokenizer.json with a chat template: nothing comes from a hub.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Jinja, rendered by transformers' apply_chat_template; each message ends with <|end|> (trained on
# assistant turns, so the model learns to stop)
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
                 "{{ message['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# initializer_range: with the usual 0.02 the frozen lm_head of so small a model can only make logits
# of about +-0.5 (the final norm fixes the hidden state's size), so no adapter could lower the loss
# much; 0.25 gives it room to learn the demo's pattern in a few dozen steps
TINY_LLAMA: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attention_dropout=0.0, initializer_range=0.25)


def train_tokenizer(texts: list[str], vocab_size: int = 400):
    """A fast tokenizer (transformers' PreTrainedTokenizerFast) over a byte-level BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE)


def build_tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **TINY_LLAMA)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def write_tiny_llama(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """config.json + model.safetensors + tokenizer files in `folder` (AutoModelForCausalLM loads it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts)
    model = build_tiny_llama(tokenizer, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    return folder


# ---- the demo dataset: tiny chats with a pattern a 30k-parameter model can learn in a minute -----
COLOURS = ("red", "green", "blue", "yellow", "black", "white")
THINGS = ("apple", "sky", "leaf", "sun", "cat", "cloud")


def demo_conversations() -> list[dict]:
    rows: list[dict[str, Any]] = []
    for i, thing in enumerate(THINGS):
        colour = COLOURS[i % len(COLOURS)]
        rows.append({"messages": [{"role": "user", "content": f"What colour is the {thing}?"},
                                  {"role": "assistant", "content": f"The {thing} is {colour}."}]})
        rows.append({"prompt": f"Name the colour of the {thing}: ", "completion": f"{colour}."})
    return rows


def demo_texts() -> list[str]:
    """Everything the demo tokenizer should know well."""
    rows = demo_conversations()
    texts = [m["content"] for r in rows for m in r.get("messages", [])]
    texts += [r["prompt"] + r["completion"] for r in rows if "prompt" in r]
    return texts + ["user assistant system"]


def write_demo_dataset(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row) for row in demo_conversations()]
    (folder / "colours.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "notes.txt").write_text("The apple is red.\n\nThe sky is green.\n", encoding="utf-8")
    return folder
