"""Hugging Face transformers: a model's attention layers on seqpar, its batch sharded along the
sequence, its loss and gradients over the sequence-parallel group.

    from seqpar.integrations import hf
    hf.apply(model, group, backend="ring", layout="zigzag")         # once
    local = hf.shard_batch({"input_ids": ids, "labels": ids}, group, layout="zigzag")
    # (or a packed / padded batch: + "position_ids" restarting per document, "attention_mask")
    logits = model(**local, use_cache=False).logits                  # this rank's tokens
    loss = hf.loss(logits, local, group)                             # the global mean, every rank
    loss.backward()
    hf.sync_grads(model, group)                                      # = single-process gradients
    out = hf.generate(model, prompt_ids, group, max_new_tokens=32)   # inference, sharded KV cache

`group` is what `seqpar.attention` takes: None (WORLD), a ProcessGroup, or a `seqpar.SPMesh`
(needed by backend "usp"; with a data-parallel axis, `sync_grads` also averages over it).

How the attention function finds its group without a global: `apply` builds a
`SeqparAttention` -- a frozen, callable object holding the group, backend, layout and backend
options -- and registers that object itself through transformers' public
`AttentionInterface.register(name, fn)`, under a name made from its settings
("seqpar_ring_zigzag_..."); `model.set_attn_implementation(name)` points the model's config at
it. transformers looks the function up by that name at every attention call, so each model
reaches its own settings, two models with different groups get two names, and applying the same
settings again reuses the entry. The object's `mask` is registered the same way
(`AttentionMaskInterface`), so a padding mask is refused instead of silently dropped. No
monkeypatching: only transformers' registries and its setter.

Every layer call honours what the layer asks for -- its causal flag, scaling, `sliding_window`
(per layer: alternating `layer_types` give None on full layers), soft cap (`softcap`, Gemma 2)
and sinks (`s_aux`, gpt-oss) -- and checks (on every rank, with the agreement `seqpar.attention`
uses) what seqpar cannot compute exactly: a ready-made (4-D) mask, dropout, a KV cache, and
position ids that are not the layout's global positions (so RoPE matches).

Sharding (`shard_batch`): labels are shifted by one over the *whole* sequence before it is cut
(the target of a rank's last token is the next rank's first), position ids are the tokens'
global positions (RoPE sees the same angles as on one device), and the layout is the one the
attention backend is told, so every rank's shards of q, k and v line up. Packed documents
(position_ids that restart, as DataCollatorWithFlattening makes them) and padded rows
(attention_mask zeros) become one row of documents (`hf_batch`): no pad token is computed on,
each document sees only itself, and the GLOBAL document boundaries reach every attention call
as the model keyword argument `seqpar_cu_seqlens` (`model(**local)` passes it through the
model's **kwargs; no globals). `unshard(per_token, local)` maps outputs back to [B, S].

Loss (`loss`): per-token cross entropy in fp32 (fp64 for an fp64 model) over this rank's tokens, summed, divided by the
number of labelled tokens of the whole sequence (one all-reduce). Its value is the global mean
on every rank; its gradient is only this rank's share, so after `backward` the sum of the
ranks' parameter gradients is the single-process gradient -- `sync_grads` all-reduces them.
`lm_loss(model, local, group)` is the same loss without the full logits: the model's body, then
lm_head and the cross entropy over sequence tiles (`tiled_loss`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..api import BACKENDS, attention
from ..comm.primitives import GroupInfo, Traffic, agree, resolve_group, start_all_reduce
from ..kernels.mask import runs_to_positions
from ..layout import (ALL_LAYOUTS, BALANCED, check_layout, gather, local_runs, positions,
                      seq_len_error, shard)
from ..mesh import SPMesh
from .hf_batch import (Packing, check_mask_and_positions, layout_unit, pack, packing_needed,
                       unpack)
from .memory import MemorySavers, disable_memory_savers, enable_memory_savers
from .tiled_loss import IGNORE_INDEX, loss_dtype, tiled_lm_loss_sum

_BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")
_GRAD_BUCKET_BYTES = 32 * 2**20


def _group_tag(group) -> str:
    return "world" if group is None else f"{type(group).__name__.lower()}{id(group):x}"


@dataclass(frozen=True, eq=False)
class SeqparAttention:
    """The attention function `apply` registers: transformers calls it with a layer's q, k, v
    ([B, H, S_loc, D], this rank's tokens), it runs `seqpar.attention` and returns
    ([B, S_loc, H, D], None). Causal flag and scaling come from the layer; GQA is native.

    `mask` is registered too, as the model's mask builder: without one transformers would drop
    a padding mask silently; this one refuses it (on every rank) and builds nothing, since the
    backends apply the causal mask from global positions themselves."""

    group: object
    backend: str
    layout: str
    options: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        digest = hashlib.sha1(repr(self.options).encode()).hexdigest()[:8]
        return f"seqpar_{self.backend}_{self.layout}_{_group_tag(self.group)}_{digest}"

    def mask(self, attention_mask=None, device="cpu", **_) -> None:
        problem = None
        if attention_mask is not None and not bool(attention_mask.all()):
            problem = ValueError("the model got an attention_mask with zeros (padding), which "
                                 "cannot be applied to a sharded sequence; pass the padded batch "
                                 "to hf.shard_batch (it drops the pads and packs the rows) and "
                                 "call the model with its output")
        agree(resolve_group(self.group), "seqpar attention mask", {}, problem,
              torch.device(device))
        return None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
        info = resolve_group(self.group)
        problem = _check_layer_call(query, key, attention_mask, dropout, kwargs)
        cu_seqlens = kwargs.get(DOCUMENTS_KEY)
        masks, problem = _layer_masks(module, kwargs, cu_seqlens, problem)
        offset, problem = _position_offset(kwargs.get("position_ids"), query.shape[2],
                                           self.group, self.layout, cu_seqlens, problem)
        agree(info, "seqpar attention", {POSITION_OFFSET: offset}, problem, query.device)
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
        # bshd for seqpar; contiguous because the backends send whole tensors.
        q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
        out = attention(q, k, v, self.group, backend=self.backend, causal=causal, scale=scaling,
                        layout=self.layout, **masks, **dict(self.options))
        return out, None


POSITION_OFFSET = "position_ids offset from the layout's global positions (pass shard_batch's)"
# The model keyword argument that carries a packed batch's GLOBAL document boundaries from
# shard_batch's output (model(**local)) through the model's **kwargs to every attention call.
DOCUMENTS_KEY = "seqpar_cu_seqlens"


def _check_layer_call(query, key, attention_mask, dropout, kwargs) -> Exception | None:
    """What a layer may ask of seqpar: causal or not self-attention over its tokens, with the
    masks of `_layer_masks`; no ready-made mask, no dropout, no KV cache."""
    if attention_mask is not None:
        return ValueError("got a ready-made attention mask, which seqpar cannot apply to a "
                          "sharded sequence (arbitrary 4-D masks are not supported); call the "
                          "model with shard_batch's output, which turns padding into packed "
                          "documents and has no attention_mask")
    if dropout:
        return ValueError(f"attention dropout is not applied by seqpar (got dropout={dropout}); "
                          f"set config.attention_dropout = 0.0")
    if kwargs.get("sinks") is not None:
        return ValueError("a 'sinks' keyword is not a transformers attention argument; seqpar "
                          "takes a layer's sinks as s_aux (gpt-oss)")
    if key.shape[2] != query.shape[2]:
        return ValueError(f"got {query.shape[2]} query tokens but {key.shape[2]} key tokens (a "
                          f"KV cache?); call the model with use_cache=False")
    return None


def _layer_masks(module, kwargs, cu_seqlens, problem: Exception | None
                 ) -> tuple[dict, Exception | None]:
    """The masks the layer asks for, as seqpar.attention keywords: its `sliding_window` (per
    layer: transformers passes None on full-attention layers), soft cap (`softcap`), sinks
    (`s_aux`, one logit per query head), and the packed batch's documents."""
    masks = {"window": kwargs.get("sliding_window"), "softcap": kwargs.get("softcap"),
             "sinks": kwargs.get("s_aux"), "cu_seqlens": cu_seqlens}
    if problem is None and cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):
        problem = TypeError(f"{DOCUMENTS_KEY} must be the tensor shard_batch returns, got "
                            f"{type(cu_seqlens).__name__}")
    return {k: v for k, v in masks.items() if v is not None}, problem


