"""Malformed calls: every rank raises a clear error (type + message), none hangs, and the
group stays usable afterwards."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import seqpar


def good(seq_local=8, hq=4, hkv=2, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, seq_local, hq, d, generator=g, dtype=dtype),
            torch.randn(1, seq_local, hkv, d, generator=g, dtype=dtype),
            torch.randn(1, seq_local, hkv, d, generator=g, dtype=dtype))


def good_linear(seq_local=8, h=4, dk=8, dv=6):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, seq_local, h, dk, generator=g), torch.randn(1, seq_local, h, dk, generator=g),
            torch.randn(1, seq_local, h, dv, generator=g))


def on_rank(rank, bad, fine):
    """`bad` on one rank only, `fine` elsewhere."""
    return bad if dist.get_rank() == rank else fine


# name -> (call, expected type on every rank, regex each rank's message must match)
MALFORMED = {
    "unknown backend": (lambda: seqpar.attention(*good(), backend="flash"),
                        ValueError, r"backend='flash' is not available; choose one of \[.*'ring'.*'ulysses'"),
    "unknown layout": (lambda: seqpar.attention(*good(), layout="zig-zag"),
                       ValueError, r"layout='zig-zag' is unknown; choose one of"),
    "3-D query": (lambda: seqpar.attention(good()[0][0], *good()[1:]),
                  ValueError, r"q must be 4-D \[batch, seq_local, heads, head_dim\].*got shape \(8, 4, 8\)"),
    "integer tensors": (lambda: seqpar.attention(*(t.long() for t in good())),
                        TypeError, r"q must be a floating-point tensor, got torch.int64"),
    "mixed dtypes": (lambda: seqpar.attention(good()[0].double(), *good()[1:]),
                     TypeError, r"q, k, v must share one dtype.*cast them"),
    "heads not a multiple": (lambda: seqpar.attention(*good(hq=5, hkv=2)),
                             ValueError, r"query heads \(5\) must be a multiple of key/value heads \(2\)"),
    "k/v shapes differ": (lambda: seqpar.attention(good()[0], good()[1], good(hkv=1)[2]),
                          ValueError, r"k and v must have the same shape"),
    "q/k lengths differ": (lambda: seqpar.attention(good(seq_local=6)[0], *good()[1:]),
                           ValueError, r"q holds 6 local tokens but k/v hold 8"),
    "head dims differ": (lambda: seqpar.attention(good(d=16)[0], *good()[1:]),
                         ValueError, r"head dims differ: q.shape\[3\]=16, k.shape\[3\]=8"),
    "odd zigzag shard": (lambda: seqpar.attention(*good(seq_local=7), layout="zigzag"),
                         ValueError, r"layout='zigzag'.*local length must be even, got q.shape\[1\]=7"),
    "balanced without documents": (lambda: seqpar.attention(*good(), layout="balanced"),
                                   ValueError, r"layout='balanced' deals chunks to ranks by the "
                                               r"documents' work, so it needs cu_seqlens="),
    "balanced shard of 6": (lambda: seqpar.attention(*good(seq_local=6), layout="balanced",
                                                     cu_seqlens=torch.tensor([0, 6 * dist.get_world_size()])),
                            ValueError, r"layout='balanced' holds 4 equal chunks per rank.*got q.shape\[1\]=6"),
    "negative scale": (lambda: seqpar.attention(*good(), scale=-1.0),
                       ValueError, r"scale must be None \(1/sqrt\(head_dim\)\) or a positive finite number, got -1.0"),
    "causal not bool": (lambda: seqpar.attention(*good(), causal="yes"),
                        TypeError, r"causal must be a bool, got 'yes'"),
    "s2 pattern with ring": (lambda: seqpar.attention(*good(), s2=object()),
                             ValueError, r"s2= is only used by backend='s2'"),
    "group not a group": (lambda: seqpar.attention(*good(), group=[0, 1]),
                          TypeError, r"group: expected None, a torch.distributed.ProcessGroup or a seqpar.SPMesh, got list"),
    # linear attention (LASP-2): q/k [B, S_loc, H, Dk], v [B, S_loc, H, Dv], decay [H]
    "linear: striped layout": (lambda: seqpar.linear_attention(*good_linear(), layout="striped"),
                               ValueError, r"layout='striped' is not supported by linear_attention.*use "
                                           r"layout='contiguous' or 'zigzag'"),
    "linear: balanced layout": (lambda: seqpar.linear_attention(*good_linear(), layout="balanced"),
                                ValueError, r"layout='balanced' is not supported by linear_attention"),
    "linear: Dk mismatch": (lambda: seqpar.linear_attention(good_linear(dk=16)[0], *good_linear()[1:]),
                            ValueError, r"head dims differ: q.shape\[3\]=16, k.shape\[3\]=8"),
    "linear: v heads differ": (lambda: seqpar.linear_attention(*good_linear()[:2], good_linear(h=2)[2]),
                               ValueError, r"v must hold the same batch, local tokens and heads as q"),
    "linear: decay shape": (lambda: seqpar.linear_attention(*good_linear(), decay=torch.ones(5)),
                            ValueError, r"decay must have shape \[H\] = \[4\] \(one log-decay per head\), got \(5,\)"),
    "linear: decay 2-D": (lambda: seqpar.linear_attention(*good_linear(), decay=torch.ones(1, 4)),
                          ValueError, r"decay must have shape \[H\] = \[4\].*got \(1, 4\)"),
    "linear: negative decay": (lambda: seqpar.linear_attention(*good_linear(), decay=torch.tensor([0.1, -0.2, 0.0, 1.0])),
                               ValueError, r"log-decays s_h = -log\(lambda_h\), which must be >= 0.*got min -0.2"),
    "linear: infinite decay": (lambda: seqpar.linear_attention(*good_linear(), decay=torch.full((4,), float("inf"))),
                               ValueError, r"decay holds non-finite values"),
    "linear: integer decay": (lambda: seqpar.linear_attention(*good_linear(), decay=torch.ones(4, dtype=torch.int64)),
                              TypeError, r"decay.dtype=torch.int64 is not supported; pass log-decays as torch.float32"),
    "linear: decay needs grad": (lambda: seqpar.linear_attention(*good_linear(), decay=torch.ones(4, requires_grad=True)),
                                 ValueError, r"decay requires grad.*pass decay.detach\(\)"),
    "linear: decay not a tensor": (lambda: seqpar.linear_attention(*good_linear(), decay=[0.1] * 4),
                                   TypeError, r"decay must be None or a torch.Tensor of per-head log-decays, got list"),
    "linear: odd zigzag shard": (lambda: seqpar.linear_attention(*good_linear(seq_local=7), layout="zigzag"),
                                 ValueError, r"layout='zigzag'.*local length must be even"),
    "ulysses heads not divisible": (lambda: seqpar.attention(*good(hq=3, hkv=1), backend="ulysses"),
                                    ValueError, r"backend='ulysses' shards the 3 query heads over the 2 ranks "
                                                r"of the group, which needs heads % 2 == 0; use backend='usp'.* or backend='ring'"),
    "usp without a mesh": (lambda: seqpar.attention(*good(), backend="usp"),
                           ValueError, r"backend='usp' needs group=seqpar.SPMesh\(group, ulysses=U\).*got a plain process group"),
    "usp heads not divisible by U": (lambda: seqpar.attention(*good(hq=3, hkv=1), seqpar.SPMesh(ulysses=2), backend="usp"),
                                     ValueError, r"backend='usp' shards the 3 query heads over ulysses=2 ranks of the mesh"),
    # masks (DESIGN §2): good() is B=1, S_loc=8, Hq=4 on 2 ranks, so S = 16
    "cu_seqlens not from 0": (lambda: seqpar.attention(*good(), cu_seqlens=torch.tensor([1, 5, 16])),
                              ValueError, r"cu_seqlens must start at 0, got cu_seqlens\[0\]=1"),
    "cu_seqlens not to S": (lambda: seqpar.attention(*good(), cu_seqlens=torch.tensor([0, 5, 8])),
                            ValueError, r"cu_seqlens must end at the global sequence length S = 16.*got cu_seqlens\[-1\]=8"),
    "cu_seqlens not increasing": (lambda: seqpar.attention(*good(), cu_seqlens=torch.tensor([0, 5, 5, 16])),
                                  ValueError, r"cu_seqlens must be strictly increasing .*cu_seqlens\[2\]=5 <= cu_seqlens\[1\]=5"),
    "cu_seqlens float": (lambda: seqpar.attention(*good(), cu_seqlens=torch.tensor([0.0, 16.0])),
                         TypeError, r"cu_seqlens.dtype=torch.float32 is not supported; pass the document boundaries as torch.int32 or torch.int64"),
    "cu_seqlens 2-D": (lambda: seqpar.attention(*good(), cu_seqlens=torch.tensor([[0, 16]])),
                       ValueError, r"cu_seqlens must be 1-D \[n_docs \+ 1\].*got shape \(1, 2\)"),
    "cu_seqlens with B > 1": (lambda: seqpar.attention(*(t.expand(2, -1, -1, -1) for t in good()), cu_seqlens=torch.tensor([0, 16])),
                              ValueError, r"cu_seqlens packs documents into one sequence, which needs batch size 1, got batch size 2"),
    "cu_seqlens a list": (lambda: seqpar.attention(*good(), cu_seqlens=[0, 16]),
                          TypeError, r"cu_seqlens must be None or a 1-D integer torch.Tensor"),
    "window 0": (lambda: seqpar.attention(*good(), window=0),
                 ValueError, r"window must be >= 1.*got 0"),
    "window float": (lambda: seqpar.attention(*good(), window=2.5),
                     TypeError, r"window must be None or an int W >= 1.*got 2.5"),
    "window bool": (lambda: seqpar.attention(*good(), window=True),
                    TypeError, r"window must be None or an int W >= 1.*got True"),
    "softcap 0": (lambda: seqpar.attention(*good(), softcap=0.0),
                  ValueError, r"softcap must be a positive finite number.*got 0.0"),
    "softcap negative": (lambda: seqpar.attention(*good(), softcap=-3),
                         ValueError, r"softcap must be a positive finite number.*got -3"),
    "softcap a string": (lambda: seqpar.attention(*good(), softcap="30"),
                         TypeError, r"softcap must be None or a positive number, got '30'"),
    "sinks wrong shape": (lambda: seqpar.attention(*good(), sinks=torch.zeros(2)),
                          ValueError, r"sinks must have shape \[Hq\] = \[4\].*got \(2,\)"),
    "sinks integer": (lambda: seqpar.attention(*good(), sinks=torch.zeros(4, dtype=torch.int64)),
                      TypeError, r"sinks.dtype=torch.int64 is not supported"),
    "sinks wrong device": (lambda: seqpar.attention(*good(), sinks=torch.zeros(4, device="meta")),
                           ValueError, r"sinks is on meta but q is on cpu"),
    "s2 with a window": (lambda: seqpar.attention(*good(), backend="s2", s2=seqpar.S2Pattern(block_size=8), window=4),
                         ValueError, r"backend='s2' does not take cu_seqlens, window, softcap or sinks"),
}

# Bad on one rank only: that rank raises its own error, the others a ValueError naming it.
ONE_RANK_BAD = {
    "local lengths differ": (lambda: seqpar.attention(*good(seq_local=on_rank(1, 6, 8)), layout="contiguous"),
                             {0: (ValueError, r"local sequence length differs across ranks \(this rank: 8, min: 6, max: 8\)"),
                              1: (ValueError, r"local sequence length differs across ranks \(this rank: 6, min: 6, max: 8\)")}),
    "dtype differs": (lambda: seqpar.attention(*good(dtype=on_rank(0, torch.float64, torch.float32))),
                      {0: (ValueError, r"dtype differs across ranks"), 1: (ValueError, r"dtype differs across ranks")}),
    "heads differ": (lambda: seqpar.attention(*good(hq=on_rank(1, 8, 4))),
                     {0: (ValueError, r"query heads differs across ranks"), 1: (ValueError, r"query heads differs")}),
    "bad tensor on rank 1 only": (lambda: seqpar.attention(*good(d=on_rank(1, 3, 8))[:2], good()[2]),
                                  {0: (ValueError, r"rank 1 of the group rejected its arguments"),
                                   1: (ValueError, r"k and v must have the same shape")}),
    "causal differs": (lambda: seqpar.attention(*good(), causal=on_rank(0, False, True)),
                       {0: (ValueError, r"causal differs across ranks"), 1: (ValueError, r"causal differs")}),
    "linear: decay values differ": (
        lambda: seqpar.linear_attention(*good_linear(), decay=torch.full((4,), on_rank(1, 0.2, 0.1))),
        {0: (ValueError, r"decay differs across ranks"), 1: (ValueError, r"decay differs across ranks")}),
    "linear: decay on one rank only": (
        lambda: seqpar.linear_attention(*good_linear(), decay=on_rank(0, torch.zeros(4), None)),
        {0: (ValueError, r"decay \(None or a tensor\) differs across ranks"),
             1: (ValueError, r"decay \(None or a tensor\) differs")}),
    "linear: decay negative on rank 1 only": (
        lambda: seqpar.linear_attention(*good_linear(), decay=torch.full((4,), on_rank(1, -1.0, 1.0))),
        {0: (ValueError, r"seqpar.linear_attention: rank 1 of the group rejected its arguments"),
         1: (ValueError, r"must be >= 0")}),
    "return_lse differs": (lambda: seqpar.attention(*good(), backend="ulysses", return_lse=on_rank(1, True, False)),
                           {0: (ValueError, r"return_lse differs across ranks"), 1: (ValueError, r"return_lse differs")}),
    "cu_seqlens differ": (lambda: seqpar.attention(*good(), cu_seqlens=torch.tensor([0, on_rank(1, 5, 6), 16])),
                          {0: (ValueError, r"cu_seqlens boundaries \(fingerprint\) differs across ranks"), 1: (ValueError, r"cu_seqlens boundaries \(fingerprint\) differs across ranks")}),
    "cu_seqlens lengths differ": (lambda: seqpar.attention(*good(), cu_seqlens=torch.tensor(on_rank(0, [0, 3, 16], [0, 16]))),
                                  {0: (ValueError, r"number of documents in cu_seqlens differs across ranks"),
                                   1: (ValueError, r"number of documents in cu_seqlens differs")}),
    "window on one rank only": (lambda: seqpar.attention(*good(), window=on_rank(1, 4, None)),
                                {0: (ValueError, r"window differs across ranks"), 1: (ValueError, r"window differs across ranks")}),
    "softcap differs": (lambda: seqpar.attention(*good(), softcap=on_rank(0, 30.0, 50.0)),
                        {0: (ValueError, r"softcap differs across ranks"), 1: (ValueError, r"softcap differs")}),
    "sinks on one rank only": (lambda: seqpar.attention(*good(), sinks=on_rank(0, torch.zeros(4), None)),
                               {0: (ValueError, r"sinks \(None or a tensor\) differs across ranks"),
                                1: (ValueError, r"sinks \(None or a tensor\) differs")}),
    "cu_seqlens bad on rank 1 only": (lambda: seqpar.attention(*good(), cu_seqlens=torch.tensor(on_rank(1, [0, 9, 7, 16], [0, 9, 16]))),
                                      {0: (ValueError, r"rank 1 of the group rejected its arguments"),
                                       1: (ValueError, r"cu_seqlens must be strictly increasing")}),
    "mesh on one rank only": (lambda: seqpar.attention(*good(), on_rank(0, seqpar.SPMesh(ulysses=2), None), backend="ulysses"),
                              {0: (ValueError, r"SPMesh ulysses degree differs across ranks"),
                               1: (ValueError, r"SPMesh ulysses degree differs across ranks")}),
}


def raise_and_recover(name: str, table: str):
    """Run one malformed call; return (exception type, message); then prove the group works."""
    call = (MALFORMED if table == "all" else ONE_RANK_BAD)[name][0]
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        caught = (type(error).__name__, str(error))
    else:
        caught = ("nothing raised", "")
    q, k, v = good()
    seqpar.attention(q, k, v)  # the group is not left desynchronised
    return caught


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_call_raises_on_every_rank(worlds, name):
    _, kind, pattern = MALFORMED[name]
    for rank, (type_name, message) in enumerate(worlds(2).run(raise_and_recover, name, "all", timeout=60)):
        assert type_name == kind.__name__, f"rank {rank}: {type_name}: {message}"
        assert message.startswith(("seqpar.attention: ", "seqpar.linear_attention: ")) or "group:" in message, message
        assert re.search(pattern, message), f"rank {rank}: {message!r} !~ {pattern!r}"


@pytest.mark.parametrize("name", list(ONE_RANK_BAD))
def test_cross_rank_mismatch_raises_on_every_rank(worlds, name):
    expected = ONE_RANK_BAD[name][1]
    for rank, (type_name, message) in enumerate(worlds(2).run(raise_and_recover, name, "one", timeout=60)):
        kind, pattern = expected[rank]
        assert type_name == kind.__name__, f"rank {rank}: {type_name}: {message}"
        assert re.search(pattern, message), f"rank {rank}: {message!r} !~ {pattern!r}"


def test_single_process_errors_need_no_group():
    with pytest.raises(ValueError, match=r"seqpar.attention: backend='flash' is not available"):
        seqpar.attention(*good(), backend="flash")
    with pytest.raises(ValueError, match=r"seqpar.attention: backend='usp' needs group=seqpar.SPMesh"):
        seqpar.attention(*good(), backend="usp")
    with pytest.raises(ValueError, match=r"seqpar.linear_attention: layout='striped' is not supported"):
        seqpar.linear_attention(*good_linear(), layout="striped")
