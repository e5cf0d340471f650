"""S2 patterns: hand-written golden masks, coverage, validation, and the block-skipping CPU path."""

from __future__ import annotations

import pytest
import torch

from seqpar.kernels import KERNELS, attention_reference
from seqpar.kernels.s2 import (BlockLists, S2Pattern, block_mask, coverage, dense_fraction,
                               s2_bwd_torch, s2_fwd_torch, warn_if_uncovered)
from tests.checks import assert_close, s2_rule_blocks, s2_rule_token_mask


def rows(text: str) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in line.split()[0]] for line in text.strip().splitlines()])


def test_golden_heterogeneous_two_heads():
    # vert_stride 3, local 2, Hq = 4 -> step = max(1, 3 // 4) = 1; kv head 0 residue 0
    # (stripes j = 0, 3, 6), kv head 1 residue 1 (stripes j with (j + 1) % 3 == 0: 2, 5).
    head0 = rows("""
        x.......
        xx......
        xxx.....
        x.xx....
        x..xx...
        x..xxx..
        x..x.xx.
        x..x..xx
    """)
    head1 = rows("""
        x.......
        xx......
        .xx.....
        ..xx....
        ..xxx...
        ..x.xx..
        ..x..xx.
        ..x..xxx
    """)
    mask = block_mask(S2Pattern(block_size=4, local_blocks=2, vert_stride=3), 8, [0, 1], 4)
    assert torch.equal(mask[0], head0) and torch.equal(mask[1], head1)


def test_golden_homogeneous_and_phi3_offset():
    # homogeneous: every head uses h = 0; local 1 = the diagonal only; stride 2 -> j even
    homogeneous = rows("""
        x.....
        xx....
        x.x...
        x.xx..
        x.x.x.
        x.x.xx
    """)
    mask = block_mask(S2Pattern(block_size=8, local_blocks=1, vert_stride=2, heterogeneous=False), 6, [0, 3], 2)
    assert torch.equal(mask[0], homogeneous) and torch.equal(mask[1], homogeneous)
    # Phi-3-small convention: head_offset = 1 shifts head 0 to (j + 1) % 2 == 0 -> j odd
    phi3 = rows("""
        x.....
        .x....
        .xx...
        .x.x..
        .x.xx.
        .x.x.x
    """)
    mask = block_mask(S2Pattern(block_size=8, local_blocks=1, vert_stride=2, head_offset=1), 6, [0], 8)
    assert torch.equal(mask[0], phi3)


def test_golden_larger_steps():
    # vert_stride 8, Hq = 2 -> step = 8 // 2 = 4: kv head 0 keeps j % 8 == 0, kv head 1
    # (j + 4) % 8 == 0 -> j = 4; local 1 = the diagonal only.
    head0 = rows("""
        x.......
        xx......
        x.x.....
        x..x....
        x...x...
        x....x..
        x.....x.
        x......x
    """)
    head1 = rows("""
        x.......
        .x......
        ..x.....
        ...x....
        ....x...
        ....xx..
        ....x.x.
        ....x..x
    """)
    mask = block_mask(S2Pattern(block_size=4, local_blocks=1, vert_stride=8), 8, [0, 1], 2)
    assert torch.equal(mask[0], head0) and torch.equal(mask[1], head1)
    # vert_stride 6, Hq = 3 -> step 2, head_offset 1: kv head 2 keeps (j + 4 + 1) % 6 == 0 -> j = 1
    offset = rows("""
        x......
        .x.....
        .xx....
        .x.x...
        .x..x..
        .x...x.
        .x....x
    """)
    mask = block_mask(S2Pattern(block_size=4, local_blocks=1, vert_stride=6, head_offset=1), 7, [2], 3)
    assert torch.equal(mask[0], offset)


@pytest.mark.parametrize("heterogeneous", [True, False])
def test_block_mask_follows_the_rule(heterogeneous):
    """seqpar's block_mask against the rule written in the tests, over many steps and offsets."""
    for vert_stride in (1, 2, 3, 4, 8, 16):
        for heads_q in (1, 2, 3, 4, 8):
            for local, offset in ((1, 0), (2, 1), (3, 5)):
                pattern = S2Pattern(block_size=4, local_blocks=local, vert_stride=vert_stride,
                                    heterogeneous=heterogeneous, head_offset=offset)
                heads = list(range(heads_q))
                assert torch.equal(block_mask(pattern, 12, heads, heads_q),
                                   s2_rule_blocks(pattern, 12, heads, heads_q)), pattern