def _position_offset(position_ids, seq_local: int, group, layout: str, cu_seqlens,
                     problem: Exception | None) -> tuple[int, Exception | None]:
    """RoPE must see each token's global position up to a shift RoPE cannot tell apart: one
    offset shared by every token of every rank (returned, for the cross-rank agreement), or,
    in a packed batch, the position within its document up to one offset per document (0 is
    returned: documents may differ). The offset, or the error."""
    world = resolve_group(group).world
    if problem is not None or position_ids is None or seq_len_error(seq_local * world, world,
                                                                    layout):
        return 0, problem  # nothing to compare (seqpar.attention judges the length)
    try:
        expected = positions(seq_local * world, group, layout, device=position_ids.device,
                             cu_seqlens=cu_seqlens)
    except (TypeError, ValueError):
        return 0, None  # bad cu_seqlens: seqpar.attention says why, on every rank
    shift = position_ids - expected
    if cu_seqlens is None:
        same = position_ids.shape[-1] == seq_local and bool((shift == shift.flatten()[0]).all())
    else:
        # a document's local tokens are consecutive here (a rank holds tokens in global order)
        bounds = cu_seqlens.to(position_ids.device, torch.int64)
        documents = tuple(bounds.tolist()) if layout == BALANCED else None
        global_ids = runs_to_positions(local_runs(seq_local * world, world,
                                                  resolve_group(group).rank, layout, documents),
                                       device=position_ids.device)
        doc = torch.searchsorted(bounds, global_ids, right=True)
        same = position_ids.shape[-1] == seq_local and bool(
            ((shift[..., 1:] == shift[..., :-1]) | (doc[1:] != doc[:-1])).all())
    if not same:
        what = ("the packed batch's positions, stepping by one within each document" if
                cu_seqlens is not None else "this rank's global token positions")
        return 0, ValueError(f"position_ids are not {what} (RoPE would rotate them wrongly; "
                             f"a packed batch also needs its {DOCUMENTS_KEY}); call the model "
                             f"with shard_batch's output (model(**local)), with the layout "
                             f"given to apply")
    return (0 if cu_seqlens is not None else int(shift.flatten()[0])), None


