"""Train a tiny Llama on Lewis Carroll's two Alice books (bytes as tokens) with seqpar sequence
parallelism -- and data parallelism when asked -- surviving crashes.

    python -m seqpar.launch --nproc-per-node 2 -m examples.train_llama            # 2-rank SP
    python -m seqpar.launch --nproc-per-node 4 -m examples.train_llama --dp 2     # 2 x 2-rank SP
    torchrun --nproc-per-node 2 --max-restarts 3 -m examples.train_llama --ckpt-dir ckpt
    mpirun -n 2 python -m examples.train_llama                                   # (mpi extra)
    python -m seqpar.launch --nproc-per-node 2 -m examples.train_llama --packed   # documents

Every rank joins with `seqpar.launch.init()` (torchrun, mpirun, srun or one process), builds the
same model from one seed, and `seqpar.SPMesh(dp=D)` splits the ranks into D sequence-parallel
groups. At step t, replica d trains on `--batch` windows of `--seq-len` bytes at offsets drawn
from (seed, t) -- never from what ran before, so a resumed run sees exactly the batches an
uninterrupted one does. Its group shards them with `seqpar.integrations.hf` (labels shifted
before sharding, global RoPE positions), the loss is the group's mean next-byte loss, and
`hf.sync_grads` sums gradients over the group and averages them over the replicas.

`--packed` trains on packed documents instead, as transformers' DataCollatorWithFlattening
makes them: the books are cut into their chapters (one document per chapter), and each step's
row of `--batch` x `--seq-len` bytes is filled with pieces of chapters drawn from (seed, step)
-- each piece from one chapter, its positions restarting at 0 and its first byte unlabelled.
`hf.shard_batch` finds the documents from the restarts; every attention layer then keeps each
piece to itself.

Checkpoints (`--ckpt-dir`, every `--ckpt-every` steps): rank 0 writes model, optimizer, the
number of steps done and their losses to a temporary file beside the checkpoint, syncs it to
disk and renames it over the old one (`os.replace`, atomic): a crash at any moment leaves the
previous checkpoint whole. On start every rank loads the checkpoint, if there is one, checks
that all ranks read the same one, and continues with the next step: no step is lost, none is
committed twice (steps that ran after the last checkpoint are recomputed, bit for bit).

Rank 0 shows a progress bar and prints the loss of every step; `--events FILE` appends one JSON
line per event (start of a rank, step, checkpoint, end) and `--out FILE` gets the final result
as JSON -- the test reads both. (Options are named so that none is a prefix of a torchrun
option: torchrun's parser would take `--log` for its own `--log-dir`.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

import seqpar
from seqpar.integrations import hf
from seqpar.launch import init

DATA = Path(__file__).resolve().parent / "data"
# The corpus, in this order: a fixed order gives every run (and every rank) the same bytes.
TEXTS = (DATA / "alice.txt", DATA / "looking_glass.txt")
CHECKPOINT = "checkpoint.pt"


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="total optimizer steps")
    parser.add_argument("--seq-len", type=int, default=512, help="bytes per sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences per replica and step")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas (divides ranks)")
    parser.add_argument("--ulysses", type=int, default=1, help="Ulysses degree (backend usp)")
    parser.add_argument("--backend", default="ring", choices=sorted(seqpar.BACKENDS))
    parser.add_argument("--layout", default="zigzag", choices=seqpar.LAYOUTS + ("balanced",))
    parser.add_argument("--packed", action="store_true",
                        help="packed chapter pieces (documents) instead of windows of the text")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint folder (resume)")
    parser.add_argument("--ckpt-every", type=int, default=10)
    parser.add_argument("--events", type=Path, default=None, help="append JSON-lines events here")
    parser.add_argument("--out", type=Path, default=None, help="final result as JSON (rank 0)")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout, s")
    return parser.parse_args(argv)


def build_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         max_position_embeddings=args.seq_len, use_cache=False)
    torch.manual_seed(args.seed)  # the same weights on every rank
    return LlamaForCausalLM(config)


def batch_of(text: torch.Tensor, args: argparse.Namespace, step: int, replica: int) -> torch.Tensor:
    """Replica `replica`'s windows at `step`: a function of (seed, step) only."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, text.numel() - args.seq_len, (args.dp * args.batch,), generator=gen)
    mine = starts[replica * args.batch:(replica + 1) * args.batch]
    return torch.stack([text[s:s + args.seq_len] for s in mine.tolist()])


def chapters() -> list[torch.Tensor]:
    """The books' chapters, each a document of bytes (from its CHAPTER line to the next)."""
    documents = []
    for path in TEXTS:
        text = path.read_bytes()
        starts = [i for i in range(len(text)) if text.startswith(b"CHAPTER", i)
                  and (i == 0 or text[i - 1:i] == b"\n")]
        for a, b in zip(starts, starts[1:] + [len(text)]):
            documents.append(torch.frombuffer(bytearray(text[a:b]), dtype=torch.uint8).long())
    return documents


