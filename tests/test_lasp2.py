"""LASP-2 linear attention vs the float64 reference on every rank: o, dq, dk, dv; byte counts;
packed documents (cu_seqlens) and their bad inputs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import seqpar
from tests.linear_cases import LinearCase, lasp2_bytes, run_linear_case, state_bytes

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


def test_states_travel_while_the_local_kernel_runs(monkeypatch, cu_seqlens=None):
    """Forward and backward each post exactly one collective before the intra-chunk kernel
    runs and wait for it only afterwards (the overlap), on the plain lasp2_fwd / lasp2_bwd.
    Causal: the chunked kernel's exchanged passes post after computing the blocks' states and
    run (at least) the first span's intra-block products before waiting; non-causal: the whole
    intra-chunk pass runs in between."""
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

        def _intra(self, *args, **kwargs):  # the intra-block product of one span, forward
            events.append("kernel fwd")
            return super()._intra(*args, **kwargs)

        def _intra_grads(self, *args, **kwargs):  # ... and backward
            events.append("kernel bwd")
            return super()._intra_grads(*args, **kwargs)

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
                                     True, 0.5, RecordingKernel(), (), cu_seqlens)
        _, states = lasp2.lasp2_fwd(q, k, v, decay, plan)
        lasp2.lasp2_bwd(do, q, k, v, decay, states, plan)
        # Per pass: post, then kernel work, then the wait (more kernel work may follow it).
        assert events.count("wait") == 2 and sum(e.startswith("start") for e in events) == 2
        backward = events.index("start lasp2.bwd")
        for first, name in ((0, "fwd"), (backward, "bwd")):
            wait = events.index("wait", first)
            assert events[first] == f"start lasp2.{name}", events
            assert f"kernel {name}" in events[first:wait], events
        assert backward > events.index("wait"), events


# ---------------------------------------------------------------- packed documents (cu_seqlens)

def document_patterns(seq: int, chunk: int) -> dict[str, tuple[int, ...]]:
    """Global boundaries of a sequence of `seq` tokens in LASP-2 chunks of `chunk`:
    * ones-and-long: documents of 1 token at both ends, and one spanning every rank between;
    * edges: every document starts exactly at a chunk (= rank or zigzag half) boundary, some
      documents spanning two chunks;
    * inside: starts inside chunks, a 1-token document, one crossing a chunk edge."""
    inside = {3, 4, chunk + 2, 2 * chunk - 1, seq - chunk + 1, seq - 2}
    return {
        "ones-and-long": tuple(sorted({0, 1, 2, max(2, seq - 1), seq})),
        "edges": tuple(sorted(({0, *range(chunk, seq, chunk)} - set(range(3 * chunk, seq, 3 * chunk)))
                              | {seq})),
        "inside": tuple(sorted({0, seq} | {x for x in inside if 0 < x < seq})),
        "alternate": tuple(range(0, seq, 2)) + (seq,),  # documents of 2 tokens (1 at the end)
    }


def check_lasp2_documents(layout: str, causal: bool, decay: str, pattern: str,
                          seq_local: int = 8, dtype: torch.dtype = torch.float64) -> None:
    world = dist.get_world_size()
    chunk = seq_local // (2 if layout == "zigzag" else 1)
    documents = document_patterns(seq_local * world, chunk)[pattern]
    case = LinearCase(layout=layout, causal=causal, decay=decay, seq_local=seq_local,
                      dtype=dtype, cu_seqlens=documents)
    errors = check_lasp2(case)
    # The hand formula: one all-gather each way of one d x e state per local chunk and direction
    # (non-causal: prefix and suffix, decayed or not) -- the same tensors as without documents.
    n_loc = 2 if layout == "zigzag" else 1
    expected = (world - 1) * n_loc * (1 if causal else 2) * state_bytes(case)
    assert errors["bytes_fwd"] == errors["bytes_bwd"] == expected, (errors, expected)
    assert errors["messages"] == [world - 1, world - 1], errors  # one all-gather per pass


@pytest.mark.parametrize("pattern", ["ones-and-long", "edges", "inside"])
@pytest.mark.parametrize("decay", ["none", "mild"])
@pytest.mark.parametrize("layout", LINEAR_LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_lasp2_documents_fp64(worlds, world, layout, decay, pattern):
    """Causal, fp64: o, dq, dk, dv on every rank equal the reference with documents."""
    worlds(world).run(check_lasp2_documents, layout, True, decay, pattern)


@pytest.mark.parametrize("pattern", ["ones-and-long", "inside"])
@pytest.mark.parametrize("decay", ["none", "strong"])
@pytest.mark.parametrize("layout", LINEAR_LAYOUTS)
@pytest.mark.parametrize("world", [2, 3])
def test_lasp2_documents_non_causal(worlds, world, layout, decay, pattern):
    """Each document sees its whole self: prefix and suffix states, both cut at boundaries."""
    worlds(world).run(check_lasp2_documents, layout, False, decay, pattern)


@pytest.mark.parametrize("layout", LINEAR_LAYOUTS)
def test_lasp2_documents_fp32_many_kernel_blocks(worlds, layout):
    """fp32, 150 tokens a rank: chunks cross several (ragged) kernel blocks of 64."""
    worlds(4).run(check_lasp2_documents, layout, True, "mild", "inside", 150, torch.float32)


@pytest.mark.parametrize("layout,causal,decay,seq_local", [
    ("contiguous", True, "none", 1),   # 1 token a rank: every chunk a document edge or inside one
    ("zigzag", False, "mild", 2),      # 1-token chunks, non-causal
    ("zigzag", True, "extreme", 6),    # odd chunks of 3; one head's decay underflows to 0
], ids=str)
@pytest.mark.parametrize("world", [3])
def test_lasp2_documents_tiny_chunks(worlds, world, layout, causal, decay, seq_local):
    worlds(world).run(check_lasp2_documents, layout, causal, decay, "alternate", seq_local)


def documents_are_not_ignored() -> bool:
    """The comparison fails if the documents were dropped (reference without them) or cut one
    token off (a boundary moved)."""
    case = LinearCase(layout="zigzag", decay="mild", cu_seqlens=(0, 5, 11, 16))
    run_linear_case(case)  # the right one passes
    caught = 0
    for wrong in (None, (0, 5, 12, 16)):
        try:
            run_linear_case(case, reference_cu_seqlens=wrong)
        except AssertionError:
            caught += 1
    return caught == 2


def test_comparison_rejects_ignored_documents(worlds):
    assert worlds(2).run(documents_are_not_ignored) == [True, True]


def test_states_travel_while_the_local_kernel_runs_with_documents(monkeypatch):
    """Documents add no collective: still one all-gather each way, posted before the kernel."""
    test_states_travel_while_the_local_kernel_runs(monkeypatch, torch.tensor([0, 1, 4, 5, 8]))


def _linear_inputs(seq_local=8, batch=1):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, seq_local, 2, 4, generator=g) for _ in range(3)]


def _on_rank(rank, bad, fine):
    return bad if dist.get_rank() == rank else fine


# name -> (cu_seqlens for S = 16 on 2 ranks, or a callable of the rank; batch; error on every rank)
BAD_DOCUMENTS = {
    "not starting at 0": ([2, 9, 16], 1, ValueError, r"cu_seqlens must start at 0, got cu_seqlens\[0\]=2"),
    "not ending at S": ([0, 9, 12], 1, ValueError,
                        r"cu_seqlens must end at the global sequence length S = 16 .*got cu_seqlens\[-1\]=12"),
    "not increasing": ([0, 9, 9, 16], 1, ValueError,
                       r"cu_seqlens must be strictly increasing .*cu_seqlens\[2\]=9 <= cu_seqlens\[1\]=9"),
    "decreasing": ([0, 9, 4, 16], 1, ValueError, r"strictly increasing"),
    "float dtype": ([0.0, 9.0, 16.0], 1, TypeError,
                    r"cu_seqlens.dtype=torch.float32 is not supported; pass the document boundaries as torch.int32"),
    "2-D": ([[0, 9, 16]], 1, ValueError, r"cu_seqlens must be 1-D \[n_docs \+ 1\].*got shape \(1, 3\)"),
    "batch > 1": ([0, 9, 16], 2, ValueError, r"needs batch size 1, got batch size 2"),
    "not a tensor": ("list", 1, TypeError, r"cu_seqlens must be None or a 1-D integer torch.Tensor.*got list"),
    "different on different ranks": ("differ", 1, ValueError,
                                     r"cu_seqlens boundaries \(fingerprint\) differs across ranks"),
    "documents on one rank only": ("one-rank", 1, ValueError,
                                   r"cu_seqlens \(None or a tensor\) differs across ranks"),
    "bad on rank 1 only": ("bad-on-1", 1, ValueError,
                           {0: r"rank 1 of the group rejected its arguments",
                            1: r"cu_seqlens must end at the global sequence length S = 16"}),
}


def call_with_bad_documents(name: str) -> tuple[str, str]:
    value, batch, _, _ = BAD_DOCUMENTS[name]
    if value == "list":
        cu = [0, 9, 16]
    elif value == "differ":
        cu = torch.tensor(_on_rank(1, [0, 7, 16], [0, 9, 16]))
    elif value == "one-rank":
        cu = _on_rank(0, torch.tensor([0, 9, 16]), None)
    elif value == "bad-on-1":
        cu = torch.tensor(_on_rank(1, [0, 9, 17], [0, 9, 16]))
    else:
        cu = torch.tensor(value)
    try:
        seqpar.linear_attention(*_linear_inputs(batch=batch), cu_seqlens=cu)
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        caught = (type(error).__name__, str(error))
    else:
        caught = ("nothing raised", "")
    seqpar.linear_attention(*_linear_inputs(), cu_seqlens=torch.tensor([0, 9, 16]))  # group usable
    return caught


@pytest.mark.parametrize("name", list(BAD_DOCUMENTS))
def test_bad_documents_raise_on_every_rank(worlds, name):
    """Each a clear error on both ranks of 2 (none hangs), and the group stays usable."""
    _, _, kind, patterns = BAD_DOCUMENTS[name]
    results = worlds(2).run(call_with_bad_documents, name, timeout=60)
    for rank, (type_name, message) in enumerate(results):
        pattern = patterns[rank] if isinstance(patterns, dict) else patterns
        assert message.startswith("seqpar.linear_attention: "), (rank, type_name, message)
        assert type_name == kind.__name__, (rank, type_name, message)
        assert re.search(pattern, message), (rank, message, pattern)