def apply(model, group=None, backend: str = "ring", layout: str = "zigzag",
          **backend_kwargs) -> str:
    """Run `model`'s attention layers on seqpar (see the module docstring); returns the name
    its attention implementation is registered under."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if backend not in BACKENDS:
        raise ValueError(f"hf.apply: backend={backend!r} is not available; choose one of "
                         f"{sorted(BACKENDS)}")
    check_layout(layout, "hf.apply")
    for taken in ("causal", "scale", "return_lse", "group", "layout", "backend"):
        if taken in backend_kwargs:
            raise ValueError(f"hf.apply: {taken}= is not a backend option (the layer gives its "
                             f"causal flag and scaling; group, backend and layout are "
                             f"arguments of apply); drop it")
    resolve_group(group)  # a clear TypeError now for anything that is not a group
    fn = SeqparAttention(group, backend, layout, tuple(sorted(backend_kwargs.items())))
    AttentionInterface.register(fn.name, fn)
    AttentionMaskInterface.register(fn.name, fn.mask)
    model.set_attn_implementation(fn.name)
    if model.config._attn_implementation != fn.name:
        raise TypeError(f"hf.apply: {type(model).__name__} does not dispatch attention through "
                        f"transformers.AttentionInterface, so seqpar cannot run its attention")
    return fn.name


def _checksum(t: torch.Tensor) -> int:
    """56 bits of a hash of the tensor's values (an int the cross-rank check can compare)."""
    digest = hashlib.blake2b(t.detach().cpu().contiguous().numpy().tobytes(), digest_size=7)
    return int.from_bytes(digest.digest(), "little")


def _check_batch(batch, info: GroupInfo, layout: str) -> Exception | None:
    if not isinstance(batch, Mapping):
        return TypeError(f"batch must be a dict of tensors, got {type(batch).__name__}")
    unknown = sorted(set(batch) - set(_BATCH_KEYS))
    if unknown:
        return ValueError(f"batch has keys {unknown} that shard_batch does not know how to shard; "
                          f"it takes {list(_BATCH_KEYS)}")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return ValueError(f"batch['input_ids'] must be an integer tensor [batch, seq_len], got "
                          f"{getattr(ids, 'shape', type(ids).__name__)}")
    for name in ("labels", "attention_mask", "position_ids"):
        value = batch.get(name)
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != ids.shape):
            return ValueError(f"batch[{name!r}] must be a tensor shaped like input_ids "
                              f"{tuple(ids.shape)}, got {getattr(value, 'shape', value)!r}"
                              + ("; shard_batch takes the 2-D padding mask, not a 4-D one"
                                 if name == "attention_mask" else ""))
    problem = check_mask_and_positions(ids, batch.get("attention_mask"),
                                       batch.get("position_ids"))
    if problem or packing_needed(batch.get("attention_mask"), batch.get("position_ids")):
        return problem  # packed into one row of a length the layout takes
    if layout == BALANCED:
        return ValueError("layout='balanced' places the tokens of packed documents; this batch "
                          "has none (no restarting position_ids, no padding): use "
                          "layout='zigzag' for plain rows")
    problem = seq_len_error(ids.shape[1], info.world, layout)
    return ValueError(f"batch['input_ids']: {problem}") if problem else None


