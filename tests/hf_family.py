"""Small families of Hugging Face model folders, made locally with transformers' own classes.

Each family is one tiny base model plus a few fine-tune-like members (a low-rank update of the
weight matrices plus small noise on everything), saved with ``save_pretrained`` in shards and
with a tokenizer that has a chat template. Nothing is downloaded.
"""

from __future__ import annotations

import os

import torch

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"


def tokenizer():
    """A tiny word-level tokenizer with special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(60)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(kind: str, seed: int = 0):
    """A tiny randomly initialised model: "gpt2" (causal LM, tied head), "bert" (masked LM),
    "llama" (causal LM, rotary, untied head)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
        return tf.GPT2LMHeadModel(cfg)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=32)
        return tf.BertForMaskedLM(cfg)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg)
    raise ValueError(kind)


def fine_tune(model, seed: int, scale: float = 0.02):
    """A fine-tune-like copy: a rank-2 update of every matrix plus small noise on every float tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                u = torch.randn(p.shape[0], 2, generator=g)
                v = torch.randn(2, p.shape[1], generator=g)
                p.add_(scale * (u @ v) / p.shape[1] ** 0.5)
            p.add_(scale * 0.1 * torch.randn(p.shape, generator=g))
    return model


def save_family(folder, kind: str, n: int = 3, shard: str = "20KB") -> list[str]:
    """``n`` model folders ``<kind>-ft<i>`` under ``folder``; their paths."""
    tok = tokenizer()
    out = []
    for i in range(n):
        m = fine_tune(make_model(kind, 0), seed=100 + i)
        p = os.path.join(os.fspath(folder), f"{kind}-ft{i}")
        m.save_pretrained(p, max_shard_size=shard)
        tok.save_pretrained(p)
        with open(os.path.join(p, "README.md"), "w", encoding="utf-8") as f:
            f.write(f"# {kind} fine-tune {i}\n\nA test model.\n")
        out.append(p)
    return out


def batch(kind: str) -> dict:
    """A fixed input batch for the family's models."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, 64, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
