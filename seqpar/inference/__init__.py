"""Long-context inference over a sharded KV cache (sequence-parallel prefill and decode).

    from seqpar import inference
    cache = inference.ShardedKVCache(group, layout="zigzag")
    o = inference.prefill(q_loc, k_loc, v_loc, cache, layer, backend="ring")   # prompt shards
    o = inference.decode(q_new, k_new, v_new, cache, layer)   # T new tokens, same on every rank
    o = inference.partial_prefill(q_turn, k_turn, v_turn, cache, layer)   # a new turn, sharded
    print(inference.explain(q_turn, k_turn, cache, layer))    # why pass-KV or pass-Q

Files: `cache.py` the sharded cache and its balance rule, `prefill.py` prompt prefill through
`seqpar.attention`, `partial_prefill.py` a new turn by pass-KV or pass-Q (the cost model
picks), `local.py` one shard's partial attention, `merge.py` the one collective of a decode
step (and sinks), `decode.py` decode, `checks.py` the argument checks.
"""

from .cache import LayerShard, ShardedKVCache
from .decode import decode, decode_bytes_per_peer
from .local import shard_attention
from .merge import apply_sinks, merge_across_ranks
from .partial_prefill import explain, partial_prefill
from .prefill import prefill

__all__ = ["ShardedKVCache", "LayerShard", "prefill", "partial_prefill", "explain", "decode",
           "decode_bytes_per_peer", "shard_attention", "merge_across_ranks", "apply_sinks"]