class LocalBatch(dict):
    """shard_batch's result: a dict of this rank's model inputs (pass it as `model(**local)`),
    which also remembers -- as attributes, not items, so the model never sees them -- how to put
    per-token outputs back in the caller's order (`unshard`)."""

    group: object
    layout: str
    packing: Packing | None


def shard_batch(batch: Mapping[str, torch.Tensor], group=None, layout: str = "zigzag"
                ) -> LocalBatch:
    """This rank's model inputs from the full batch (every rank of the group passes the same
    one; checked). Call the model with all of them: `model(**local)`.

    Plain rows (no padding, no restarting positions): local `input_ids` [B, S_loc], global
    `position_ids` [B, S_loc], and, when the batch has labels, `shift_labels` [B, S_loc]
    (labels shifted by one over the whole sequence, -100 after its last token, then sharded).
    An all-ones `attention_mask` is dropped.

    Packed or padded (`position_ids` that restart -- DataCollatorWithFlattening -- or an
    `attention_mask` with zeros, left or right padding; `hf_batch` module docstring): the real
    tokens of all rows become one row of documents (B = 1), with a masked filler document to
    the length the layout needs; local `position_ids` count from 0 in each document, and
    `seqpar_cu_seqlens` (the GLOBAL document boundaries, the same on every rank) reaches every
    attention layer through the model's keyword arguments. No pad token is computed on.
    `unshard(per_token_output, local)` maps outputs back to the caller's [B, S] order."""
    check_layout(layout, "hf.shard_batch")
    info = resolve_group(group)
    problem = _check_batch(batch, info, layout)
    ok = problem is None
    ids = batch["input_ids"] if ok else None
    labels = batch.get("labels") if ok else None
    mask = batch.get("attention_mask") if ok else None
    given_positions = batch.get("position_ids") if ok else None
    agree(info, "hf.shard_batch", {
        "layout": ALL_LAYOUTS.index(layout),
        "batch size": ids.shape[0] if ok else -1,
        "sequence length": ids.shape[1] if ok else -1,
        "input_ids": _checksum(ids) if ok else 0,
        "labels (present)": int(labels is not None),
        "labels": _checksum(labels) if ok and labels is not None else 0,
        "attention_mask (present)": int(mask is not None),
        "attention_mask": _checksum(mask) if ok and mask is not None else 0,
        "position_ids (present)": int(given_positions is not None),
        "position_ids": _checksum(given_positions) if ok and given_positions is not None else 0,
    }, problem, ids.device if ok else torch.device("cpu"))
    local = LocalBatch()
    local.group, local.layout, local.packing = group, layout, None
    if packing_needed(mask, given_positions):
        full, local.packing = pack(ids, labels, mask, given_positions,
                                   layout_unit(info.world, layout))
        for name, value in full.items():
            local[name] = shard(value, group, dim=1, layout=layout,
                                cu_seqlens=local.packing.cu_seqlens)
        local[DOCUMENTS_KEY] = local.packing.cu_seqlens
        return local
    local["input_ids"] = shard(ids, group, dim=1, layout=layout)
    local["position_ids"] = (positions(ids.shape[1], group, layout, device=ids.device)
                             .unsqueeze(0).expand(ids.shape[0], -1))
    if labels is not None:
        shifted = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)],
                            dim=1)
        local["shift_labels"] = shard(shifted, group, dim=1, layout=layout)
    return local


