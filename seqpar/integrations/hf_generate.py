"""transformers `generate` over a sequence-sharded KV cache.

    from seqpar.integrations import hf
    out = hf.generate(model, input_ids, group=None, backend="ring", layout="zigzag",
                      max_new_tokens=32)                    # same result on every rank

Every rank passes the whole prompt and gets back exactly what `model.generate(input_ids,
**generate_kwargs)` returns on one process (greedy search; sampling too when every rank seeds
torch alike before the call, since every rank computes bit-identical logits). How:

1. the longest prefix of S0 < S tokens that the layout can cut (a multiple of P, or of 2P for
   zigzag) is prefilled sharded: each rank runs the model on its tokens, at their global
   positions (RoPE), through `seqpar.inference.prefill` with `backend` -- its K/V stay in a
   `SeqparCache` (transformers' `Cache` API over a `seqpar.inference.ShardedKVCache`);
2. `model.generate` then runs unchanged with that cache: its first step feeds the remaining
   1 .. 2P tokens, every later step one token, on every rank alike; each attention layer calls
   `seqpar.inference.decode` (each rank attends its shard, one all-gather merges, new tokens
   go to the shortest shard). Logits processors, stopping criteria, sampling: transformers'.

The attention function and the cache find each other without a global: a `GenerateAttention`
holding this call's cache is registered under a name made from the cache's id, the model
points at it for the call, and both are undone afterwards (the model's previous attention
implementation is restored, the registry entry removed).

Supported: greedy and sampling (num_beams == 1), batches without padding, GQA, models whose
attention goes through transformers' AttentionInterface with a `layer_idx` (Llama, Qwen2,
Mistral, ...). Sliding windows: the sharded prefill passes them to `seqpar.attention(window=)`,
decode applies them to each shard.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..comm.primitives import agree, resolve_group
from ..inference import ShardedKVCache, decode, prefill
from ..layout import ALL_LAYOUTS, check_layout, chunks_per_rank, positions, shard

_TAKEN = ("cache", "past_key_values", "use_cache", "position_ids", "input_ids")


class SeqparCacheLayer(CacheLayerMixin):
    """One layer of `SeqparCache`: the K/V live in the sharded cache; `update` keeps nothing
    (the attention function stores this rank's tokens) and hands the new K/V through."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, sharded: ShardedKVCache, index: int):
        super().__init__()
        self.sharded = sharded
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens cached for this layer over the whole group (the model's positions)."""
        return self.sharded.seq_len(self.index)

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("SeqparCache does not support beam search (num_beams > 1)")

    def reset(self) -> None:
        raise NotImplementedError("SeqparCache cannot be reset; make a new one")


class SeqparCache(Cache):
    """transformers' `Cache` API over a `seqpar.inference.ShardedKVCache` (one per call)."""

    def __init__(self, sharded: ShardedKVCache, num_layers: int):
        super().__init__(layers=[SeqparCacheLayer(sharded, i) for i in range(num_layers)])
        self.sharded = sharded
        self.prefilling = False

    @contextlib.contextmanager
    def prefill_phase(self):
        """Attention calls inside the block prefill this rank's prompt shard."""
        self.prefilling = True
        try:
            yield
        finally:
            self.prefilling = False


@dataclass(frozen=True, eq=False)
class GenerateAttention:
    """The attention function of one `generate` call: prefill (this rank's prompt shard) or
    decode (new tokens on every rank) over `cache`, as `cache.prefilling` says."""

    cache: SeqparCache
    backend: str
    options: tuple = field(default=())

    @property
    def name(self) -> str:
        return f"seqpar_generate_{id(self.cache):x}"

    def mask(self, *args, **kwargs) -> None:
        """The masks come from global positions inside seqpar: no mask to build (padding was
        refused once, on every rank, when generate started)."""
        return None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise TypeError(f"{type(module).__name__} has no layer_idx: seqpar's generate needs "
                            f"it to find the layer's cache shard")
        if dropout:
            raise ValueError(f"attention dropout is not applied by seqpar (got {dropout}); call "
                             f"model.eval() before generate")
        if kwargs.get("softcap") is not None:
            raise ValueError(f"softcap={kwargs['softcap']!r} is not supported by seqpar")
        window = kwargs.get("sliding_window")
        sinks = kwargs.get("s_aux")
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
        sharded = self.cache.sharded
        if self.cache.prefilling:
            o = prefill(q, k, v, sharded, layer, backend=self.backend, scale=scaling,
                        window=window, sinks=sinks, **dict(self.options))
        else:
            position_ids = kwargs.get("position_ids")
            o = decode(q, k, v, sharded, layer, scale=scaling, window=window, sinks=sinks,
                       positions=None if position_ids is None else position_ids[0])
        return o, None


def _check_generate_call(input_ids, info, layout: str, kwargs: dict) -> Exception | None:
    if layout == "balanced":
        return ValueError("hf.generate: layout='balanced' places a packed training batch's "
                          "documents; a prompt is one sequence: use layout='zigzag' or "
                          "'contiguous'")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.is_floating_point():
        return ValueError(f"input_ids must be an integer tensor [batch, seq_len] (the whole "
                          f"prompt, on every rank), got {getattr(input_ids, 'shape', input_ids)!r}")
    taken = sorted(set(kwargs) & set(_TAKEN))
    if taken:
        return ValueError(f"generate sets {taken} itself; drop them from the keyword arguments")
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape
                             or not bool((mask == 1).all())):
        return ValueError("attention_mask must be absent or all ones shaped like input_ids: "
                          "padding is not supported by seqpar; batch prompts of one length")
    if kwargs.get("num_beams", 1) != 1:
        return ValueError(f"num_beams={kwargs['num_beams']} is not supported (beam search "
                          f"reorders the cache); use greedy search or sampling")
    unit = chunks_per_rank(layout) * info.world
    if input_ids.shape[1] <= unit:
        return ValueError(f"the prompt has {input_ids.shape[1]} tokens; sharding it over "
                          f"{info.world} ranks with layout={layout!r} needs more than {unit} "
                          f"(a prefix of a multiple of {unit} is prefilled sharded, the rest "
                          f"decoded); run model.generate on one process for short prompts")
    return None


def _prompt_checksum(input_ids: torch.Tensor) -> int:
    from .hf import _checksum
    return _checksum(input_ids)


def generate(model, input_ids: torch.Tensor, group=None, backend: str = "ring",
             layout: str = "zigzag", backend_options: dict | None = None, **generate_kwargs):
    """`model.generate(input_ids, **generate_kwargs)` with the context sharded over `group`
    (module docstring). Collective: every rank passes the same prompt and arguments; every
    rank returns the same result. backend_options: extra `seqpar.attention` arguments of the
    prefill (e.g. {"s2": ...})."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    check_layout(layout, "hf.generate")
    info = resolve_group(group)
    problem = _check_generate_call(input_ids, info, layout, generate_kwargs)
    ok = problem is None
    agree(info, "hf.generate", {
        "layout": ALL_LAYOUTS.index(layout),
        "batch size": input_ids.shape[0] if ok else -1,
        "prompt length": input_ids.shape[1] if ok else -1,
        "prompt": _prompt_checksum(input_ids) if ok else 0,
    }, problem, input_ids.device if isinstance(input_ids, torch.Tensor) else torch.device("cpu"))
    unit = chunks_per_rank(layout) * info.world
    prefix = (input_ids.shape[1] - 1) // unit * unit
    config = model.config.get_text_config(decoder=True)
    cache = SeqparCache(ShardedKVCache(group, layout), config.num_hidden_layers)
    fn = GenerateAttention(cache, backend, tuple(sorted((backend_options or {}).items())))
    previous = model.config._attn_implementation
    AttentionInterface.register(fn.name, fn)
    AttentionMaskInterface.register(fn.name, fn.mask)
    try:
        model.set_attn_implementation(fn.name)
        local_ids = shard(input_ids[:, :prefix], group, dim=1, layout=layout)
        local_positions = positions(prefix, group, layout, device=input_ids.device)
        with torch.no_grad(), cache.prefill_phase():
            model(input_ids=local_ids, cache=cache, use_cache=True,
                  position_ids=local_positions.unsqueeze(0).expand(input_ids.shape[0], -1),
                  logits_to_keep=1)
        generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        return model.generate(input_ids, cache=cache, **generate_kwargs)
    finally:
        model.set_attn_implementation(previous)
        # transformers has no unregister: drop our entries so the cache can be freed.
        AttentionInterface._global_mapping.pop(fn.name, None)
        AttentionMaskInterface._global_mapping.pop(fn.name, None)


__all__ = ["generate", "SeqparCache", "SeqparCacheLayer", "GenerateAttention"]