def test_head_ids_are_global():
    """A rank holding global kv heads [2, 3] builds the masks of heads 2 and 3, not 0 and 1."""
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=4)
    everyone = block_mask(pattern, 8, [0, 1, 2, 3], 4)
    assert torch.equal(block_mask(pattern, 8, [2, 3], 4), everyone[2:])
    assert not torch.equal(everyone[0], everyone[2])


def test_coverage_and_warning():
    pattern = S2Pattern(block_size=16, local_blocks=1, vert_stride=4)
    assert coverage(pattern, 16, num_kv_heads=4, num_q_heads=4) == 1.0  # residues 0..3: all blocks
    with pytest.warns(UserWarning, match=r"covers only \d+\.\d% of the causal block pairs.*needs at least vert_stride=4"):
        warn_if_uncovered(pattern, 16, num_kv_heads=2, num_q_heads=4)
    assert coverage(pattern, 16, num_kv_heads=2, num_q_heads=4) < 1.0


@pytest.mark.parametrize("kwargs,message", [
    ({"block_size": 48}, r"block_size=48 is invalid; use a power of two"),
    ({"block_size": 0}, r"block_size=0 is invalid"),
    ({"vert_stride": 0}, r"vert_stride=0 is invalid; use an integer >= 1"),
    ({"local_blocks": 0}, r"local_blocks=0 is invalid"),
    ({"head_offset": -1}, r"head_offset=-1 is invalid"),
    ({"heterogeneous": "yes"}, r"heterogeneous='yes' is invalid"),
])
def test_malformed_patterns(kwargs, message):
    with pytest.raises(ValueError, match=message):
        S2Pattern(**kwargs)


def test_length_must_be_a_multiple_of_the_block():
    with pytest.raises(ValueError, match=r"sequence length 100 is not a multiple of block_size=64; pad it to 128"):
        S2Pattern(block_size=64).check_length(100)


def test_block_lists_are_the_mask_in_csr_form():
    mask = block_mask(S2Pattern(block_size=16, local_blocks=2, vert_stride=3), 7, [0, 1, 2], 3)
    lists = BlockLists.from_mask(mask, "cpu")
    for h in range(3):
        for i in range(7):
            active = lists.col_idx[h, lists.row_ptr[h, i]:lists.row_ptr[h, i + 1]].tolist()
            assert active == mask[h, i].nonzero().flatten().tolist()
        for j in range(7):
            active = lists.row_idx[h, lists.col_ptr[h, j]:lists.col_ptr[h, j + 1]].tolist()
            assert active == mask[h, :, j].nonzero().flatten().tolist()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_cpu_path_matches_masked_reference_and_skips_blocks(kernel):
    pattern = S2Pattern(block_size=4, local_blocks=2, vert_stride=3)
    batch, seq, heads_q, heads_kv, dim = 2, 32, 4, 2, 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, seq, heads_q, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, seq, heads_kv, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, seq, heads_kv, dim, generator=g, dtype=torch.float64, requires_grad=True)
    mask = block_mask(pattern, seq // 4, [0, 1], heads_q)  # what the kernel is given
    token_mask = s2_rule_token_mask(pattern, seq, heads_q, heads_kv)  # the truth: the rule
    o_ref, lse_ref = attention_reference(q, k, v, causal=True, scale=0.3, mask=token_mask)
    do, dlse = torch.randn_like(o_ref), torch.randn_like(lse_ref)
    grads = torch.autograd.grad((o_ref * do).sum() + (lse_ref * dlse).sum(), (q, k, v))
    with torch.no_grad():
        o, lse = s2_fwd_torch(q, k, v, mask, 4, 0.3, KERNELS[kernel])
        dq, dk, dv = s2_bwd_torch(do, q, k, v, o, lse, dlse, mask, 4, 0.3, KERNELS[kernel])
    for name, a, e in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), (o_ref, lse_ref, *grads)):
        assert_close(name, a, e, 1e-12)
    assert dense_fraction(mask) < 0.7  # the pattern really is sparse