def unshard(local: torch.Tensor, local_batch: LocalBatch) -> torch.Tensor:
    """Per-token outputs of this rank's tokens (e.g. logits [B_loc, S_loc, ...] of
    `model(**local_batch)`) -> [B, S, ...] in the order of the batch given to shard_batch, on
    every rank (collective: an all-gather). Pad positions of a padded batch hold zeros.
    Differentiable: the gradient is this rank's share (like `seqpar.gather`)."""
    if not isinstance(local_batch, LocalBatch):
        raise TypeError(f"hf.unshard: local_batch must be the object hf.shard_batch returned "
                        f"(it remembers the group, layout and packing), got "
                        f"{type(local_batch).__name__}")
    ids = local_batch.get("input_ids")
    if (not isinstance(local, torch.Tensor) or local.dim() < 2 or ids is None
            or tuple(local.shape[:2]) != tuple(ids.shape)):
        raise ValueError(f"hf.unshard: local must be a tensor [B_loc, S_loc, ...] over this "
                         f"rank's tokens {tuple(ids.shape) if ids is not None else ()}, got "
                         f"{getattr(local, 'shape', type(local).__name__)}")
    cu_seqlens = local_batch.packing.cu_seqlens if local_batch.packing is not None else None
    full = gather(local, local_batch.group, dim=1, layout=local_batch.layout,
                  cu_seqlens=cu_seqlens)
    return full if local_batch.packing is None else unpack(full, local_batch.packing)


def _loss_problem(local_batch, shape_of: str, shape, dims: int
                  ) -> tuple[torch.Tensor | None, Exception | None]:
    """shift_labels, or why not; `shape` (of `shape_of`) must be [B, S_loc] + (dims - 2) more."""
    labels = local_batch.get("shift_labels") if isinstance(local_batch, Mapping) else None
    if labels is None:
        return None, ValueError("local_batch has no 'shift_labels'; pass the batch's labels to "
                                "shard_batch, and its output here")
    if len(shape) != dims or tuple(shape[:2]) != tuple(labels.shape):
        expected = "[B, S_loc, vocab]" if dims == 3 else "[B, S_loc]"
        return labels, ValueError(f"{shape_of} must be {expected} for shift_labels "
                                  f"{tuple(labels.shape)}, got {tuple(shape)}")
    return labels, None


def _global_mean(token_losses: torch.Tensor, labels: torch.Tensor, info: GroupInfo,
                 name: str) -> torch.Tensor:
    """token_losses: this rank's summed per-token losses (differentiable). Returns the global
    mean on every rank, whose gradient is this rank's share (module docstring)."""
    counted = (labels != IGNORE_INDEX).sum()
    # One all-reduce of (sum, count) in fp64: the count stays exact, the sum as good as fp32.
    local = torch.stack([token_losses.detach().double(), counted.double()])
    total_sum, total_count = start_all_reduce(local, info, Traffic.now(name)).wait()
    count = total_count.clamp(min=1)
    value = (total_sum / count).to(token_losses.dtype)
    # The value is the global mean (identical everywhere); the gradient is this rank's share.
    return value + (token_losses - token_losses.detach()) / count.to(token_losses.dtype)


