"""LASP-2 linear attention vs the float64 reference on every rank: o, dq, dk, dv; byte counts."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.linear_cases import LinearCase, lasp2_bytes, run_linear_case

LINEAR_LAYOUTS = ("contiguous", "zigzag")


def check_lasp2(case: LinearCase) -> dict:
    errors = run_linear_case(case)
    expected = lasp2_bytes(case, dist.get_world_size())
    assert errors["bytes_fwd"] == expected, (errors["bytes_fwd"], expected)
    assert errors["bytes_bwd"] == expected, (errors["bytes_bwd"], expected)
    return errors


@pytest.mark.parametrize("decay", ["none", "mild", "strong"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LINEAR_LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lasp2_fp64_is_exact(worlds, world, layout, causal, decay):
    """Dk != Dv, two heads; zigzag chunks of 4 tokens, contiguous of 8."""
    case = LinearCase(layout=layout, causal=causal, decay=decay, seq_local=8, batch=2)
    worlds(world).run(check_lasp2, case)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LINEAR_LAYOUTS)
@pytest.mark.parametrize("world", [2, 4])
def test_lasp2_fp32(worlds, world, layout, causal):
    case = LinearCase(layout=layout, causal=causal, decay="mild", heads=3, key_dim=16,
                      value_dim=8, seq_local=24, dtype=torch.float32)
    worlds(world).run(check_lasp2, case)


@pytest.mark.parametrize("case", [
    LinearCase(layout="contiguous", seq_local=1, heads=1, key_dim=3, value_dim=5),   # 1 token/rank
    LinearCase(layout="zigzag", seq_local=2, causal=False, decay="mild"),           # 1-token chunks
    LinearCase(layout="zigzag", batch=3, decay="extreme", heads=2, scale=0.05),     # underflow to 0
    LinearCase(layout="contiguous", causal=False, decay="extreme", seq_local=10),
    LinearCase(layout="contiguous", causal=False, decay="zero"),                    # decayed path, lambda=1
    LinearCase(layout="zigzag", seq_local=150, decay="strong", key_dim=4, value_dim=3),  # ragged kernel blocks
    LinearCase(layout="contiguous", seq_local=130, causal=False, decay="mild", heads=1),
], ids=str)
@pytest.mark.parametrize("world", [2, 3])
def test_lasp2_odd_shapes(worlds, world, case):
    worlds(world).run(check_lasp2, case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LINEAR_LAYOUTS)
def test_lasp2_low_precision(worlds, layout, causal, dtype):
    case = LinearCase(layout=layout, causal=causal, decay="mild", heads=4, key_dim=16,
                      value_dim=16, seq_local=32, dtype=dtype)
    worlds(4).run(check_lasp2, case)


def bytes_for_lengths(layout: str, causal: bool, decay: str) -> list[tuple[int, int]]:
    sent = []
    for seq_local in (8, 32):
        errors = run_linear_case(LinearCase(layout=layout, causal=causal, decay=decay,
                                            seq_local=seq_local, dtype=torch.float32))
        sent.append((errors["bytes_fwd"], errors["bytes_bwd"]))
    return sent


@pytest.mark.parametrize("causal,decay", [(True, "mild"), (False, "mild"), (False, "none")],
                         ids=["causal", "full-decay", "full-summed"])
@pytest.mark.parametrize("layout", LINEAR_LAYOUTS)
def test_bytes_do_not_grow_with_the_sequence(worlds, layout, causal, decay):
    """S grows 4x; every rank sends exactly the same bytes, the documented formula."""
    expected = lasp2_bytes(LinearCase(layout=layout, causal=causal, decay=decay,
                                      dtype=torch.float32), 4)
    for per_rank in worlds(4).run(bytes_for_lengths, layout, causal, decay):
        assert per_rank == [(expected, expected)] * 2


def wrong_result_is_caught() -> bool:
    """The comparison must fail on a slightly wrong result (5% off in scale)."""
    run_linear_case(LinearCase(decay="mild"))  # the right one passes
    try:
        run_linear_case(LinearCase(decay="mild", scale=0.25 * 1.05), reference_scale=0.25)
    except AssertionError:
        return True
    return False


def test_comparison_rejects_a_wrong_result(worlds):
    assert worlds(2).run(wrong_result_is_caught) == [True, True]


def check_lasp2_on_a_subgroup() -> None:
    """LASP-2 over ranks {1, 2, 3} of 4: group-local chunk order, the gather on that group."""
    sub = dist.new_group([1, 2, 3])
    if dist.get_rank() in (1, 2, 3):
        run_linear_case(LinearCase(layout="zigzag", decay="strong"), group=sub)
    dist.barrier()


def test_lasp2_on_a_subgroup(worlds):
    worlds(4).run(check_lasp2_on_a_subgroup)


def test_states_travel_while_the_local_kernel_runs(monkeypatch):
    """Forward and backward each post exactly one collective before the intra-chunk kernel
    runs and wait for it only afterwards (the overlap), on the plain lasp2_fwd / lasp2_bwd."""
    from seqpar.comm import lasp2
    from seqpar.comm.primitives import GroupInfo, PendingCollective
    from seqpar.kernels import ChunkedLinearKernel
    from seqpar.layout import all_local_runs

    events = []

    class RecordingKernel(ChunkedLinearKernel):
        def intra_fwd(self, *args, **kwargs):
            events.append("kernel fwd")
            return super().intra_fwd(*args, **kwargs)

        def intra_bwd(self, *args, **kwargs):
            events.append("kernel bwd")
            return super().intra_bwd(*args, **kwargs)

    class RecordingPending(PendingCollective):
        def wait(self):
            events.append("wait")
            return super().wait()

    def start(x, info, traffic):
        events.append(f"start {traffic.op}")
        return RecordingPending(None, x.unsqueeze(0))

    monkeypatch.setattr(lasp2, "start_all_gather", start)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 8, 2, 4, generator=g, dtype=torch.float64) for _ in range(4))
    decay = torch.tensor([0.1, 0.5], dtype=torch.float64)
    for causal in (True, False):
        events.clear()
        plan = lasp2.Lasp2Plan.build(GroupInfo(None, 0, 1), all_local_runs(8, 1, "zigzag"), causal,
                                     True, 0.5, RecordingKernel(), ())
        _, states = lasp2.lasp2_fwd(q, k, v, decay, plan)
        lasp2.lasp2_bwd(do, q, k, v, decay, states, plan)
        assert events == ["start lasp2.fwd", "kernel fwd", "wait",
                          "start lasp2.bwd", "kernel bwd", "wait"], events