def packed_batch_of(documents: list[torch.Tensor], args: argparse.Namespace, step: int,
                    replica: int) -> dict[str, torch.Tensor]:
    """Replica `replica`'s packed row at `step` (a function of (seed, step) only): pieces of
    chapters, DataCollatorWithFlattening-style -- position_ids restart at each piece, whose
    first byte has no label."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    length = args.batch * args.seq_len
    rows = []
    for _ in range(args.dp):  # every replica's row drawn in order: the same on every rank
        pieces, filled = [], 0
        while filled < length:
            chapter = documents[int(torch.randint(len(documents), (1,), generator=gen))]
            size = min(int(torch.randint(length // 8, length // 2 + 1, (1,), generator=gen)),
                       length - filled, chapter.numel())
            start = int(torch.randint(chapter.numel() - size + 1, (1,), generator=gen))
            pieces.append(chapter[start:start + size])
            filled += size
        rows.append(pieces)
    pieces = rows[replica]
    ids = torch.cat(pieces)[None]
    positions = torch.cat([torch.arange(p.numel()) for p in pieces])[None]
    labels = ids.masked_fill(positions == 0, hf.IGNORE_INDEX)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def corpus() -> bytes:
    """The books of TEXTS, each ending in a newline, one blank line between them."""
    return b"\n".join(path.read_bytes() for path in TEXTS)


def save_checkpoint(folder: Path, state: dict) -> None:
    """Atomically: a temporary file in the same folder, synced, renamed over the old one."""
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f"{CHECKPOINT}.tmp{os.getpid()}"
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, folder / CHECKPOINT)


def load_checkpoint(folder: Path | None) -> dict | None:
    path = folder / CHECKPOINT if folder else None
    if path is None or not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def agreed_start(state: dict | None) -> int:
    """The step every rank resumes from; all ranks must have read the same checkpoint."""
    done = torch.tensor([state["step"] if state else 0], dtype=torch.int64)
    low, high = done.clone(), done.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if low.item() != high.item():
        raise RuntimeError(f"ranks read different checkpoints (steps {low.item()} .. "
                           f"{high.item()}); is --ckpt-dir the same shared folder everywhere?")
    return int(done.item())


class EventLog:
    """JSON lines, one per event, appended and flushed at once (lines from several ranks
    interleave whole)."""

    def __init__(self, path: Path | None, job):
        self.path, self.job = path, job

    def __call__(self, event: str, **fields) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "rank": self.job.rank, "pid": os.getpid(),
                           "restart": self.job.restart, "time": time.time(), **fields})
        with open(self.path, "a") as file:
            file.write(line + "\n")


def train(args: argparse.Namespace) -> dict:
    job = init(timeout=args.timeout)
    if job.device.type == "cpu":  # the same thread count whichever launcher started us
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.local_world))
    log = EventLog(args.events, job)
    log("start", launcher=job.launcher, world=job.world)
    mesh = seqpar.SPMesh(ulysses=args.ulysses, dp=args.dp)
    model = build_model(args).to(job.device)
    hf.apply(model, mesh, backend=args.backend, layout=args.layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    state = load_checkpoint(args.ckpt_dir)
    start = agreed_start(state)
    losses: list[list] = []  # [step, loss] of every committed step
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        losses = state["losses"]
    if job.is_main and args.ckpt_dir is not None:
        for stale in args.ckpt_dir.glob(f"{CHECKPOINT}.tmp*"):
            stale.unlink()  # a write the crash interrupted
    log("resume", step=start)

    text = torch.frombuffer(bytearray(corpus()), dtype=torch.uint8).long()
    documents = chapters() if args.packed else []
    progress = None
    if job.is_main:
        from tqdm import tqdm
        progress = tqdm(total=args.steps, initial=start, desc="train", unit="step")
    for step in range(start, args.steps):
        if args.packed:
            data = {name: t.to(job.device)
                    for name, t in packed_batch_of(documents, args, step, mesh.dp.rank).items()}
        else:
            ids = batch_of(text, args, step, mesh.dp.rank).to(job.device)
            data = {"input_ids": ids, "labels": ids}
        local = hf.shard_batch(data, mesh, layout=args.layout)
        # The model's body on this rank's tokens (a packed batch's documents reach the layers
        # through `local`), then lm_head + cross entropy over sequence tiles: the full
        # [tokens, vocab] logits never exist (hf.loss(model(**local).logits, ...) is the same).
        loss = hf.lm_loss(model, local, mesh)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        hf.sync_grads(model, mesh)
        optimizer.step()
        mean = loss.detach().clone()  # the replicas' mean of their groups' mean losses
        if mesh.dp_size > 1:
            dist.all_reduce(mean, group=mesh.get_group("dp"))
            mean /= mesh.dp_size
        losses.append([step, mean.item()])
        if progress is not None:
            progress.update(1)
            progress.write(f"step {step + 1}/{args.steps}  loss {losses[-1][1]:.4f}")
            log("step", step=step, loss=losses[-1][1])
        done = step + 1
        if args.ckpt_dir is not None and job.is_main and (done % args.ckpt_every == 0
                                                          or done == args.steps):
            save_checkpoint(args.ckpt_dir, {"step": done, "model": model.state_dict(),
                                            "optimizer": optimizer.state_dict(),
                                            "losses": losses})
            log("checkpoint", step=done)
    if progress is not None:
        progress.close()
    result = {"losses": losses, "resumed_from": start, "world": job.world, "dp": mesh.dp_size,
              "sp": mesh.sp_size, "backend": args.backend, "launcher": job.launcher,
              "packed": args.packed}
    if job.is_main and args.out is not None:
        args.out.write_text(json.dumps(result))
    log("end", steps=len(losses))
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    train(arguments())
