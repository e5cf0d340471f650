"""The cost model (seqpar.cost): its work counts against the planner, its TokenRing traffic
against a rule read off the layouts, backend="auto" (never illegal, exact on every rank, the
same choice everywhere or an error), the waits comm_stats measures, and the model's predicted
order of the backends against the measured order on this machine."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm.primitives import GroupInfo
from seqpar.comm.ulysses import UlyssesPlan, kv_heads_per_rank
from seqpar.cost import (AUTO_CANDIDATES, CPU_DEFAULT, SPEC_SHEETS, Link, Problem, Profile,
                         choose, explain, memory_bytes, predict, problem_of,
                         use_profile)
from seqpar.cost.model import causal_block_products, group_work, steps_of, work_matrix
from seqpar.cost.traffic import kv_split, tokenring_volume
from seqpar.kernels.dispatch import KERNELS
from seqpar.kernels.mask import causal_pairs, plan_blocks
from seqpar.layout import LAYOUTS, all_local_runs
from tests.attention_cases import AttnCase, run_case

# ---------------------------------------------------------------- work and traffic formulas


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_work_matrix_counts_what_the_planner_plans(layout, causal):
    """Products of rank x's queries with rank y's keys: the closed forms equal the pairs of
    `plan_blocks` (the plans the backends run) for every pair of ranks."""
    for world in (1, 2, 3, 4, 6):
        for seq_local in (2, 6, 10):
            runs = all_local_runs(seq_local * world, world, layout)
            work, calls = work_matrix(layout, causal, world, seq_local)
            for x, y in itertools.product(range(world), repeat=2):
                planned = plan_blocks(runs[x], runs[y], causal)
                assert work[x, y] == causal_pairs(planned), (world, seq_local, x, y)
                assert calls[x, y] == (1 if planned else 0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world, ulysses", [(4, 1), (4, 2), (4, 4), (6, 2), (6, 3), (8, 4)])
def test_group_work_is_what_the_usp_ring_computes(world, ulysses, layout):
    """USP's ring across R Ulysses groups: the model's per-step work of each group equals the
    pairs of the plans `UlyssesPlan` builds for it (Ulysses alone, R = 1: one causal block)."""
    rings, seq_local = world // ulysses, 4
    problem = Problem(batch=1, seq_len=seq_local * world, heads_q=ulysses, heads_kv=1,
                      head_dim=8, world=world, layout=layout, ulysses=ulysses)
    work, _ = group_work(problem, rings, ulysses, (1, 1))
    per_step = steps_of(work)
    runs = all_local_runs(seq_local * world, world, layout)
    for group in range(rings):
        plan = UlyssesPlan.build(GroupInfo(None, 0, ulysses), GroupInfo(None, group, rings),
                                 runs, ulysses, 1, True, 1.0, KERNELS["flash"], (), False, "usp")
        for step, blocks in enumerate(plan.inner.step_blocks):
            assert per_step[step, group] == causal_pairs(blocks), (group, step)


def test_causal_block_products_count_the_tiles_a_kernel_runs():
    for n in (1, 7, 64, 1000):
        assert causal_block_products(n, (1, 1)) == n * (n + 1) // 2
    # PyTorch's CPU flash kernel runs 512-key tiles for 256-row tiles: a 512 x 512 causal block
    # costs a full one; 1024 x 1024 costs 3/4 of a full one.
    assert causal_block_products(512, (256, 512)) == 512 * 512
    assert causal_block_products(1024, (256, 512)) == 0.75 * 1024 * 1024


def test_kv_split_matches_the_heads_ulysses_assigns():
    for heads_kv in (1, 2, 3, 4, 6, 8):
        for group in (1, 2, 3, 4):
            for ranks in (1, 2, 3, 4, 6, 8):
                heads_q = heads_kv * group
                if heads_q % ranks:
                    continue
                n, _ = kv_split(heads_q, heads_kv, ranks)
                assert kv_heads_per_rank(heads_q, heads_kv, ranks).shape == (ranks, n)


# Rows of rank x's queries that see a key of rank y > x, causal (x > y or non-causal: all),
# read off the layouts independently of the vectorised formula in seqpar.cost.traffic.
ROWS_BEFORE = {"contiguous": lambda s: 0, "zigzag": lambda s: s // 2, "striped": lambda s: s - 1}


def tokenring_rule(layout: str, causal: bool, world: int, rank: int, s: int, n: int, d: int,
                   b: int, a: int) -> tuple[int, int, int]:
    """(forward bytes, backward bytes, messages) of `rank`, step by step."""
    def rows(x: int, y: int) -> int:
        return s if not causal or x > y else ROWS_BEFORE[layout](s)

    def forwarded(x: int, step: int) -> bool:
        return any(rows(x, (x + later) % world) for later in range(step + 1, world))

    queries = sum(forwarded((rank - t) % world, t) for t in range(world - 1))
    partials = [rows((rank - t) % world, rank) for t in range(1, world)]
    fwd = queries * n * s * d * b + sum(n * r * (d * b + a) for r in partials)
    bwd = queries * n * s * (2 * d * b + 2 * a) + sum(n * r * d * a for r in partials)
    return fwd, bwd, queries + sum(1 for r in partials if r)


def test_tokenring_volume_follows_the_layout_rule():
    for layout, causal, world, s in itertools.product(LAYOUTS, (True, False), range(1, 7),
                                                      (1, 2, 6, 9)):
        if layout == "zigzag" and s % 2:
            continue
        problem = Problem(batch=2, seq_len=s * world, heads_q=4, heads_kv=2, head_dim=8,
                          world=world, itemsize=2, acc_itemsize=4, causal=causal, layout=layout)
        for rank in range(world):
            fwd, bwd = tokenring_volume(problem, rank)
            expected = tokenring_rule(layout, causal, world, rank, s, 8, 8, 2, 4)
            assert (fwd.bytes, bwd.bytes, fwd.messages) == expected, (layout, causal, world, s)
            assert bwd.messages == fwd.messages


# ---------------------------------------------------------------- backend="auto"

def _legal(backend: str, p: Problem, hw: Profile) -> bool:
    """The rules, stated independently of seqpar.cost.predict."""
    if backend == "ulysses" and p.heads_q % p.world:
        return False
    if backend == "usp" and (p.ulysses is None or p.heads_q % p.ulysses):
        return False
    return backend in AUTO_CANDIDATES and memory_bytes(backend, p) <= hw.memory_bytes


def test_auto_never_picks_an_illegal_backend():
    """Many random problems, meshes, profiles (one with little memory) and sets of available
    backends: the choice is available, legal, never s2, and the fastest legal prediction; when
    nothing is legal, choose raises."""
    rng = random.Random(0)
    profiles = list(SPEC_SHEETS.values()) + [CPU_DEFAULT,
                                              CPU_DEFAULT.with_(name="tiny", memory_bytes=64e6)]
    chosen_names, raised = set(), 0
    for _ in range(300):
        world = rng.choice([1, 2, 3, 4, 6, 8, 16, 64, 256])
        heads_kv = rng.choice([1, 2, 4, 8])
        heads_q = heads_kv * rng.choice([1, 2, 3, 4])
        divisors = [u for u in range(1, world + 1) if world % u == 0]
        layout = rng.choice(LAYOUTS)
        p = Problem(batch=rng.choice([1, 2]), seq_len=2 * world * rng.choice([8, 256, 4096]),
                    heads_q=heads_q, heads_kv=heads_kv, head_dim=rng.choice([64, 128]),
                    world=world, itemsize=rng.choice([2, 4]), causal=rng.random() < 0.7,
                    layout=layout, ulysses=rng.choice([None] + divisors))
        hw = rng.choice(profiles)
        available = [b for b in AUTO_CANDIDATES + ("s2",) if rng.random() < 0.8]
        legal = [b for b in available if _legal(b, p, hw)]
        if not legal:
            with pytest.raises(ValueError, match="no backend can run this problem"):
                choose(p, hw, available)
            raised += 1
            continue
        chosen = choose(p, hw, available)
        assert chosen.backend in legal and chosen.backend != "s2", (p, hw.name, chosen)
        assert chosen.seconds == min(predict(b, p, hw).seconds for b in legal)
        chosen_names.add(chosen.backend)
    assert chosen_names >= {"ring", "ulysses", "usp", "allgather"}, chosen_names  # not one answer
    assert raised > 0


def test_explain_names_the_choice_and_the_reasons():
    p = Problem(batch=1, seq_len=2**20, heads_q=32, heads_kv=8, head_dim=128, world=64)
    text = explain(p, SPEC_SHEETS["h100-sxm"])
    chosen = choose(p, SPEC_SHEETS["h100-sxm"]).backend
    assert f"auto picks {chosen!r}" in text
    assert "needs query heads % P == 0, got 32 heads on 64 ranks" in text  # ulysses
    assert "needs group=seqpar.SPMesh" in text  # usp without a mesh
    for backend in AUTO_CANDIDATES:
        assert backend in text
    assert [line for line in text.splitlines() if line.startswith(chosen)][0].endswith("<- auto")


def _profile_preferring(kind: str) -> Profile:
    """CPU_DEFAULT with point-to-point ("collectives") or collectives ("p2p") made 1000x slower."""
    slow = Link(1.0, 1e5)
    if kind == "p2p":
        return CPU_DEFAULT.with_(name="no-collectives", collectives=(
            ("all_to_all", slow), ("all_gather", slow), ("reduce_scatter", slow)))
    return CPU_DEFAULT.with_(name="no-p2p", intra=slow, nic=slow)


AUTO_CASES = [AttnCase(backend="auto", layout="zigzag", heads_q=4, heads_kv=2, seq_local=8,
                       dtype=torch.float64),
              AttnCase(backend="auto", layout="striped", causal=False, heads_q=8, heads_kv=2,
                       seq_local=6)]


def auto_is_exact(profile_kind: str, ulysses: int | None) -> list[str]:
    """backend="auto" vs the float64 reference; returns the ops that ran."""
    group = seqpar.SPMesh(ulysses=ulysses) if ulysses else None
    ran = []
    with use_profile(_profile_preferring(profile_kind)):
        for case in AUTO_CASES:
            with seqpar.comm_stats() as stats:
                run_case(case, group=group)
            ran.append(sorted({op.split(".")[0] for op in stats.ops} - {"agree"}))
    return ran


@pytest.mark.parametrize("profile_kind, ulysses", [("p2p", None), ("collectives", None),
                                                   ("collectives", 2)])
def test_auto_is_exact_and_runs_the_predicted_backend(worlds, profile_kind, ulysses):
    world = 4
    results = worlds(world).run(auto_is_exact, profile_kind, ulysses)
    profile = _profile_preferring(profile_kind)
    for case, ran in zip(AUTO_CASES, zip(*results)):
        problem = Problem(batch=case.batch, seq_len=case.seq_local * world,
                          heads_q=case.heads_q, heads_kv=case.heads_kv, head_dim=case.head_dim,
                          world=world, itemsize=case.dtype.itemsize,
                          acc_itemsize=8 if case.dtype == torch.float64 else 4,
                          causal=case.causal, layout=case.layout, ulysses=ulysses,
                          return_lse=True)
        expected = choose(problem, profile).backend
        assert all(ops == [expected] for ops in ran), (expected, ran)


def auto_with_a_profile_per_rank() -> tuple[str, str]:
    """Rank 0 and the others use profiles that choose differently: every rank raises."""
    q = torch.randn(1, 8, 4, 8)
    profile = _profile_preferring("p2p" if dist.get_rank() == 0 else "collectives")
    try:
        with use_profile(profile):
            seqpar.attention(q, q, q, backend="auto")
    except ValueError as error:
        return "ValueError", str(error)
    return "nothing raised", ""


def test_auto_with_different_profiles_raises_on_every_rank(worlds):
    p = problem_of(torch.empty(1, 8, 4, 8), torch.empty(1, 8, 4, 8), 2, None, True, "zigzag",
                   False)
    assert choose(p, _profile_preferring("p2p")).backend != choose(
        p, _profile_preferring("collectives")).backend
    for kind, message in worlds(2).run(auto_with_a_profile_per_rank, timeout=60):
        assert kind == "ValueError", message
        assert "backend chosen by backend='auto' (use the same cost profile on every rank) " \
               "differs across ranks" in message, message


# ---------------------------------------------------------------- exposed communication
# Only the timers' plumbing is asserted: how long a wait lasts on a shared 2-core machine is a
# measurement (benchmarks.scaling reports it), not something a unit test can know.

def test_a_timed_wait_records_the_seconds_it_blocked(monkeypatch):
    """Traffic.wait adds (clock after - clock before) to the recorders that time waits, under
    the op's name, and nothing to those that do not."""
    from seqpar.comm import primitives
    ticks = iter([10.0, 10.25, 20.0, 20.5])
    monkeypatch.setattr(primitives.time, "perf_counter", lambda: next(ticks))
    with seqpar.comm_stats(time_waits=True) as timed, seqpar.comm_stats() as untimed:
        assert primitives.Traffic.now("a.fwd").wait(lambda: "done") == "done"
        primitives.Traffic.now("b.bwd").wait(lambda: None)
    assert timed.waited("a") == 0.25 and timed.waited("b") == 0.5 and timed.waited() == 0.75
    assert untimed.waited() == 0.0


