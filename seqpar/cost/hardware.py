"""Hardware profiles for the cost model: spec sheets with their sources, and measured ones.

A `Profile` says what the model needs of a machine: the attention kernel's throughput on one
rank while every rank computes (FLOP/s forward and backward, per head dim, plus a per-call
overhead and the tile size its causal masking skips at), memory bandwidth (roofline and
elementwise work), links -- one per
rank inside a node, network cards shared by a node's ranks across nodes -- as latency +
bandwidth (alpha-beta), how much communication hides behind computation, and device memory.

Inside a node the fabric is either `switched` (NVSwitch, PCIe switches: a rank's port is shared
by all its peers, so two messages to two peers take the time of their sum) or `mesh` (a
point-to-point link to every peer, e.g. AMD Infinity Fabric: messages to different peers go in
parallel, but one peer gets one link). Across nodes a rank's flows share the node's network
cards with the node's other ranks.

Spec-sheet numbers are the vendors' (sources in the comments); what a real job achieves of them
is a modelling assumption stated once here: kernels reach `ATTENTION_FWD_EFFICIENCY` /
`ATTENTION_BWD_EFFICIENCY` of dense peak, links `LINK_EFFICIENCY` of their rate. Measured
profiles come from `seqpar.cost.calibrate` (saved as JSON, loaded with `Profile.load`).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

# Assumptions (not datasheet numbers). FlashAttention-3 (Shah et al. 2024) reports up to ~75%
# of H100 dense BF16 peak forward and less backward; FlashAttention-2 on A100 50-73% forward.
ATTENTION_FWD_EFFICIENCY = 0.6
ATTENTION_BWD_EFFICIENCY = 0.45
LINEAR_EFFICIENCY = 0.3  # chunked linear attention: small matmuls, elementwise decay
MATMUL_EFFICIENCY = 0.7  # large GEMMs (projections, MLP) reach ~70% of dense peak
# nccl-tests bus bandwidth typically reaches 75-85% of the NVLink / InfiniBand line rate.
LINK_EFFICIENCY = 0.8
GPU_KERNEL_OVERHEAD = 10e-6  # seconds per kernel launch
NVLINK_LATENCY = 10e-6  # seconds per NCCL point-to-point operation inside a node
IB_LATENCY = 20e-6  # seconds per message across nodes (RDMA + NCCL proxy)
# A pipelined ring collective pays one operation's latency, then a few microseconds per hop
# (nccl-tests' small-message all-gather latencies grow by ~2-5 us per rank).
COLLECTIVE_STEP_LATENCY = 3e-6


@dataclass(frozen=True)
class Link:
    """latency: seconds per message; bandwidth: bytes/s in one direction."""

    latency: float
    bandwidth: float

    def seconds(self, nbytes: float, messages: float = 1.0) -> float:
        return messages * self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Profile:
    """One machine type for the cost model (see the module docstring)."""

    name: str
    ranks_per_node: int
    intra: Link  # per rank port (switched) or per peer link (mesh), inside a node
    nic: Link  # one network card, across nodes
    nics_per_node: int
    attention_fwd_flops: tuple[tuple[int, float], ...]  # (head dim, FLOP/s) of one rank
    attention_bwd_flops: tuple[tuple[int, float], ...]
    linear_flops: float  # chunked linear attention, FLOP/s of one rank
    matmul_flops: float  # large matrix products (the rest of a transformer layer), FLOP/s
    memory_bandwidth: float  # bytes/s of one rank
    kernel_overhead: float  # seconds per kernel call
    tile: tuple[int, int]  # (query rows, keys) per tile: causal masking skips whole tiles
    overlap: float  # fraction of a transfer that hides behind computation beside it
    memory_bytes: float  # device memory of one rank
    fabric: str = "switched"
    collective_step_latency: float = COLLECTIVE_STEP_LATENCY  # per hop of a ring collective
    # Measured collectives (latency per message, bandwidth over the bytes a rank sends),
    # replacing the link-derived estimate: "all_to_all", "all_gather", "reduce_scatter".
    collectives: tuple[tuple[str, Link], ...] = ()
    # Measured host time of one seqpar.attention call that the schedule does not describe
    # (argument checks and their agreement all-reduce, Python, autograd): (backend, forward s,
    # backward s). Dominates short sequences on CPU; spec sheets leave it out (0).
    call_overhead: tuple[tuple[str, float, float], ...] = ()
    source: str = ""
    measured: dict = field(default_factory=dict, compare=False, hash=False)

    def attention_rate(self, head_dim: int, backward: bool) -> float:
        """FLOP/s at `head_dim`: interpolated in log2(head dim) between measured points."""
        points = sorted(self.attention_bwd_flops if backward else self.attention_fwd_flops)
        if head_dim <= points[0][0]:
            return points[0][1]
        for (d0, r0), (d1, r1) in zip(points, points[1:]):
            if head_dim <= d1:
                w = (math.log2(head_dim) - math.log2(d0)) / (math.log2(d1) - math.log2(d0))
                return r0 + w * (r1 - r0)
        return points[-1][1]

    def collective(self, kind: str) -> Link | None:
        return dict(self.collectives).get(kind)

    def overhead_of(self, backend: str) -> tuple[float, float]:
        """(forward, backward) seconds of `backend`'s measured call overhead; 0 if unmeasured."""
        for name, fwd, bwd in self.call_overhead:
            if name == backend:
                return fwd, bwd
        return 0.0, 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data["collectives"] = {kind: asdict(link) for kind, link in self.collectives}
        data["call_overhead"] = {name: [fwd, bwd] for name, fwd, bwd in self.call_overhead}
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Profile":
        data = dict(data)
        data["intra"], data["nic"] = Link(**data["intra"]), Link(**data["nic"])
        for key in ("attention_fwd_flops", "attention_bwd_flops"):
            data[key] = tuple((int(d), float(r)) for d, r in data[key])
        data["tile"] = tuple(data["tile"])
        data["collectives"] = tuple((kind, Link(**link))
                                    for kind, link in data.get("collectives", {}).items())
        data["call_overhead"] = tuple((name, float(fwd), float(bwd))
                                      for name, (fwd, bwd) in data.get("call_overhead", {}).items())
        return cls(**data)

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2))
        return path

    @classmethod
    def load(cls, path) -> "Profile":
        return cls.from_json(json.loads(Path(path).read_text()))

    def with_(self, **changes) -> "Profile":
        return replace(self, **changes)


