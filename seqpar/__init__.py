"""seqpar: sequence-parallel attention for PyTorch.

    import seqpar
    q, k, v = (seqpar.shard(t, group, dim=1, layout="zigzag") for t in (q_full, k_full, v_full))
    o = seqpar.attention(q, k, v, group, backend="ring", causal=True, layout="zigzag")
    o_full = seqpar.gather(o, group, dim=1, layout="zigzag")
    o_lin = seqpar.linear_attention(q, k, v, group, decay=log_decays, layout="zigzag")  # LASP-2
"""

__version__ = "0.1.0"

from .api import BACKENDS, attention, linear_attention
from .comm.primitives import CommStats, comm_stats
from .layout import LAYOUTS, gather, positions, shard
from .kernels.s2 import S2Pattern
from .mesh import SPMesh

__all__ = ["attention", "linear_attention", "shard", "gather", "positions", "comm_stats",
           "CommStats", "BACKENDS", "LAYOUTS", "SPMesh", "S2Pattern", "__version__"]