def waits_recorded_per_op(time_waits: bool) -> dict[str, float]:
    q = torch.randn(1, 16, 2, 8, requires_grad=True)
    with seqpar.comm_stats(time_waits=time_waits) as stats:
        seqpar.attention(q, q, q, backend="ring").sum().backward()
    return {op: traffic.wait_seconds for op, traffic in stats.ops.items()}


def test_waits_are_timed_only_when_asked(worlds):
    """The ring's waits reach comm_stats under its ops when asked, and are 0 otherwise."""
    timed, untimed = (worlds(2).run(waits_recorded_per_op, flag) for flag in (True, False))
    for waits in timed:
        assert {"ring.fwd", "ring.bwd"} <= set(waits)
        assert all(seconds >= 0.0 for seconds in waits.values())
    assert all(seconds == 0.0 for waits in untimed for seconds in waits.values())


# ---------------------------------------------------------------- model vs measurement
# Whether the model orders the backends as this machine does is measured by
# `python -m benchmarks.model_agreement`; here only its arithmetic on recorded numbers.

def test_model_agreement_counts_clear_pairs_of_recorded_times():
    from benchmarks import model_agreement
    problems = model_agreement.SWEEP[:1]
    recorded = {"profile": CPU_DEFAULT.to_json(), "measured": [
        {"ring": [1.0, 1.1], "tokenring": [1.05, 1.12],  # not clear: within 15%
         "ulysses": [2.0, 2.2], "allgather": [0.9, 2.1]}]}  # allgather: repeats disagree
    rows = model_agreement.rows_of(0, problems, recorded)
    predicted = {r["backend"]: r["predicted_s"] for r in rows}
    problem = Problem(batch=1, seq_len=256, heads_q=64, heads_kv=64, head_dim=128, world=2,
                      itemsize=4, causal=True, layout="zigzag")
    assert predicted == {b: predict(b, problem, CPU_DEFAULT).seconds
                         for b in model_agreement.BACKENDS}
    from benchmarks.scaling import clear_pairs, in_predicted_order
    pairs = clear_pairs(rows, problem=lambda r: (r["sweep"], r["problem"]))
    assert sorted((a["backend"], b["backend"]) for a, b in pairs) == [
        ("ring", "ulysses"), ("tokenring", "ulysses")]
    for a, b in pairs:  # ulysses is measured slower in both
        assert in_predicted_order(a, b) == (predicted[a["backend"]] < predicted["ulysses"])


