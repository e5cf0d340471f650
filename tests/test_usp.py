"""USP (Ulysses x ring over a seqpar.SPMesh) vs the float64 reference on every rank, its bytes
(all-to-all part and ring part separately), and the mesh itself."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.layout import LAYOUTS
from seqpar.cost.traffic import usp_volume
from tests.attention_cases import AttnCase, problem_of, run_case

# Meshes live in the rank processes for the whole session: building one is collective and
# creates process groups, so each (group size, U) is built once per world.
_MESHES: dict[int, seqpar.SPMesh] = {}


def mesh(ulysses: int) -> seqpar.SPMesh:
    if ulysses not in _MESHES:
        _MESHES[ulysses] = seqpar.SPMesh(ulysses=ulysses)
    return _MESHES[ulysses]


def usp_bytes(case: AttnCase, ulysses: int, rings: int) -> dict[str, int]:
    """The documented traffic (`seqpar.cost.traffic.usp_volume`): Ulysses all-to-alls over U
    ranks, and the ring over R ranks on blocks of U * S_loc tokens with the n K/V heads each
    rank holds after the all-to-all."""
    problem = problem_of(case, ulysses * rings, ulysses=ulysses, return_lse=True)
    return {op: volume.bytes for op, volume in usp_volume(problem).items()}


def check_usp(case: AttnCase, ulysses: int) -> dict:
    the_mesh = mesh(ulysses)
    with seqpar.comm_stats() as stats:
        errors = run_case(case, group=the_mesh)
    rings = dist.get_world_size() // ulysses
    expected = usp_bytes(case, ulysses, rings)
    measured = {op: stats.sent(op) for op in expected}
    assert measured == expected, (measured, expected)
    assert errors["bytes_fwd"] == expected["usp.fwd.all_to_all"] + expected["usp.fwd.ring"]
    return errors


@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa8:2"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ulysses", [1, 2, 4], ids=["U1xR4", "U2xR2", "U4xR1"])
def test_usp_four_ranks(worlds, ulysses, layout, causal, heads):
    case = AttnCase(backend="usp", layout=layout, causal=causal, heads_q=heads[0],
                    heads_kv=heads[1], seq_local=12, head_dim=16, lse_grad=causal)
    worlds(4).run(check_usp, case, ulysses)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ulysses", [1, 2], ids=["U1xR2", "U2xR1"])
def test_usp_two_ranks(worlds, ulysses, layout):
    case = AttnCase(backend="usp", layout=layout, heads_q=4, heads_kv=2, seq_local=10)
    worlds(2).run(check_usp, case, ulysses)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("ulysses", [1, 3], ids=["U1xR3", "U3xR1"])
def test_usp_three_ranks(worlds, ulysses, layout):
    case = AttnCase(backend="usp", layout=layout, heads_q=6, heads_kv=2, seq_local=8)
    worlds(3).run(check_usp, case, ulysses)


@pytest.mark.parametrize("heads", [(4, 1), (6, 3), (8, 4)], ids=["replicated", "uneven", "split"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_usp_fp64_is_exact(worlds, layout, heads):
    """U=2, R=2 in float64, with every K/V-head path of the Ulysses part, B=2."""
    case = AttnCase(backend="usp", layout=layout, dtype=torch.float64, heads_q=heads[0],
                    heads_kv=heads[1], seq_local=10, head_dim=8, batch=2)
    worlds(4).run(check_usp, case, 2)


@pytest.mark.parametrize("case", [
    AttnCase(backend="usp", layout="zigzag", head_dim=40, seq_local=2, heads_q=4, heads_kv=2),
    AttnCase(backend="usp", layout="striped", head_dim=40, seq_local=1, heads_q=2, heads_kv=1),
    AttnCase(backend="usp", layout="zigzag", seq_local=14, kernel="chunked", heads_q=8, heads_kv=2),
    AttnCase(backend="usp", layout="striped", dtype=torch.bfloat16, heads_q=8, heads_kv=2,
             seq_local=32, head_dim=32),
], ids=str)
def test_usp_odd_shapes_and_bf16(worlds, case):
    worlds(4).run(check_usp, case, 2)


def mesh_structure(ulysses: int) -> tuple:
    m = mesh(ulysses)
    def members(info):
        if info.group is None:
            return [dist.get_rank()]
        return sorted(dist.get_process_group_ranks(info.group))
    return (m.ulysses_size, m.ring_size, members(m.ulysses), members(m.ring),
            m.get_group("sp") is m.group)


@pytest.mark.parametrize("ulysses, ulysses_groups, ring_groups", [
    (2, [[0, 1], [0, 1], [2, 3], [2, 3]], [[0, 2], [1, 3], [0, 2], [1, 3]]),
    (4, [[0, 1, 2, 3]] * 4, [[0], [1], [2], [3]]),
    (1, [[0], [1], [2], [3]], [[0, 1, 2, 3]] * 4),
])
def test_mesh_groups(worlds, ulysses, ulysses_groups, ring_groups):
    """Ulysses groups are consecutive ranks, ring groups strided; one-rank dimensions have no
    process group, whole-group ones reuse the group."""
    results = worlds(4).run(mesh_structure, ulysses)
    assert [r[2] for r in results] == ulysses_groups
    assert [r[3] for r in results] == ring_groups
    assert all(r[:2] == (ulysses, 4 // ulysses) and r[4] for r in results)


def mesh_on_a_subgroup() -> None:
    """A mesh over ranks {1, 2, 3} of 4 (U=3: plain Ulysses inside) works on its members only."""
    sub = dist.new_group([1, 2, 3])
    if dist.get_rank() in (1, 2, 3):
        run_case(AttnCase(backend="usp", layout="zigzag", heads_q=6, heads_kv=3),
                 group=seqpar.SPMesh(sub, ulysses=3))
    dist.barrier()


def test_usp_on_a_subgroup(worlds):
    worlds(4).run(mesh_on_a_subgroup)


def mesh_after_a_partial_subgroup() -> None:
    """Some ranks hold a process group the others do not (here {1, 2}): a new mesh over WORLD
    must still build (torch names locally synchronised groups by each rank's group count, which
    now differs between ranks -- the mesh must not rely on it) and compute exactly."""
    dist.new_group([1, 2])
    run_case(AttnCase(backend="usp", layout="zigzag", heads_q=4, heads_kv=2),
             group=seqpar.SPMesh(ulysses=2))


def test_mesh_after_a_partial_subgroup(worlds):
    worlds(4).run(mesh_after_a_partial_subgroup, timeout=60)


def bad_mesh(ulysses_by_rank: dict) -> tuple[str, str]:
    try:
        seqpar.SPMesh(ulysses=ulysses_by_rank.get(dist.get_rank(), ulysses_by_rank["default"]))
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        return type(error).__name__, str(error)
    return "nothing raised", ""


@pytest.mark.parametrize("ulysses_by_rank, expected", [
    ({"default": 3}, {0: ("ValueError", r"ulysses=3 must divide the group size 4 .*\[1, 2, 4\]"),
                      1: ("ValueError", r"ulysses=3 must divide the group size 4")}),
    ({"default": 2.0}, {0: ("TypeError", r"ulysses must be an int"),
                        1: ("TypeError", r"ulysses must be an int")}),
    ({"default": 2, 1: 4}, {0: ("ValueError", r"ulysses differs across ranks"),
                            1: ("ValueError", r"ulysses differs across ranks")}),
    ({"default": 2, 3: 0}, {0: ("ValueError", r"rank 3 of the group rejected its arguments"),
                            3: ("ValueError", r"ulysses=0 must divide")}),
], ids=["not-a-divisor", "not-an-int", "differs", "bad-on-one-rank"])
def test_bad_mesh_raises_on_every_rank(worlds, ulysses_by_rank, expected):
    results = worlds(4).run(bad_mesh, ulysses_by_rank, timeout=60)
    for rank, (kind, pattern) in expected.items():
        assert results[rank][0] == kind, results[rank]
        assert results[rank][1].startswith("seqpar.SPMesh: "), results[rank]
        assert re.search(pattern, results[rank][1]), results[rank]