def _gpu(name: str, bf16_dense: float, hbm_bandwidth: float, memory: float, link: Link,
         nic_bits_per_s: float, nics: int, source: str, fabric: str = "switched") -> Profile:
    return Profile(
        name=name, ranks_per_node=8, intra=link,
        nic=Link(IB_LATENCY, LINK_EFFICIENCY * nic_bits_per_s / 8), nics_per_node=nics,
        attention_fwd_flops=((64, 0.8 * ATTENTION_FWD_EFFICIENCY * bf16_dense),
                             (128, ATTENTION_FWD_EFFICIENCY * bf16_dense)),
        attention_bwd_flops=((64, 0.8 * ATTENTION_BWD_EFFICIENCY * bf16_dense),
                             (128, ATTENTION_BWD_EFFICIENCY * bf16_dense)),
        linear_flops=LINEAR_EFFICIENCY * bf16_dense, matmul_flops=MATMUL_EFFICIENCY * bf16_dense,
        memory_bandwidth=hbm_bandwidth,
        kernel_overhead=GPU_KERNEL_OVERHEAD, tile=(128, 128), overlap=1.0, memory_bytes=memory,
        fabric=fabric, source=source)


def _nvlink(bidirectional_bytes_per_s: float) -> Link:
    return Link(NVLINK_LATENCY, LINK_EFFICIENCY * bidirectional_bytes_per_s / 2)


# Spec sheets. Head dim 64 runs at 80% of head dim 128 (smaller matmuls per tile): assumption.
SPEC_SHEETS: dict[str, Profile] = {
    # NVIDIA H100 SXM5 datasheet: BF16 dense 989 TFLOPS (1,979 with sparsity), 80 GB HBM3 at
    # 3.35 TB/s, NVLink 4 900 GB/s per GPU (both directions) through NVSwitch; DGX H100: 8 GPUs,
    # 8 x ConnectX-7 400 Gb/s InfiniBand NDR, one per GPU.
    "h100-sxm": _gpu("h100-sxm", 989e12, 3.35e12, 80e9, _nvlink(900e9), 400e9, 8,
                     "NVIDIA H100 SXM5 + DGX H100 datasheets"),
    # NVIDIA H200 SXM datasheet: BF16 dense 989 TFLOPS, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s;
    # HGX H200 nodes: 8 GPUs, 400 Gb/s NDR InfiniBand per GPU.
    "h200-sxm": _gpu("h200-sxm", 989e12, 4.8e12, 141e9, _nvlink(900e9), 400e9, 8,
                     "NVIDIA H200 SXM datasheet, HGX H200 with 8 x 400 Gb/s NDR"),
    # NVIDIA A100 SXM4 80GB datasheet: BF16 dense 312 TFLOPS, HBM2e 2,039 GB/s, NVLink 3 600 GB/s;
    # DGX A100: 8 x ConnectX-6 200 Gb/s HDR InfiniBand (the LASP-2 paper's cluster type).
    "a100-sxm": _gpu("a100-sxm", 312e12, 2.039e12, 80e9, _nvlink(600e9), 200e9, 8,
                     "NVIDIA A100 SXM4 80GB + DGX A100 datasheets"),
    # NVIDIA A100 PCIe 80GB datasheet: BF16 dense 312 TFLOPS, HBM2e 1,935 GB/s, PCIe Gen4 x16
    # 64 GB/s (both directions) and no NVLink: GPUs talk through PCIe switches. Node: 8 GPUs and
    # 2 x 200 Gb/s network cards (a typical PCIe server; assumption).
    "pcie-a100": _gpu("pcie-a100", 312e12, 1.935e12, 80e9,
                      Link(2 * NVLINK_LATENCY, LINK_EFFICIENCY * 64e9 / 2), 200e9, 2,
                      "NVIDIA A100 PCIe 80GB datasheet; 8 GPUs + 2 NICs per node assumed"),
    # AMD Instinct MI300X datasheet: BF16 dense 1,307 TFLOPS, 192 GB HBM3 at 5.3 TB/s, 7 Infinity
    # Fabric links of 128 GB/s (both directions) -- a full mesh of 8 GPUs, the topology TokenRing
    # is designed for; 8 x 400 Gb/s network cards per node.
    "mi300x-mesh": _gpu("mi300x-mesh", 1307e12, 5.3e12, 192e9, _nvlink(128e9), 400e9, 8,
                        "AMD Instinct MI300X datasheet (7 x 128 GB/s Infinity Fabric links)",
                        fabric="mesh"),
}

