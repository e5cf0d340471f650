"""DeepSpeed with seqpar's mpu: a tiny Llama on 4 CPU ranks as 2 data-parallel replicas of a
2-rank sequence-parallel group, ZeRO stage 1 and 2, trains 5 steps with the same losses (and
parameters) as plain PyTorch on one process on the same global batch: fp32, 1e-5 relative
(rounding of the gradient sums, which DeepSpeed adds in another order; SGD keeps the update a
linear function of the gradient, so no step amplifies it). Gradients are clipped by their global
norm (1.0, which the first steps exceed), so the norm must be that of the whole gradient -- not
counted once per sequence-parallel rank.

Packed documents (DataCollatorWithFlattening's rows, one per replica) train the same way, like
one process that runs every document alone.

Replica d trains on sequence d of the global batch of 2; every label is a real token, so the mean of the replicas' mean losses is the global mean the single process takes.
DeepSpeed compiles a small op on its first initialisation in a process (~10-30 s): few cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from seqpar.integrations import hf
from seqpar.integrations.deepspeed import SequenceParallelMPU
from tests.checks import assert_close
from tests.test_hf import tiny_llama
from tests.test_mesh import mesh

STEPS, SEQ, LR = 5, 32, 0.5
CLIP = 1.0  # DeepSpeed clips gradients by their global norm, so the reference does too


def global_batch() -> torch.Tensor:
    """The global batch of every step: 2 sequences (one per data-parallel replica), learnt by
    heart over the steps so the loss visibly falls."""
    return torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(0))


def single_process() -> tuple[list[float], list[torch.Tensor]]:
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        ids = global_batch()
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


DOCS = ((9, 5, 11, 7), (4, 12, 16))  # each replica's packed row of SEQ tokens


def packed_rows() -> list[dict[str, torch.Tensor]]:
    """One packed row per replica, DataCollatorWithFlattening-style: positions restart at each
    document, whose first token has no label."""
    gen = torch.Generator().manual_seed(5)
    rows = []
    for lengths in DOCS:
        ids = torch.randint(0, 96, (1, SEQ), generator=gen)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        rows.append({"input_ids": ids, "position_ids": positions,
                     "labels": ids.masked_fill(positions == 0, -100)})
    return rows


def packed_loss(model, row: dict[str, torch.Tensor], lengths) -> torch.Tensor:
    """One process's loss of a packed row: each document alone, the summed token losses over
    the row's labelled-token count."""
    total, count, start = 0.0, 0, 0
    for n in lengths:
        ids = row["input_ids"][:, start:start + n]
        logits = model(input_ids=ids).logits
        total = total + torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:],
                                                          reduction="sum")
        count, start = count + n - 1, start + n
    return total / count


def single_process_packed() -> tuple[list[float], list[torch.Tensor]]:
    """The replicas' packed rows on one process: the mean of their losses, SGD, clipped."""
    model = tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        loss = sum(packed_loss(model, row, lengths)
                   for row, lengths in zip(packed_rows(), DOCS)) / len(DOCS)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def train_with_deepspeed(stage: int, backend: str, ulysses: int, packed: bool = False
                         ) -> list[float]:
    import os

    import deepspeed

    # The harness's worlds were not started by a launcher; DeepSpeed wants torchrun's LOCAL_RANK
    # (seqpar.launch.init exports it for mpirun and srun jobs).
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    deepspeed.init_distributed(dist_backend="gloo")  # joins the world the harness started
    m = mesh(ulysses, dp=2)
    model = tiny_llama()
    hf.apply(model, m, backend=backend)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": CLIP, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      mpu=SequenceParallelMPU(m))
    assert engine.train_batch_size() == 2  # one sequence per replica
    losses = []
    for step in range(STEPS):
        if packed:  # the documents reach the layers through the model's keyword arguments
            local = hf.shard_batch(packed_rows()[m.dp.rank], m)
            logits = engine(**local).logits
        else:
            ids = global_batch()[m.dp.rank:m.dp.rank + 1]
            local = hf.shard_batch({"input_ids": ids, "labels": ids}, m)
            logits = engine(input_ids=local["input_ids"],
                            position_ids=local["position_ids"]).logits
        loss = hf.loss(logits, local, m)
        engine.backward(loss)
        engine.step()
        replicas = loss.detach().clone()
        dist.all_reduce(replicas, group=m.get_group("dp"))
        losses.append(replicas.item() / m.dp_size)
    expected_losses, expected_params = single_process_packed() if packed else single_process()
    context = f"rank {dist.get_rank()} ZeRO-{stage} {backend}{' packed' if packed else ''}:"
    assert_close("losses", torch.tensor(losses), torch.tensor(expected_losses), 1e-5, context)
    for i, (p, e) in enumerate(zip(engine.module.parameters(), expected_params)):
        assert_close(f"parameter {i}", p, e, 1e-5, context)
    assert expected_losses[-1] < expected_losses[0]  # it trains
    return losses


