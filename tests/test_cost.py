"""The cost model (seqpar.cost): its work counts against the planner, its TokenRing traffic
against a rule read off the layouts, backend="auto" (never illegal, exact on every rank, the
same choice everywhere or an error), the waits comm_stats measures, and the model's predicted
order of the backends against the measured order on this machine."""

from __future__ import annotations

import itertools
import random
import statistics
import time

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.comm.primitives import GroupInfo
from seqpar.comm.ulysses import UlyssesPlan, kv_heads_per_rank
from seqpar.cost import (AUTO_CANDIDATES, CPU_DEFAULT, SPEC_SHEETS, Link, Problem, Profile,
                         calibrate, choose, explain, memory_bytes, predict, problem_of,
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

def late_rank_is_waited_for(delay: float) -> tuple[float, float]:
    """Rank 1 starts `delay` s late: rank 0 waits for it in the call's communication."""
    q = torch.randn(1, 16, 2, 8, requires_grad=True)
    if dist.get_rank() == 1:
        time.sleep(delay)
    start = time.perf_counter()
    with seqpar.comm_stats(time_waits=True) as stats:
        seqpar.attention(q, q, q, backend="ring").sum().backward()
    return stats.waited(), time.perf_counter() - start


def test_waits_record_exposed_communication(worlds):
    delay = 0.5
    (waited_0, total_0), (waited_1, total_1) = worlds(2).run(late_rank_is_waited_for, delay)
    assert delay * 0.8 <= waited_0 <= total_0
    assert waited_1 < delay * 0.8 and waited_1 <= total_1


def waits_are_not_timed_by_default() -> float:
    q = torch.randn(1, 16, 2, 8)
    with seqpar.comm_stats() as stats:
        seqpar.attention(q, q, q, backend="ring")
    return stats.waited()


def test_waits_are_timed_only_when_asked(worlds):
    assert worlds(2).run(waits_are_not_timed_by_default) == [0.0, 0.0]


# ---------------------------------------------------------------- model vs measurement

# Backends compared at P = 2 (usp needs U x R: at P = 2 it is plain Ulysses or plain ring).
MEASURED_BACKENDS = ("ring", "tokenring", "ulysses", "allgather")
# (S, Hq, Hkv, D, layout, causal), fp32: big K/V for few tokens (gloo's slow all-gather and
# reduce-scatter), striped causal (the kernel's causal tiles favour Ulysses' one long block),
# GQA 32:1 (TokenRing sends the 32 query heads), a tiny one (round trips), a compute-bound one.
SWEEP = ((256, 64, 64, 128, "zigzag", True), (1024, 8, 8, 64, "striped", True),
         (256, 32, 1, 128, "zigzag", False), (128, 4, 4, 32, "zigzag", True),
         (2048, 8, 8, 64, "zigzag", True))
REPEATS = 4
CLEARLY = 1.15  # a pair counts when its medians differ by this factor and every repeat agrees
ENOUGH_PAIRS, MAX_SWEEPS = 16, 3  # sweeps are pooled until they hold this many clear pairs


def calibrate_and_measure() -> dict:
    """Calibrate, then time fwd+bwd of every backend on every problem of SWEEP, repeats going
    round-robin over the backends (drifts of a shared machine hit all alike); per repeat the
    slowest rank's time."""
    profile = calibrate(head_dims=(32, 64, 128), repeats=3)
    measured = []
    for seq, heads_q, heads_kv, dim, layout, causal in SWEEP:
        gen = torch.Generator().manual_seed(seq)
        shapes = ((seq, heads_q), (seq, heads_kv), (seq, heads_kv), (seq, heads_q))
        q, k, v, do = (seqpar.shard(torch.randn(1, s, h, dim, generator=gen), layout=layout)
                       for s, h in shapes)
        times = {name: [] for name in MEASURED_BACKENDS}
        for repeat in range(REPEATS + 1):  # the first round warms up
            for name in MEASURED_BACKENDS:
                q_l, k_l, v_l = (t.clone().requires_grad_() for t in (q, k, v))
                dist.barrier()
                start = time.perf_counter()
                seqpar.attention(q_l, k_l, v_l, backend=name, causal=causal,
                                 layout=layout).backward(do)
                if repeat:
                    times[name].append(time.perf_counter() - start)
        slowest = {}
        for name, values in times.items():
            tensor = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            slowest[name] = tensor.tolist()
        measured.append(slowest)
    return {"profile": profile.to_json(), "measured": measured}


def agreement(profile: Profile, world: int, measured: list[dict]) -> tuple[int, int, list]:
    """(pairs ordered as predicted, clearly different pairs, the pairs)."""
    pairs = []
    for (seq, heads_q, heads_kv, dim, layout, causal), times in zip(SWEEP, measured):
        problem = Problem(batch=1, seq_len=seq, heads_q=heads_q, heads_kv=heads_kv,
                          head_dim=dim, world=world, itemsize=4, causal=causal, layout=layout)
        predicted = {name: predict(name, problem, profile).seconds for name in times}
        for a, b in itertools.combinations(times, 2):
            ta, tb = statistics.median(times[a]), statistics.median(times[b])
            unanimous = max(times[a]) < min(times[b]) or max(times[b]) < min(times[a])
            if unanimous and max(ta, tb) >= CLEARLY * min(ta, tb):
                pairs.append((seq, layout, a, b, ta, tb, predicted[a], predicted[b],
                              (ta < tb) == (predicted[a] < predicted[b])))
    return sum(p[-1] for p in pairs), len(pairs), pairs


def test_model_order_agrees_with_measurement(worlds):
    """A profile calibrated here predicts the measured order of >= 80% of the backend pairs
    whose times clearly differ. Two ranks, one per core of the 2-core CI machine: four ranks
    would time-share two cores, a regime of scheduler waits no alpha-beta model describes."""
    world = 2
    # Every sweep (calibration included) is measured afresh and all their pairs are pooled:
    # one 2-core sweep gives 4-14 clear pairs, too few for an 80% verdict that noise cannot
    # flip; sweeps are added until the pool holds enough, and none is ever dropped.
    agreed = clear = 0
    pairs = []
    for sweep in range(MAX_SWEEPS):
        result = worlds(world).run(calibrate_and_measure, timeout=240)[0]
        profile = Profile.from_json(result["profile"])
        sweep_agreed, sweep_clear, sweep_pairs = agreement(profile, world, result["measured"])
        agreed, clear, pairs = agreed + sweep_agreed, clear + sweep_clear, pairs + sweep_pairs
        if clear >= ENOUGH_PAIRS:
            break
    assert Profile.from_json(profile.to_json()) == profile
    assert all(rate > 0 for _, rate in profile.attention_fwd_flops + profile.attention_bwd_flops)
    report = "\n".join(f"S={p[0]} {p[1]}: {p[2]} {p[4] * 1e3:.0f} ms vs {p[3]} {p[5] * 1e3:.0f} ms"
                       f" measured, {p[6] * 1e3:.0f} vs {p[7] * 1e3:.0f} predicted"
                       f"{'' if p[-1] else '  <- order differs'}" for p in pairs)
    assert clear >= 10, f"only {clear} clearly different pairs:\n{report}"
    assert agreed >= 0.8 * clear, f"{agreed}/{clear} pairs in the predicted order:\n{report}"


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
