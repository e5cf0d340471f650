"""Padding costs nothing: a padded batch through `hf.shard_batch` (pads dropped, rows packed
into documents) against the same batch with its padding treated as tokens.

    python -m benchmarks.padding                      # 4 CPU ranks, 25% padding, ring
    python -m benchmarks.padding --world 2 --rows 2 --seq 64 --hidden 32 --repeats 1  # toy

One training step (forward + backward of a tiny random-init Llama, `hf.loss`) of B rows of S
tokens whose real lengths fall linearly from S to S/2 (25% padding for B >= 2; odd rows padded
on the left, even rows on the right), sequence-parallel over P ranks:

* `packed`  -- shard_batch(input_ids, labels, attention_mask): the 0.75 B S real tokens as one
  row of documents, no pad token computed on;
* `as tokens` -- the same ids with an all-ones mask: B rows of S tokens, pads computed like
  any token (what a model that cannot drop padding pays).

The ratio packed / as-tokens is the cost of padding removed (ideal 0.75 for the linear layers;
attention falls further, by the sum of the squared row lengths). Time is the median over
`--repeats` steps of the slowest rank. Prints the machine header and a table, writes JSON.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

from benchmarks.common import header_text, launch, machine, start_rank, table, timed, write_json

MODES = ("packed", "as tokens")


def padded_batch(rows: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows whose real lengths fall linearly from seq to seq / 2, alternately right and left
    padded; pads are unlabelled, and so is a left-padded row's first real token."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=gen)
    mask = torch.zeros_like(ids)
    for row in range(rows):
        real = seq - (seq // 2 * row // (rows - 1) if rows > 1 else 0)
        if row % 2:
            mask[row, seq - real:] = 1
        else:
            mask[row, :real] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for row in range(1, rows, 2):
        labels[row, int((mask[row] == 0).sum())] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _worker(config: dict) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar.integrations import hf

    rank, world, device, dtype = start_rank(config)
    model_config = LlamaConfig(vocab_size=config["vocab"], hidden_size=config["hidden"],
                               intermediate_size=2 * config["hidden"],
                               num_hidden_layers=config["layers"],
                               num_attention_heads=config["heads"],
                               num_key_value_heads=config["heads"] // 2,
                               max_position_embeddings=config["seq"], use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config).to(dtype)
    hf.apply(model, None, backend=config["backend"], layout=config["layout"])
    data = padded_batch(config["rows"], config["seq"], config["vocab"])
    batches = {"packed": data,
               "as tokens": {"input_ids": data["input_ids"], "labels": data["input_ids"]}}
    rows = []
    for mode in MODES:
        local = hf.shard_batch(batches[mode], None, layout=config["layout"])

        def step():
            model.zero_grad(set_to_none=True)
            loss = hf.loss(model(**local).logits, local)
            loss.backward()
            return loss

        step()  # warm-up
        times = []
        for _ in range(config["repeats"]):
            dist.barrier()
            times.append(timed(step, device))
        slowest = torch.tensor(times)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        tokens = local["input_ids"].numel() * world
        rows.append({"mode": mode, "P": world, "rows": config["rows"], "S": config["seq"],
                     "tokens": tokens, "real": int(data["attention_mask"].sum()),
                     "seconds": statistics.median(slowest.tolist()), "times": slowest.tolist()})
    base = rows[1]["seconds"]
    for row in rows:
        row["vs_tokens"] = row["seconds"] / base
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--backend", default="ring")
    parser.add_argument("--layout", default="zigzag")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    info = machine()
    print(header_text(info), flush=True)
    config = {**vars(args), "dtype": "float32",
              "threads": max(1, (info["cores"] or 1) // args.world)}
    rows = launch(args.world, _worker, config)
    padding = 1 - rows[0]["real"] / (args.rows * args.seq)
    print(f"# one training step (fwd+bwd), tiny Llama hidden {args.hidden} x {args.layers} "
          f"layers, fp32, {args.backend}/{args.layout}, P={args.world}, {args.rows} rows x "
          f"{args.seq}, {padding:.0%} padding; median of {args.repeats}, slowest rank")
    print(table(rows, [("mode", "batch", "s"), ("tokens", "tokens computed", "d"),
                       ("seconds", "step s", ".3f"), ("vs_tokens", "vs padding as tokens",
                                                      ".2f")]))
    path = write_json("padding", {"machine": info, "args": vars(args), "padding": padding,
                                  "rows": rows}, args.out)
    print(f"# wrote {path}")
    return rows


if __name__ == "__main__":
    main()