def test_seqpar_bench_command_explains_and_calibrates(tmp_path, capsys):
    """`seqpar bench` is the cost model's command: explain, and calibrate into a profile that
    `explain --profile` reads back."""
    from seqpar import cli
    assert cli.main(["bench", "explain", "--seq", "1048576", "--world", "64", "--heads", "32",
                     "--kv-heads", "8", "--profile", "h100-sxm"]) == 0
    assert "auto picks" in capsys.readouterr().out
    out = tmp_path / "profile.json"
    assert cli.main(["bench", "calibrate", "--ranks", "2", "--head-dims", "32", "--repeats", "1",
                     "--name", "cli-test", "--out", str(out)]) == 0
    assert Profile.load(out).name == "cli-test"
    capsys.readouterr()
    assert cli.main(["bench", "explain", "--seq", "4096", "--world", "2", "--heads", "4",
                     "--profile", str(out)]) == 0
    assert "cli-test" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "explain", "--seq", "4096", "--world", "2", "--profile", "nowhere"])


def test_auto_counts_the_work_and_traffic_a_mask_removes():
    """Deterministic: on an H100 spec sheet, 128K tokens over 8 ranks, dense causal attention
    goes to Ulysses; with a 2K window or 4K documents every backend is predicted faster, the
    model charges exactly the visible pairs, and the choice moves to a ring-family backend
    (they move only the slices that are seen, the all-to-alls move everything)."""
    from seqpar.cost.hardware import SPEC_SHEETS
    from seqpar.cost.traffic import masked_work
    hw = SPEC_SHEETS["h100-sxm"]
    dense = Problem(batch=1, seq_len=131072, heads_q=32, heads_kv=8, head_dim=128, world=8,
                    causal=True, layout="zigzag")
    windowed = dense.with_(window=2048)
    packed = dense.with_(documents=tuple(range(0, 131072 + 1, 4096)))
    assert choose(dense, hw).backend == "ulysses"
    for masked in (windowed, packed):
        assert choose(masked, hw).backend in ("ring", "tokenring")
        for backend in AUTO_CANDIDATES:
            if backend != "usp":
                assert predict(backend, masked, hw).seconds < predict(backend, dense, hw).seconds / 5
    small = Problem(batch=1, seq_len=1024, heads_q=4, heads_kv=4, head_dim=64, world=4,
                    layout="zigzag", window=100)
    visible = sum(min(i + 1, 100) for i in range(1024))
    assert masked_work(small, 4)[0].sum() == visible  # every rank pair, exact pairs
    assert masked_work(small, 1)[0].sum() == visible  # one group: the Ulysses plan