# This project's CPU machines (gloo over loopback, PyTorch's fused CPU flash op, one rank per
# core): `python -m seqpar.cost calibrate --ranks 2` on the 2-core development VM, typical values
# of several runs, rounded (a shared machine: every run differs). The causal tiles (256 query
# rows, 512 keys) are those of PyTorch's CPU flash attention (FlashAttentionKernel.cpp: q split
# 256 for long queries, kv split 512). gloo's collectives are measured apart: its all-gather and
# reduce-scatter are several times slower than its point-to-point sends.
CPU_DEFAULT = Profile(
    name="cpu-gloo", ranks_per_node=64, intra=Link(5e-4, 0.8e9), nic=Link(5e-4, 0.8e9),
    nics_per_node=1, attention_fwd_flops=((32, 25e9), (64, 30e9), (128, 35e9)),
    attention_bwd_flops=((32, 25e9), (64, 30e9), (128, 32e9)), linear_flops=5e9,
    matmul_flops=45e9, memory_bandwidth=12e9, kernel_overhead=1.2e-4, tile=(256, 512),
    overlap=0.0, memory_bytes=12e9,
    collectives=(("all_to_all", Link(1e-3, 1e9)), ("all_gather", Link(5e-4, 0.45e9)),
                 ("reduce_scatter", Link(8e-4, 0.25e9))),
    source="calibrate() with 2 gloo ranks on the 2-core development VM (typical, rounded)")

_active: contextvars.ContextVar[Profile | None] = contextvars.ContextVar("seqpar_cost_profile",
                                                                         default=None)


@contextlib.contextmanager
def use_profile(profile: Profile | str) -> Iterator[Profile]:
    """Use `profile` (a Profile or a SPEC_SHEETS name) for backend="auto" inside the block
    (a context variable, like `kernels.use_kernel`). Every rank must use the same profile."""
    if isinstance(profile, str):
        if profile not in SPEC_SHEETS:
            raise ValueError(f"use_profile: unknown profile {profile!r}; choose one of "
                             f"{sorted(SPEC_SHEETS)} or pass a Profile")
        profile = SPEC_SHEETS[profile]
    if not isinstance(profile, Profile):
        raise TypeError(f"use_profile: expected a Profile or a name, got {type(profile).__name__}")
    token = _active.set(profile)
    try:
        yield profile
    finally:
        _active.reset(token)


def profile_for(device: torch.device) -> Profile:
    """The profile backend="auto" uses: the one set with `use_profile`, else the spec sheet of
    the CUDA device's model (H100 / H200 / A100 / MI300X; other GPUs: PCIe A100), else the CPU
    default."""
    chosen = _active.get()
    if chosen is not None:
        return chosen
    if device.type != "cuda":
        return CPU_DEFAULT
    name = torch.cuda.get_device_name(device)
    for key, profile in (("H200", "h200-sxm"), ("H100", "h100-sxm"), ("MI300", "mi300x-mesh")):
        if key in name:
            return SPEC_SHEETS[profile]
    if "A100" in name and "PCIe" not in name:
        return SPEC_SHEETS["a100-sxm"]
    return SPEC_SHEETS["pcie-a100"]
