"""SPMesh with a data-parallel axis: D sequence-parallel groups of P ranks side by side.

Each group computes attention over its own sequence (seed = its data-parallel index) and every
rank's output, lse and gradients match the float64 reference of that sequence; the bytes each
rank sends are the formula for P ranks (nothing crosses between the groups). The groups
themselves, named axes and malformed meshes (raising on every rank) are checked too.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch.distributed as dist

import seqpar
from tests.attention_cases import AttnCase, run_case
from tests.test_allgather import allgather_bytes
from tests.test_ring import ring_bytes
from tests.test_ulysses import ulysses_bytes
from tests.test_usp import usp_bytes

# Building a mesh is collective and creates process groups: each is built once per world.
_MESHES: dict[tuple, seqpar.SPMesh] = {}


def mesh(ulysses: int = 1, **split) -> seqpar.SPMesh:
    key = (ulysses, tuple(sorted(split.items())))
    if key not in _MESHES:
        _MESHES[key] = seqpar.SPMesh(ulysses=ulysses, **split)
    return _MESHES[key]


def members(info) -> list[int]:
    return sorted(dist.get_process_group_ranks(info.group)) if info.group else [dist.get_rank()]


def mesh_structure(ulysses: int, split: dict) -> dict:
    m = mesh(ulysses, **split)
    return {"sizes": m.sizes, "coords": (m.dp.rank, m.ring.rank, m.ulysses.rank),
            "sp": members(m.info), "dp": members(m.dp), "ulysses": members(m.ulysses),
            "ring": members(m.ring), "dp_sp": members(m.dp_sp),
            "sp is group": m.get_group("sp") is m.group}


@pytest.mark.parametrize("ulysses, split, expected", [
    (1, {"dp": 2}, {"sp": [[0, 1], [0, 1], [2, 3], [2, 3]], "dp": [[0, 2], [1, 3]] * 2,
                    "ulysses": [[0], [1], [2], [3]], "ring": [[0, 1], [0, 1], [2, 3], [2, 3]]}),
    (2, {"sp": 2}, {"sp": [[0, 1], [0, 1], [2, 3], [2, 3]], "dp": [[0, 2], [1, 3]] * 2,
                    "ulysses": [[0, 1], [0, 1], [2, 3], [2, 3]], "ring": [[0], [1], [2], [3]]}),
    (1, {"dp": 4}, {"sp": [[0], [1], [2], [3]], "dp": [[0, 1, 2, 3]] * 4,
                    "ulysses": [[0], [1], [2], [3]], "ring": [[0], [1], [2], [3]]}),
    (2, {"dp": 1, "sp": 4}, {"sp": [[0, 1, 2, 3]] * 4, "dp": [[0], [1], [2], [3]],
                             "ulysses": [[0, 1], [0, 1], [2, 3], [2, 3]],
                             "ring": [[0, 2], [1, 3], [0, 2], [1, 3]]}),
], ids=["dp2-U1", "sp2-U2", "dp4", "dp1-U2"])
def test_mesh_axes(worlds, ulysses, split, expected):
    """Sequence-parallel groups are consecutive ranks, data-parallel groups strided; inside a
    sequence-parallel group Ulysses groups are consecutive and ring groups strided."""
    results = worlds(4).run(mesh_structure, ulysses, split)
    for axis, groups in expected.items():
        assert [r[axis] for r in results] == groups, axis
    dp_size = 4 // len(expected["sp"][0])
    for rank, r in enumerate(results):
        assert r["sizes"] == {"dp": dp_size, "sp": 4 // dp_size, "ulysses": ulysses,
                              "ring": 4 // dp_size // ulysses}
        assert r["dp_sp"] == [0, 1, 2, 3] and r["sp is group"]
        ring_size = r["sizes"]["ring"]
        d, g, u = r["coords"]
        assert rank == (d * ring_size + g) * ulysses + u  # rank = (d R + g) U + u


TRAFFIC = {"ring": lambda case, m: dict(zip(("ring.fwd", "ring.bwd"), ring_bytes(case, m.sp_size))),
           "ulysses": lambda case, m: dict(zip(("ulysses.fwd", "ulysses.bwd"),
                                               ulysses_bytes(case, m.sp_size))),
           "allgather": lambda case, m: dict(zip(("allgather.fwd", "allgather.bwd"),
                                                 allgather_bytes(case, m.sp_size))),
           "usp": lambda case, m: usp_bytes(case, m.ulysses_size, m.ring_size)}


def check_side_by_side(case: AttnCase, ulysses: int, split: dict) -> dict:
    """This rank's sequence-parallel group runs its own sequence; results exact, bytes those of
    P ranks."""
    m = mesh(ulysses, **split)
    own = dataclasses.replace(case, seed=100 + m.dp.rank)
    with seqpar.comm_stats() as stats:
        errors = run_case(own, group=m)
    expected = TRAFFIC[case.backend](case, m)
    assert {op: stats.sent(op) for op in expected} == expected
    return {"dp": m.dp.rank, **errors}


@pytest.mark.parametrize("backend, ulysses, split", [
    ("ring", 1, {"dp": 2}), ("allgather", 1, {"dp": 2}), ("ulysses", 1, {"sp": 2}),
    ("usp", 2, {"dp": 2}), ("ring", 1, {"dp": 4}),
], ids=["ring-dp2", "allgather-dp2", "ulysses-sp2", "usp-U2-dp2", "ring-dp4"])
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_groups_side_by_side_are_exact(worlds, backend, ulysses, split, layout):
    case = AttnCase(backend=backend, layout=layout, heads_q=4, heads_kv=2, seq_local=6,
                    head_dim=8)
    results = worlds(4).run(check_side_by_side, case, ulysses, split)
    assert len({r["dp"] for r in results}) == split.get("dp", 4 // split.get("sp", 4))


def bad_mesh(args_by_rank: dict) -> tuple[str, str]:
    try:
        seqpar.SPMesh(**args_by_rank.get(dist.get_rank(), args_by_rank["default"]))
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        return type(error).__name__, str(error)
    return "nothing raised", ""


@pytest.mark.parametrize("args_by_rank, expected", [
    ({"default": {"dp": 3}}, {0: ("ValueError", r"dp=3 must divide the group size 4 .*\[1, 2, 4\]")}),
    ({"default": {"sp": 8}}, {1: ("ValueError", r"sp=8 must divide the group size 4")}),
    ({"default": {"dp": 2, "sp": 1}}, {0: ("ValueError", r"dp=2 x sp=1 = 2 must equal the group size 4")}),
    ({"default": {"dp": 2, "ulysses": 4}},
     {0: ("ValueError", r"ulysses=4 must divide the sequence-parallel size 2 \(group size 4 / "
                        r"dp=2\) .*\[1, 2\]")}),
    ({"default": {"dp": "2"}}, {2: ("TypeError", r"dp must be an int \(the number of "
                                                 r"data-parallel replicas D\), got '2'")}),
    ({"default": {"dp": 2}, 3: {"dp": 4}}, {0: ("ValueError", r"dp differs across ranks"),
                                            3: ("ValueError", r"dp differs across ranks")}),
    ({"default": {"dp": 2}, 1: {"dp": 0}}, {0: ("ValueError", r"rank 1 of the group rejected"),
                                            1: ("ValueError", r"dp=0 must divide")}),
], ids=["dp-not-a-divisor", "sp-too-big", "product", "ulysses-vs-sp", "not-an-int", "differs",
        "bad-on-one-rank"])
def test_bad_mesh_raises_on_every_rank(worlds, args_by_rank, expected):
    results = worlds(4).run(bad_mesh, args_by_rank, timeout=60)
    assert all(kind != "nothing raised" for kind, _ in results), results
    for rank, (kind, pattern) in expected.items():
        assert results[rank][0] == kind, results[rank]
        assert results[rank][1].startswith("seqpar.SPMesh: "), results[rank]
        assert re.search(pattern, results[rank][1]), results[rank]


def unknown_axis() -> str:
    try:
        mesh(1, dp=2).get_group("tp")
    except ValueError as error:
        return str(error)
    return "nothing raised"


def test_get_group_names_the_axes(worlds):
    message = worlds(4).run(unknown_axis)[0]
    assert message.endswith("choose one of ['dp_sp', 'dp', 'sp', 'ring', 'ulysses']"), message
