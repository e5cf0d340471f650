"""Tiny random-init models of the transformers families people train at long context (no
download), and the three kinds of batch the zoo test feeds them.

Every model: vocab 96, hidden 32, 2 layers, 4 query heads over 2 key/value heads (GQA), head
dim 8, `initializer_range` 0.2 (ten times the default, so attention is far from uniform and a
wrong mask, window, cap or sink moves the result well above rounding). Windowed families get
a window of 4 -- shorter than the documents and rows below, so it cuts -- on alternating layers
where the family alternates (`layer_types`). Soft caps are small enough to bend the scores.
"""

from __future__ import annotations

import torch

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              max_position_embeddings=64, use_cache=False, initializer_range=0.2,
              attention_dropout=0.0, tie_word_embeddings=False)
WINDOW = 4
ALTERNATING = ["sliding_attention", "full_attention"]


def _config(family: str):
    import transformers as t

    if family == "llama":
        return t.LlamaForCausalLM, t.LlamaConfig(**COMMON)
    if family == "qwen2":
        return t.Qwen2ForCausalLM, t.Qwen2Config(**COMMON)
    if family == "qwen3":
        return t.Qwen3ForCausalLM, t.Qwen3Config(**COMMON)
    if family == "mistral":
        return t.MistralForCausalLM, t.MistralConfig(**COMMON, sliding_window=WINDOW)
    if family == "gemma2":
        return t.Gemma2ForCausalLM, t.Gemma2Config(
            **COMMON, sliding_window=WINDOW, layer_types=ALTERNATING, query_pre_attn_scalar=8,
            attn_logit_softcapping=1.5, final_logit_softcapping=10.0)
    if family == "gemma3":
        return t.Gemma3ForCausalLM, t.Gemma3TextConfig(
            **COMMON, sliding_window=WINDOW, layer_types=ALTERNATING, query_pre_attn_scalar=8)
    if family == "cohere2":
        return t.Cohere2ForCausalLM, t.Cohere2Config(
            **COMMON, sliding_window=WINDOW, layer_types=ALTERNATING)
    if family == "gpt_oss":
        common = {**COMMON, "intermediate_size": 16}
        return t.GptOssForCausalLM, t.GptOssConfig(
            **common, sliding_window=WINDOW, layer_types=ALTERNATING, num_local_experts=4,
            num_experts_per_tok=2)
    if family == "phi3":
        common = {k: v for k, v in COMMON.items() if k != "head_dim"}
        return t.Phi3ForCausalLM, t.Phi3Config(**common, pad_token_id=0)
    if family == "olmo2":
        return t.Olmo2ForCausalLM, t.Olmo2Config(**COMMON)
    if family == "granite":
        common = {k: v for k, v in COMMON.items() if k != "head_dim"}
        return t.GraniteForCausalLM, t.GraniteConfig(
            **common, embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5,
            logits_scaling=2.0)
    if family == "smollm3":
        return t.SmolLM3ForCausalLM, t.SmolLM3Config(**COMMON, no_rope_layers=[1, 0],
                                                     pad_token_id=0, bos_token_id=None,
                                                     eos_token_id=None)
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "cohere2", "gpt_oss",
            "phi3", "olmo2", "granite", "smollm3")


def dtype_of(family: str) -> torch.dtype:
    """fp64 everywhere but gpt-oss, whose experts (transformers' MoE kernels) have no fp64
    matmul on CPU: fp32 there."""
    return torch.float32 if family == "gpt_oss" else torch.float64


def reference_attention(family: str) -> str:
    """transformers' attention for the single-process truth: sdpa (fp64 all the way), but eager
    where the family needs it -- gemma2's soft cap and gpt-oss's sinks exist only there (eager
    takes its softmax in fp32: the reference itself rounds at ~1e-7)."""
    return "eager" if family in ("gemma2", "gpt_oss") else "sdpa"


def build(family: str, attn: str | None = None):
    """The family's tiny model, the same weights on every call (seeded), in its test dtype."""
    cls, config = _config(family)
    config._attn_implementation = attn or reference_attention(family)
    torch.manual_seed(0)
    model = cls(config).to(dtype_of(family))
    with torch.no_grad():  # parameters some families initialise to 0 or 1: random, so they count
        for name, p in model.named_parameters():
            if "norm" in name or "sinks" in name or "bias" in name or "router" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------- batches

def plain_batch() -> dict[str, torch.Tensor]:
    """2 rows of 16 tokens, a few unlabelled ones."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    labels[1, 9] = -100
    return {"input_ids": ids, "labels": labels}


DOCS = (5, 3, 7, 4)  # 19 tokens: not a multiple of any layout unit, so a filler is needed


def packed_batch() -> dict[str, torch.Tensor]:
    """DataCollatorWithFlattening's shape: B == 1, positions restart at 0 per document, label
    -100 at each document's first token."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, sum(DOCS)), generator=gen)
    positions = torch.cat([torch.arange(n) for n in DOCS])[None]
    labels = ids.clone()
    labels[positions == 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def documents() -> list[tuple[int, int]]:
    bounds = [0]
    for n in DOCS:
        bounds.append(bounds[-1] + n)
    return list(zip(bounds[:-1], bounds[1:]))


ROWS = ((7, "right"), (9, "left"), (12, None))  # real tokens per row of 12, padding side


def padded_batch() -> dict[str, torch.Tensor]:
    """3 rows of 12: right padding, left padding, none; pads and (left) the first real token
    carry no label, so no pad position has a target (hf_batch module docstring)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 12), generator=gen)
    mask = torch.zeros_like(ids)
    for row, (n, side) in enumerate(ROWS):
        if side == "left":
            mask[row, 12 - n:] = 1
        else:
            mask[row, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 12 - ROWS[1][0]] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