@pytest.mark.parametrize("stage, backend, ulysses", [(1, "ring", 1), (2, "ulysses", 1),
                                                     (0, "usp", 2)],
                         ids=["zero1-ring", "zero2-ulysses", "zero0-usp"])
def test_deepspeed_trains_like_one_process(worlds, stage, backend, ulysses):
    """ZeRO 1 and 2 partition over the whole mesh; without ZeRO (stage 0) DeepSpeed all-reduces
    and clips with the mpu's one-rank model-parallel group."""
    per_rank = worlds(4).run(train_with_deepspeed, stage, backend, ulysses, timeout=200)
    assert all(losses == per_rank[0] for losses in per_rank), per_rank


@pytest.mark.parametrize("stage, backend", [(1, "ring"), (2, "allgather")],
                         ids=["zero1-ring", "zero2-allgather"])
def test_deepspeed_trains_packed_documents_like_one_process(worlds, stage, backend):
    """Each replica's packed row (documents found from restarting position_ids) trains like
    one process running every document alone: the same losses and parameters after 5 steps."""
    per_rank = worlds(4).run(train_with_deepspeed, stage, backend, 1, True, timeout=200)
    assert all(losses == per_rank[0] for losses in per_rank), per_rank


def mpu_view() -> dict:
    mpu = SequenceParallelMPU(mesh(1, dp=2))
    members = {name: sorted(dist.get_process_group_ranks(getattr(mpu, f"get_{name}_group")()))
               for name in ("sequence_parallel", "sequence_data_parallel", "data_parallel",
                            "model_parallel")}
    sizes = {name: getattr(mpu, f"get_{name}_world_size")()
             for name in ("sequence_parallel", "sequence_data_parallel", "data_parallel",
                          "model_parallel")}
    ranks = {name: getattr(mpu, f"get_{name}_rank")()
             for name in ("sequence_parallel", "sequence_data_parallel", "data_parallel",
                          "model_parallel")}
    mpu.initialize_sequence_parallel(2)
    try:
        mpu.initialize_sequence_parallel(4)
        refused = ""
    except ValueError as error:
        refused = str(error)
    return {"members": members, "sizes": sizes, "ranks": ranks, "refused": refused,
            "dp ranks": mpu.get_data_parallel_group_ranks()}


def test_mpu_groups(worlds):
    """4 ranks = 2 replicas x 2: sequence-parallel pairs {0,1} {2,3}, data-parallel {0,2} {1,3}."""
    for rank, view in enumerate(worlds(4).run(mpu_view)):
        pair, replicas = [rank & ~1, rank | 1], [rank % 2, rank % 2 + 2]
        assert view["members"] == {"sequence_parallel": pair, "sequence_data_parallel": [0, 1, 2, 3],
                                   "data_parallel": replicas, "model_parallel": [rank]}
        assert view["sizes"] == {"sequence_parallel": 2, "sequence_data_parallel": 4,
                                 "data_parallel": 2, "model_parallel": 1}
        assert view["ranks"] == {"sequence_parallel": rank % 2, "sequence_data_parallel": rank,
                                 "data_parallel": rank // 2, "model_parallel": 0}
        assert view["dp ranks"] == replicas
        assert "the mesh's sequence-parallel size is 2, not 4" in view["refused"]