def loss(logits_local: torch.Tensor, local_batch: Mapping[str, torch.Tensor], group=None
         ) -> torch.Tensor:
    """The mean next-token cross entropy over the whole sequence (all ranks' labelled tokens),
    the same value on every rank; backward gives this rank's share of the gradient (module
    docstring). 0 when no token has a label. Computed in fp32, or fp64 for fp64 logits."""
    info = resolve_group(group)
    labels, problem = _loss_problem(local_batch, "logits_local", tuple(logits_local.shape), 3)
    agree(info, "hf.loss", {}, problem, logits_local.device)
    token_losses = F.cross_entropy(logits_local.to(loss_dtype(logits_local.dtype)).flatten(0, 1),
                                   labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return _global_mean(token_losses, labels, info, "hf.loss")


def lm_loss(model, local_batch: Mapping[str, torch.Tensor], group=None,
            tile_tokens: int | None = None) -> torch.Tensor:
    """`hf.loss(model(**local_batch).logits, local_batch, group)` -- the same value and, after
    backward, the same gradient of every parameter (tied embeddings and a final-logit soft cap
    included) -- without the logits: the model's body runs on `shard_batch`'s output, then
    "last hidden states -> lm_head -> soft cap -> cross entropy" runs over tiles of
    `tile_tokens` tokens (default: tiles whose fp32 logits take about 64 MiB), recomputed per
    tile in the backward, so at most one tile's logits exist at a time
    (`seqpar.integrations.tiled_loss`). Collective over `group`, like `loss`."""
    info = resolve_group(group)
    ids = local_batch.get("input_ids") if isinstance(local_batch, Mapping) else None
    labels, problem = _loss_problem(local_batch, "local_batch['input_ids']",
                                    tuple(getattr(ids, "shape", ())), 2)
    head, body, softcap = None, None, None
    if problem is None:
        head, body, softcap, problem = _lm_parts(model)
    if problem is None and tile_tokens is not None and (
            not isinstance(tile_tokens, int) or isinstance(tile_tokens, bool) or tile_tokens < 1):
        problem = ValueError(f"tile_tokens must be None or an int >= 1, got {tile_tokens!r}")
    agree(info, "hf.lm_loss", {}, problem, ids.device if isinstance(ids, torch.Tensor)
          else torch.device("cpu"))
    # every model input shard_batch made (position ids, packed documents' boundaries), no labels
    inputs = {key: value for key, value in local_batch.items() if key != "shift_labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    if tile_tokens is None:
        tile_tokens = max(1, DEFAULT_LOSS_TILE_BYTES // (4 * head.weight.shape[0]))
    token_losses = tiled_lm_loss_sum(hidden, head.weight, head.bias, labels, tile_tokens, softcap)
    return _global_mean(token_losses, labels, info, "hf.lm_loss")


DEFAULT_LOSS_TILE_BYTES = 64 * 2**20
# Config fields of known causal LMs that change the logits after lm_head in a way lm_loss does
# not reproduce (Cohere multiplies by logit_scale, Granite divides by logits_scaling).
_UNSUPPORTED_LOGIT_FIELDS = ("logit_scale", "logits_scaling")


def _lm_parts(model):
    """(lm_head, body, soft cap, problem) of a transformers causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return None, None, None, TypeError(
            f"hf.lm_loss needs a transformers causal LM whose output embedding is an nn.Linear "
            f"(lm_head); {type(model).__name__} has {type(head).__name__}")
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(body, torch.nn.Module) or body is model:
        return None, None, None, TypeError(
            f"hf.lm_loss: cannot find the body of {type(model).__name__} (looked for "
            f"model.{getattr(model, 'base_model_prefix', None)}); call hf.loss on its logits")
    config = model.config
    for field in _UNSUPPORTED_LOGIT_FIELDS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            return None, None, None, ValueError(
                f"hf.lm_loss: config.{field}={value!r} rescales the logits, which lm_loss does "
                f"not reproduce; call hf.loss on the model's logits instead")
    return head, body, getattr(config, "final_logit_softcapping", None), None


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, up to _GRAD_BUCKET_BYTES each."""
    buckets, size = [], 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        same = buckets and (buckets[-1][0].dtype, buckets[-1][0].device) == (g.dtype, g.device)
        if not same or size + nbytes > _GRAD_BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += nbytes
    return buckets


def sync_grads(model: torch.nn.Module, group=None) -> None:
    """Sum every parameter gradient over the sequence-parallel group (the ranks' shares add up
    to the single-process gradient). An SPMesh with data-parallel replicas also averages over
    them, in the same all-reduce (over the whole mesh, then / dp)."""
    mesh = group if isinstance(group, SPMesh) else None
    info = mesh.dp_sp if mesh is not None else resolve_group(group)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    agree(info, "hf.sync_grads", {"parameters with gradients": len(grads),
                                  "gradient elements": sum(g.numel() for g in grads)},
          None, grads[0].device if grads else torch.device("cpu"))
    replicas = mesh.dp_size if mesh is not None else 1
    traffic = Traffic.now("hf.sync_grads")
    pending = [(bucket, start_all_reduce(torch.cat([g.flatten() for g in bucket]), info, traffic))
               for bucket in _buckets(grads)]
    for bucket, reduced in pending:
        flat = reduced.wait()
        if replicas > 1:
            flat /= replicas
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# Inference: generate over a sequence-sharded KV cache (its own file, hf_generate.py, imported on
# first use: it subclasses transformers' Cache; importing this module needs no transformers).
def generate(model, input_ids, group=None, backend: str = "ring", layout: str = "zigzag",
             **generate_kwargs):
    """`model.generate(input_ids, **generate_kwargs)` with the context sharded over `group`;
    the same result on every rank (see `hf_generate`)."""
    from .hf_generate import generate as sharded_generate
    return sharded_generate(model, input_ids, group, backend, layout, **generate_kwargs)


def __getattr__(name: str):
    if name == "SeqparCache":
        from .hf_generate import SeqparCache
        return SeqparCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["apply", "shard_batch", "unshard", "loss", "lm_loss", "sync_grads",
           "enable_memory_savers", "disable_memory_savers", "MemorySavers", "SeqparAttention",
           "LocalBatch", "IGNORE_INDEX", "DOCUMENTS_KEY", "generate", "SeqparCache"]
