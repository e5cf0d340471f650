"""Memory beyond attention: a whole training step of a Llama-shaped model on 4 CPU ranks, with
seqpar's memory savers switched on one after the other, beside DeepSpeed ALST.

    python -m benchmarks.long_context                       # S = 4K 8K 16K 32K, budget 5 GiB
    python -m benchmarks.long_context --seqs 4096 8192 --variants a b c d alst
    python -m benchmarks.long_context --smoke               # toy size, seconds (the test's run)

Model: LlamaForCausalLM, hidden 512, 4 layers, 8 heads, 2 K/V heads, intermediate 1536, vocab
32000, fp32, random init, untied embeddings; Adam. One step = shard the batch, forward,
backward, `hf.sync_grads`, `optimizer.step()`. Variants (seqpar ring attention, zigzag):

    a   today's path: logits = model(...).logits; hf.loss(logits, ...)
    b   + tiled loss: hf.lm_loss(model, ...)
    c   + tiled MLP: hf.enable_memory_savers(model, tiled_mlp=True, checkpoint=False)
    d   + checkpointing of every decoder layer (checkpoint=True)
    alst  the peer, DeepSpeed ALST: UlyssesSPAttentionHF (registered over transformers' sdpa),
        DeepSpeed's TiledMLP + transformers' checkpointing (the same pieces seqpar uses for c, d)
        and DeepSpeed's TiledFusedLogitsLoss (contiguous shards, as its data loader adapter)

Per (variant, S): the peak resident memory of each rank during the step (absolute: process,
model, gradients, Adam states, activations; `benchmarks.common.peak_memory` plus the resident
set at entry), the step time (slowest rank), the loss (every variant must agree) and the
whole-step model's prediction (`seqpar.cost.training_memory`). Per variant: a least-squares line
peak = fixed + slope * S over the measured S (slope in bytes per token of the global sequence,
per rank), the longest S that fits --budget-gib from it (none when the peak does not rise by
16 MiB over the measured S: then the fixed part -- model states and the optimizer step -- is the
peak and activations stay under it), and the model's longest S.
A (variant, S) the model predicts above this machine's free memory is skipped and marked.

The confirming run (`--window W`): variant (d) once more, at the longest S the fit predicts for
--budget-gib (rounded down to a multiple of 2 x world; the cost model's longest S when the fit is
flat), or at an explicit --seq, with every attention layer on a sliding window of W tokens so the
run takes minutes, not hours: the model is then MistralForCausalLM -- Llama's architecture and
parameters, plus `sliding_window`, which `hf.apply` hands to `seqpar.attention(window=)` -- of
the same shape. Attention memory is linear in S with or without the window, so the window
changes the time, not the memory the fit measured. `--confirm-variants d alst` runs ALST at
that S too: the same model, its inner attention (after its all-to-all) on seqpar's windowed
kernel over one rank's heads (ALST drops attention masks and relies on its core kernel's window,
flash-attention's on a GPU; CPU sdpa has none). The fit comes from the sweep run first in the
same call (--seqs, --variants must include d), or from a previous run's JSON (--fit-from),
and the run reports its measured peak per rank beside the fit's and the cost model's
predictions, and its time:

    python -m benchmarks.long_context --window 1024                  # sweep, fit, confirm
    python -m benchmarks.long_context --window 1024 --fit-from benchmarks/results/long_context-....json
    python -m benchmarks.long_context --window 1024 --seq 262144     # confirm at this S

The million-token hybrid step (`--million`) is `benchmarks.million` (its options follow
--million: --seq, --world, --loss-tile, --mlp-tile, ...).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.common import (header_text, launch, machine, markdown_table, peak_memory,
                               results_stem, save_figure, start_rank, table, write_csv)

VARIANTS = ("a", "b", "c", "d", "alst")
NAMES = {"a": "a: today (full logits)", "b": "b: + tiled loss", "c": "c: + tiled MLP",
         "d": "d: + checkpointing", "alst": "DeepSpeed ALST (ulysses)"}
MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2)
SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=8, num_key_value_heads=2)
DEFAULT_SEQS = (4096, 8192, 16384, 32768)
SMOKE_SEQS = (256, 512)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _model(config: dict, attn: str):
    """Llama of config["model"]; with config["window"], Mistral of the same shape and that
    sliding window (Llama's architecture and parameter names, plus the window)."""
    import transformers

    window = config.get("window")
    kind = "Llama" if window is None else "Mistral"
    extra = {} if window is None else {"sliding_window": window}
    cfg = getattr(transformers, f"{kind}Config")(
        **config["model"], **extra, max_position_embeddings=max(config["seqs"]),
        use_cache=False, tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    return getattr(transformers, f"{kind}ForCausalLM")(cfg).train()


def _data(seq: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seq))
    return {"input_ids": ids, "labels": ids.clone()}


def _alst_loss(model, local: dict, tile_tokens: int):
    """ALST's loss: TiledFusedLogitsLoss over this rank's shard, each shard's sum divided by the
    global number of labelled tokens inside the loss function (so the lm_head gradient it
    writes during the forward has the right scale), then summed over ranks for the value."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    labels = local["shift_labels"]
    count = (labels != -100).sum().double()
    dist.all_reduce(count)
    hidden = model.model(input_ids=local["input_ids"], position_ids=local["position_ids"],
                         use_cache=False).last_hidden_state
    vocab = model.config.vocab_size

    def loss_fn(head, x, y):
        return F.cross_entropy(head(x).float().view(-1, vocab), y.view(-1), ignore_index=-100,
                               reduction="sum") / count.float()

    shards = max(1, math.ceil(labels.numel() / tile_tokens))
    loss = TiledFusedLogitsLoss.apply(loss_fn, model.lm_head, hidden, labels, None, shards,
                                      [model.lm_head.weight], "sum")
    value = loss.detach().clone()
    dist.all_reduce(value)
    return loss, value


def _step(variant: str, model, optimizer, data: dict, tile_tokens: int) -> float:
    from seqpar.integrations import hf

    if variant == "alst":
        local = hf.shard_batch(data, None, layout="contiguous")
        loss, value = _alst_loss(model, local, tile_tokens)
        loss.backward()
    else:
        local = hf.shard_batch(data, None, layout="zigzag")
        if variant == "a":
            logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
            loss = hf.loss(logits, local)
        else:
            loss = hf.lm_loss(model, local, tile_tokens=tile_tokens)
        loss.backward()
        value = loss.detach()
    hf.sync_grads(model)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value.item()


ALST_WINDOW_ATTENTION = "seqpar-local-window"


def _register_local_window_attention(world: int) -> None:
    """ALST's inner attention for a windowed model on CPU: one rank's heads over the whole
    gathered sequence through seqpar.attention on a one-rank group (causal, the layer's
    `sliding_window`), registered with a mask builder that builds nothing. Why: ALST drops the
    attention mask and relies on the core kernel's own masking (flash-attention's window on a
    GPU); CPU sdpa has no window, so with "sdpa" ALST would compute full causal attention -- a
    different model, and days at 441K -- while transformers would still build an S_loc^2 mask."""
    import seqpar
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    solo = [dist.new_group([r]) for r in range(world)][dist.get_rank()]  # every rank makes each

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  sliding_window=None, **_):
        out = seqpar.attention(*(t.transpose(1, 2) for t in (query, key, value)), group=solo,
                               causal=True, scale=scaling, layout="contiguous",
                               window=sliding_window)
        return out, None

    AttentionInterface.register(ALST_WINDOW_ATTENTION, attention)
    AttentionMaskInterface.register(ALST_WINDOW_ATTENTION, lambda *args, **kwargs: None)


def _prepare(variant: str, config: dict, world: int, alst_state: dict):
    from seqpar.integrations import hf

    if variant == "alst":
        # the full-causal sweep runs ALST over transformers' sdpa; a windowed model over the
        # mask-free windowed kernel (_register_local_window_attention)
        core = "sdpa" if config.get("window") is None else ALST_WINDOW_ATTENTION
        if not alst_state and core == ALST_WINDOW_ATTENTION:
            _register_local_window_attention(world)  # before a model names it
        model = _model(config, core)
        if not alst_state:  # once per process: it wraps transformers' `core` entry in place
            import deepspeed
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
            deepspeed.init_distributed(dist_backend="gloo")  # its comm layer, over our group
            UlyssesSPAttentionHF.register_with_transformers(
                model, core_attn_implementation=core, sequence_parallel_size=world,
                micro_batch_size=1, seq_length_is_variable=True)
            alst_state["registered"] = True
        hf.enable_memory_savers(model, tiled_mlp=True, checkpoint=True)
    else:
        model = _model(config, "sdpa")
        hf.apply(model, None, backend="ring", layout="zigzag")
        if variant in ("c", "d"):
            hf.enable_memory_savers(model, tiled_mlp=True, checkpoint=variant == "d")
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def _worker(config: dict) -> list[dict]:
    from tqdm import tqdm

    rank, world, device, _ = start_rank(config)
    import transformers  # noqa: F401 - part of the runtime every variant pays
    runtime = torch.tensor([_rss_kib("VmRSS") * 1024.0], dtype=torch.float64)
    dist.all_reduce(runtime, op=dist.ReduceOp.MAX)
    alst_state: dict = {}
    rows = []
    plan = [(v, s) for v in config["variants"] for s in config["seqs"]]
    bar = tqdm(plan, desc="long_context", unit="step", disable=rank != 0, file=sys.stderr)
    warmed = set()
    for variant, seq in bar:
        bar.set_postfix(variant=variant, S=seq)
        row = {"variant": variant, "name": NAMES[variant], "S": seq, "P": world,
               "runtime_gib": runtime.item() / 2 ** 30}
        if seq in config["skip"].get(variant, ()):
            rows.append({**row, "note": "skipped: predicted above this machine's memory"})
            continue
        try:
            if variant not in warmed:  # first-call costs (threads, gloo buffers) off the clock
                model, opt = _prepare(variant, config, world, alst_state)
                warm = config.get("warm_seq") or config["seqs"][0] // 4 or 8 * world
                _step(variant, model, opt, _data(warm, config["model"]["vocab_size"]),
                      config["tile_tokens"])
                del model, opt
                warmed.add(variant)
            gc.collect()
            model, opt = _prepare(variant, config, world, alst_state)
            data = _data(seq, config["model"]["vocab_size"])
            dist.barrier()
            with peak_memory(device) as peak:
                base = _rss_kib("VmRSS") * 1024
                start = time.perf_counter()
                loss = _step(variant, model, opt, data, config["tile_tokens"])
                seconds = time.perf_counter() - start
            del model, opt, data
            measured = torch.tensor([seconds, float(base + peak.bytes)], dtype=torch.float64)
            dist.all_reduce(measured, op=dist.ReduceOp.MAX)
            rows.append({**row, "seconds": measured[0].item(),
                         "peak_gib": measured[1].item() / 2 ** 30, "loss": loss})
        except Exception as error:  # noqa: BLE001 - a failing peer is a row, not a crash
            where = traceback.extract_tb(error.__traceback__)[-1]
            rows.append({**row, "note": f"failed: {type(error).__name__}: {error} (at "
                                        f"{where.filename.split('site-packages/')[-1]}:"
                                        f"{where.lineno} {where.line})"[:400]})
            if dist.is_initialized():
                dist.barrier()
    dist.destroy_process_group()
    return rows


# ---------------------------------------------------------------- analysis (rank-free)

def _fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least squares peak = fixed + slope * S: (slope bytes/token, fixed bytes)."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(s for s, _ in points) / n
    my = sum(b for _, b in points) / n
    var = sum((s - mx) ** 2 for s, _ in points)
    slope = sum((s - mx) * (b - my) for s, b in points) / var
    return slope, my - slope * mx


def _model_shape(config: dict):
    from seqpar.cost.training_memory import ModelShape

    m = config["model"]
    return ModelShape(layers=m["num_hidden_layers"], hidden=m["hidden_size"],
                      heads_q=m["num_attention_heads"], heads_kv=m["num_key_value_heads"],
                      head_dim=m["hidden_size"] // m["num_attention_heads"],
                      intermediate=m["intermediate_size"], vocab=m["vocab_size"])


def _savers(variant: str, tile_tokens: int):
    from seqpar.cost.training_memory import Savers

    return {"a": Savers(), "b": Savers(True, loss_tile=tile_tokens),
            "c": Savers(True, True, loss_tile=tile_tokens),
            "d": Savers(True, True, True, loss_tile=tile_tokens),
            "alst": Savers(True, True, True, loss_tile=tile_tokens)}[variant]


def predicted_gib(config: dict, variant: str, seq: int, world: int) -> float:
    from seqpar.cost.training_memory import Training, step_memory

    backend = "ulysses" if variant == "alst" else "ring"
    return step_memory(_model_shape(config), seq, world, backend,
                       _savers(variant, config["tile_tokens"]),
                       Training(itemsize=4, zero_stage=0)).peak / 2 ** 30


def summarize(rows: list[dict], config: dict, world: int, budget_gib: float) -> list[dict]:
    from seqpar.cost.training_memory import Training, longest_sequence

    out = []
    for variant in config["variants"]:
        done = [r for r in rows if r["variant"] == variant and "peak_gib" in r]
        fit = _fit([(r["S"], r["peak_gib"] * 2 ** 30) for r in done])
        line = {"variant": variant, "name": NAMES[variant]}
        if fit:
            slope, fixed = fit
            line.update(slope_kib_per_token=slope / 1024, fixed_gib=fixed / 2 ** 30)
            # No rise over the measured S: the peak is the fixed part (model states, the
            # optimizer step), activations stay under it; the fit says nothing about the edge.
            if slope * (max(r["S"] for r in done) - min(r["S"] for r in done)) > 2 ** 24:
                line["longest_k"] = max(0.0, (budget_gib * 2 ** 30 - fixed) / slope) / 1024
            else:
                line["note"] = "flat: activations below the fixed peak at these S; measure larger S"
        model_longest = longest_sequence(
            _model_shape(config), world, "ulysses" if variant == "alst" else "ring",
            _savers(variant, config["tile_tokens"]), budget_gib * 2 ** 30,
            Training(itemsize=4, zero_stage=0), granule=2 * world)
        line["model_longest_k"] = model_longest / 1024
        out.append(line)
    return out


def overheads(rows: list[dict]) -> dict:
    """Step time of b, c, d over a's at the largest S a ran at."""
    a_rows = [r for r in rows if r["variant"] == "a" and "seconds" in r]
    if not a_rows:
        return {}
    seq = max(r["S"] for r in a_rows)
    base = next(r["seconds"] for r in a_rows if r["S"] == seq)
    result = {"S": seq}
    for r in rows:
        if r["S"] == seq and "seconds" in r and r["variant"] != "a":
            result[r["variant"]] = r["seconds"] / base - 1
    return result


