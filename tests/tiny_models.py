"""Tiny random configs of the architectures we support (2 layers, hidden 32, vocab 128)."""
from __future__ import annotations

import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

ARCHS = ["llama", "opt", "gpt2", "qwen2", "gpt_neox"]
VOCAB = 128


def make_model(arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 32, tied: bool | None = None,
               vocab: int = VOCAB):
    """A freshly initialised tiny causal LM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True if tied is None else tied, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                        word_embed_proj_dim=hidden, max_position_embeddings=128, dropout=0.1,
                        tie_word_embeddings=True if tied is None else tied, **common)
        model = OPTForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                         tie_word_embeddings=True if tied is None else tied, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False if tied is None else tied, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=128,
                            tie_word_embeddings=False if tied is None else tied, **common)
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # A larger init than the default 0.02 makes perturbations move the loss measurably.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


def batches(n: int, rows: int = 4, seq: int = 16, seed: int = 100, pad_last: int = 0):
    """n random LM batches; ``pad_last`` right-pads that many positions of the last row."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (rows, seq), generator=gen)
        mask = torch.ones_like(ids)
        if pad_last:
            ids[-1, -pad_last:] = 2
            mask[-1, -pad_last:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


def padded_batches(n: int, rows: int = 8, seq: int = 16, seed: int = 200, last_rows: int | None = None):
    """n LM batches whose rows hold different numbers of tokens, and a short last batch of ``last_rows`` rows.

    Each row is right-padded by 0 to seq − 2 positions (attention_mask 0, pad token 2); every other row
    also marks its padding -100 in the labels (the collators' way; the engine masks by attention_mask
    either way). So rows, and any split of them between ranks or micro-batches, weigh differently when
    a loss is averaged per micro-batch instead of per token.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        count = last_rows if last_rows is not None and i == n - 1 else rows
        ids = torch.randint(3, VOCAB, (count, seq), generator=gen)
        mask = torch.ones_like(ids)
        pads = torch.randint(0, seq - 1, (count,), generator=gen)
        for r, pad in enumerate(pads.tolist()):
            if pad:
                ids[r, -pad:] = 2
                mask[r, -pad:] = 0
        labels = ids.clone()
        labels[::2][mask[::2] == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def split_rows(n: int, parts: int) -> list[slice]:
    """``n`` rows in ``parts`` contiguous slices whose sizes differ by at most one (the larger first)."""
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [slice(a, a + k) for a, k in zip(starts, sizes)]
