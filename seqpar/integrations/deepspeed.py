"""DeepSpeed with seqpar's sequence parallelism: an `mpu` over a `seqpar.SPMesh`.

    mesh = seqpar.SPMesh(dp=2)                      # e.g. 4 ranks: 2 sequence-parallel pairs
    hf.apply(model, mesh, backend="ring")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                      mpu=SequenceParallelMPU(mesh))
    local = hf.shard_batch(batch_of_this_replica, mesh)
    loss = hf.loss(engine(input_ids=local["input_ids"],
                          position_ids=local["position_ids"]).logits, local, mesh)
    engine.backward(loss)
    engine.step()

An mpu is DeepSpeed's name for the object that knows a job's parallel groups. What DeepSpeed
(0.19) does with this one:

* gradients are reduced over the sequence x data group (`get_sequence_data_parallel_group`:
  the whole mesh) and divided by the data-parallel size: summed over the P sequence-parallel
  ranks -- each holds its share of the gradient of its group's mean loss (`hf.loss`) -- and
  averaged over the D replicas; ZeRO stages 1 and 2 partition gradients and optimizer state
  over all D x P ranks the same way;
* its batch arithmetic and data sampler use the data-parallel axis (`get_data_parallel_*`):
  the ranks of one sequence-parallel group read the same sample;
* `initialize_sequence_parallel` is present because DeepSpeed keys on it (its own
  sequence-parallel mpu has it) to treat parameters as replicated, not tensor-parallel. The
  groups already exist -- they are the mesh's -- so calling it only checks the size;
* the model-parallel size is 1 (parameters are whole on every rank), with a one-rank group for
  the norm and overflow reductions that take one.
"""

from __future__ import annotations

import torch.distributed as dist

from ..comm.primitives import GroupInfo
from ..mesh import SPMesh


class SequenceParallelMPU:
    """DeepSpeed's `mpu` for a `seqpar.SPMesh` (module docstring). Rank queries are in the
    group's own numbering; groups of one rank are returned as one-rank process groups."""

    def __init__(self, mesh: SPMesh):
        if not isinstance(mesh, SPMesh):
            raise TypeError(f"SequenceParallelMPU needs a seqpar.SPMesh, got "
                            f"{type(mesh).__name__}; build one with seqpar.SPMesh(dp=D) "
                            f"(collective)")
        self.mesh = mesh
        self._alone: dist.ProcessGroup | None = None

    def _solo(self) -> dist.ProcessGroup:
        """A process group of this rank alone (made on first use; only this rank takes part)."""
        if self._alone is None:
            self._alone = dist.new_group([dist.get_rank()], use_local_synchronization=True)
        return self._alone

    def _group(self, info: GroupInfo) -> dist.ProcessGroup:
        return info.group if info.group is not None else self._solo()

    # -- the sequence-parallel group: one sequence, sharded
    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        if sequence_parallel_size != self.mesh.sp_size:
            raise ValueError(f"SequenceParallelMPU: the mesh's sequence-parallel size is "
                             f"{self.mesh.sp_size}, not {sequence_parallel_size}; build the "
                             f"SPMesh with the size you want")

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self._group(self.mesh.info)

    def get_sequence_parallel_world_size(self) -> int:
        return self.mesh.sp_size

    def get_sequence_parallel_rank(self) -> int:
        return self.mesh.info.rank

    # -- the whole mesh: where gradients are reduced and ZeRO partitions
    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self._group(self.mesh.dp_sp)

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.mesh.dp_sp.world

    def get_sequence_data_parallel_rank(self) -> int:
        return self.mesh.dp_sp.rank

    # -- the data-parallel axis: replicas reading different samples
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._group(self.mesh.dp)

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp_size

    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp.rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [self.mesh.dp_sp.global_rank(r)
                for r in range(self.mesh.info.rank, self.mesh.dp_sp.world, self.mesh.sp_size)]

    # -- no tensor / model parallelism: parameters are whole on every rank
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._solo()

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def __repr__(self) -> str:
        return f"SequenceParallelMPU({self.mesh!r})"


__all__ = ["SequenceParallelMPU"]