def headroom(summary: list[dict]) -> dict:
    """The fitted longest S of (d) over today's path's and over ALST's (the issue's targets:
    >= 8x and >= 1x)."""
    longest = {line["variant"]: line.get("longest_k") for line in summary}
    out = {}
    if longest.get("d") and longest.get("a"):
        out["d / a"] = longest["d"] / longest["a"]
    if longest.get("d") and longest.get("alst"):
        out["d / alst"] = longest["d"] / longest["alst"]
    return out


def plot(rows: list[dict], summary: list[dict], budget_gib: float, stem) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    for line in summary:
        done = [r for r in rows if r["variant"] == line["variant"] and "peak_gib" in r]
        if not done:
            continue
        seqs = [r["S"] for r in done]
        (drawn,) = ax.plot(seqs, [r["peak_gib"] for r in done], marker="o", label=line["name"])
        if "slope_kib_per_token" in line:
            # a flat fit has no budget edge: draw it over the measured S only
            far = max(seqs + ([line["longest_k"] * 1024] if "longest_k" in line else []))
            xs = [min(seqs), far]
            ax.plot(xs, [line["fixed_gib"] + line["slope_kib_per_token"] * x / 2 ** 20
                         for x in xs], ls=":", color=drawn.get_color(), lw=1)
    ax.axhline(budget_gib, color="k", ls="--", lw=1, label=f"budget {budget_gib:g} GiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length S (tokens, whole sequence)")
    ax.set_ylabel("peak resident memory per rank (GiB)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("whole training step, Llama-shaped h512 L4 V32000 fp32, 4 CPU ranks")
    return [save_figure(fig, stem, "memory_vs_S")]


def _available_bytes() -> int:
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def confirm_seq(summary: list[dict] | None, world: int) -> tuple[int, str]:
    """The S of the confirming run: (d)'s fitted longest S in the budget, or the cost model's
    when the fit is flat; rounded down to a multiple of 2 x world (zigzag). (S, where from)."""
    line = next((x for x in summary or () if x.get("variant") == "d"), None)
    if line is None:
        raise SystemExit("--window: no fit of variant d (run the sweep with d, or pass --seq)")
    if line.get("longest_k"):
        tokens, source = line["longest_k"] * 1024, "fit"
    else:
        tokens, source = line["model_longest_k"] * 1024, "cost model (the fit is flat)"
    unit = 2 * world
    seq = int(tokens) // unit * unit
    if seq < unit:
        raise SystemExit(f"--window: the {source} leaves no S in the budget ({tokens:.0f} "
                         f"tokens); raise --budget-gib or pass --seq")
    return seq, source


def confirm(args, model: dict, tile: int, summary: list[dict] | None) -> list[dict]:
    """Variant (d) -- and any other of --confirm-variants, ALST for one -- at (d)'s predicted
    longest S (or --seq), attention on a sliding window of args.window (module docstring):
    measured peak per rank and time beside the fit's and the cost model's predictions."""
    if args.seq is not None:
        seq, source = args.seq, "--seq"
    else:
        seq, source = confirm_seq(summary, args.world)
    warm = min(seq, 2048) // (2 * args.world) * (2 * args.world) or 2 * args.world
    variants = list(args.confirm_variants)
    config = {"model": model, "seqs": [seq], "variants": variants, "threads": args.threads,
              "dtype": "float32", "tile_tokens": tile, "skip": {}, "window": args.window,
              "warm_seq": warm}
    print(f"# confirming run: {', '.join(variants)} at S = {seq} ({source}), sliding window "
          f"{args.window}, {args.world} ranks")
    rows = launch(args.world, _worker, config)
    for row in rows:
        line = next((x for x in summary or () if x.get("variant") == row["variant"]), {})
        row["window"] = args.window
        row["source"] = source
        row["model_gib"] = row["runtime_gib"] + predicted_gib(config, row["variant"], seq,
                                                              args.world)
        if "slope_kib_per_token" in line:
            row["fit_gib"] = line["fixed_gib"] + line["slope_kib_per_token"] * seq / 2 ** 20
        if "peak_gib" in row:
            row["within_budget"] = row["peak_gib"] <= args.budget_gib
    columns = [("name", "variant", "s"), ("S", "S", "d"), ("window", "window", "d"),
               ("source", "S from", "s"), ("peak_gib", "peak GiB/rank", ".2f"),
               ("fit_gib", "fit GiB/rank", ".2f"), ("model_gib", "model GiB/rank", ".2f"),
               ("seconds", "step s", ".1f"), ("loss", "loss", ".5f"), ("note", "note", "s")]
    print(f"# confirming run with a sliding window of {args.window}; budget "
          f"{args.budget_gib:g} GiB per rank")
    print(table(rows, columns))
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=None)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank")
    parser.add_argument("--budget-gib", type=float, default=5.0, help="memory budget per rank")
    parser.add_argument("--tile-tokens", type=int, default=None,
                        help="tokens per loss tile (default: 64 MiB of fp32 logits)")
    parser.add_argument("--smoke", action="store_true", help="toy model and S (seconds)")
    parser.add_argument("--window", type=int, default=None,
                        help="confirming run of (d) at the predicted longest S with the "
                             "attention layers on this sliding window (1024 in the issue)")
    parser.add_argument("--seq", type=int, default=None,
                        help="with --window: confirm at this S instead of the fit's longest")
    parser.add_argument("--confirm-variants", nargs="+", choices=("d", "alst"), default=["d"],
                        help="with --window: the variants of the confirming run (d; alst: the "
                             "peer at the same S, its attention on seqpar's windowed kernel)")
    parser.add_argument("--fit-from", default=None,
                        help="with --window: take (d)'s fit from this JSON of an earlier run "
                             "instead of sweeping first")
    parser.add_argument("--million", action="store_true",
                        help="the 1M-token hybrid step (benchmarks.million; its options follow)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return parser


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--million" in argv:
        from benchmarks import million
        return million.main([a for a in argv if a != "--million"])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.window is not None and args.window < 1:
        parser.error(f"--window must be >= 1 (tokens), got {args.window}")
    if args.window is None and (args.seq is not None or args.fit_from is not None):
        parser.error("--seq and --fit-from belong to the confirming run; add --window W")
    if args.seq is not None and (args.seq < 1 or args.seq % (2 * args.world)):
        parser.error(f"--seq {args.seq} must be a positive multiple of 2 x world (zigzag)")
    sweeping = args.window is None or (args.seq is None and args.fit_from is None)
    if args.window is not None and sweeping and "d" not in args.variants:
        parser.error("--window confirms variant d's fit: add d to --variants, or pass --seq or "
                     "--fit-from")
    model = SMOKE_MODEL if args.smoke else MODEL
    seqs = args.seqs or list(SMOKE_SEQS if args.smoke else DEFAULT_SEQS)
    bad = [s for s in seqs if s % (2 * args.world)]
    if bad:
        parser.error(f"--seqs {bad} are not divisible by 2 x world (zigzag)")
    tile = args.tile_tokens or max(1, 64 * 2 ** 20 // (4 * model["vocab_size"]))
    info = machine()
    print(header_text(info))
    stem = results_stem("long_context", args.out)
    payload = {"machine": info, "args": vars(args)}
    if sweeping:
        payload.update(_sweep(args, model, seqs, tile, stem, info))
    if args.window is not None:
        summary = payload.get("summary")
        if args.fit_from is not None:
            summary = json.loads(Path(args.fit_from).read_text())["summary"]
        payload["confirm"] = confirm(args, model, tile, summary)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"# wrote {stem}.json")
    return payload


def _sweep(args, model: dict, seqs: list[int], tile: int, stem, info: dict) -> dict:
    """The sweep of the module docstring: every variant at every S, the fits, the outputs."""
    config = {"model": model, "seqs": seqs, "variants": args.variants, "threads": args.threads,
              "dtype": "float32", "tile_tokens": tile, "skip": {}}
    # Skip what the model says this machine cannot hold (4 ranks share its memory).
    room = 0.85 * _available_bytes() / args.world
    for variant in args.variants:
        config["skip"][variant] = [s for s in seqs if predicted_gib(config, variant, s,
                                                                    args.world) * 2 ** 30 > room]
    rows = launch(args.world, _worker, config)
    for r in rows:
        # the model counts tensors; the process (python, torch, gloo) adds its resident set
        r["predicted_gib"] = r["runtime_gib"] + predicted_gib(config, r["variant"], r["S"],
                                                              args.world)
    summary = summarize(rows, config, args.world, args.budget_gib)
    over = overheads(rows)
    columns = [("name", "variant", "s"), ("S", "S", "d"), ("peak_gib", "peak GiB/rank", ".2f"),
               ("predicted_gib", "model GiB/rank", ".2f"), ("seconds", "step s", ".1f"),
               ("loss", "loss", ".5f"), ("note", "note", "s")]
    sum_columns = [("name", "variant", "s"), ("slope_kib_per_token", "KiB/token/rank", ".1f"),
                   ("fixed_gib", "fixed GiB", ".2f"),
                   ("longest_k", f"longest S in {args.budget_gib:g} GiB (K, fit)", ".0f"),
                   ("model_longest_k", "model's longest S (K)", ".0f"), ("note", "note", "s")]
    title = (f"whole training step (fwd, bwd, sync_grads, Adam) on {args.world} CPU ranks, "
             f"{args.threads} thread(s) each; model {model}; fp32; loss tile {tile} tokens")
    print(f"# {title}")
    print(table(rows, columns))
    print(f"# per variant: peak = fixed + slope * S (least squares); budget "
          f"{args.budget_gib:g} GiB per rank")
    print(table(summary, sum_columns))
    ratios = headroom(summary)
    if ratios:
        print("# longest S in the budget (fit): " + ", ".join(f"{k} x{v:.1f}"
                                                              for k, v in ratios.items()))
    if over:
        print(f"# step time over today's path at S = {over['S']}: " + ", ".join(
            f"{k} {100 * v:+.0f}%" for k, v in over.items() if k != "S"))
    write_csv(stem.with_suffix(".csv"), rows, [c[0] for c in columns])
    stem.with_suffix(".md").write_text(
        f"# Long context memory ({info['date']})\n\n{header_text(info)}\n\n{title}.\n\n"
        f"{markdown_table(rows, columns)}\n\n{markdown_table(summary, sum_columns)}\n")
    pictures = plot(rows, summary, args.budget_gib, stem)
    print(f"# wrote {stem}.csv, .md and {', '.join(pictures) or 'no PNG (matplotlib)'}")
    return {"config": config, "rows": rows, "summary": summary, "overheads": over,
            "headroom": ratios}


if __name__ == "__main__":
    main()
