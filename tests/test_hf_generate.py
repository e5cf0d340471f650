"""`hf.generate` over a sharded KV cache returns on every rank exactly what transformers'
`model.generate` returns on one process: tiny random-init float64 Llama (GQA 4:2), Qwen2
(q/k/v biases) and Mistral (a sliding window that cuts into the context during decode) models,
2 and 4 ranks, every backend that can prefill. Greedy search compares the token ids exactly;
sampling with one seed on every rank too (every rank computes bit-identical logits: the same
merge of the same partials). The scores of greedy steps are compared at 1e-9 relative (fp64
models: only the attention is computed in pieces and merged; the logits then pass through a
few fp64 matmuls). A prompt whose length the layout cannot cut is fine (its tail is decoded).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.integrations import hf
from tests.checks import assert_close
from tests.test_mesh import mesh

VOCAB = 96


def tiny_model(kind: str, seed: int = 0):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if kind == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=24)
        cls = transformers.MistralForCausalLM
    elif kind == "mistral-w6":  # a window shorter than the sharded prefix: prefill masks too
        config = transformers.MistralConfig(**common, sliding_window=6)
        cls = transformers.MistralForCausalLM
    else:
        raise AssertionError(kind)
    torch.manual_seed(seed)
    return cls(config).to(torch.float64).eval()


def prompt(batch: int = 2, length: int = 19, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(kind: str, backend: str, ulysses: int | None, length: int, **kwargs):
    """(single process, sequence parallel) generate outputs on this rank."""
    ids = prompt(length=length)
    model = tiny_model(kind)
    torch.manual_seed(123)
    expected = model.generate(ids, **kwargs)
    group = mesh(ulysses) if ulysses else None
    torch.manual_seed(123)  # the seed every rank shares (sampling)
    with seqpar.comm_stats() as stats:
        actual = hf.generate(model, ids, group=group, backend=backend, **kwargs)
    assert model.config._attn_implementation == "sdpa"  # restored
    # seqpar really ran: the sharded prefill and the decode merges sent bytes
    assert stats.sent("decode") > 0 and stats.sent() > stats.sent("decode") + stats.sent("agree")
    return expected, actual


def check_greedy(kind: str, backend: str, ulysses: int | None, length: int = 19) -> list:
    expected, actual = both(kind, backend, ulysses, length, max_new_tokens=12, do_sample=False,
                            output_scores=True, return_dict_in_generate=True)
    context = f"rank {dist.get_rank()} {kind}/{backend}"
    assert torch.equal(actual.sequences, expected.sequences), (context, actual.sequences,
                                                               expected.sequences)
    for step, (a, e) in enumerate(zip(actual.scores, expected.scores, strict=True)):
        assert_close(f"scores of step {step}", a, e, 1e-9, context)
    return actual.sequences.tolist()


CASES = [("llama", "ring", None), ("llama", "tokenring", None), ("llama", "ulysses", None),
         ("llama", "usp", 2), ("llama", "allgather", None), ("qwen2", "ring", None),
         ("qwen2", "tokenring", None), ("qwen2", "allgather", None)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind, backend, ulysses", CASES,
                         ids=[f"{k}-{b}" + (f"-U{u}" if u else "") for k, b, u in CASES])
def test_greedy_generate_matches_one_process(worlds, world, kind, backend, ulysses):
    results = worlds(world).run(check_greedy, kind, backend, ulysses, timeout=240)
    assert all(r == results[0] for r in results)  # the same tokens on every rank


def test_a_window_that_cuts_into_the_context_in_decode(worlds):
    # Mistral, window 24: the 16-token sharded prefix is inside it, decode goes to 31 tokens.
    worlds(2).run(check_greedy, "mistral", "ring", None, 20, timeout=240)


@pytest.mark.parametrize("backend", ["ring", "tokenring"])
def test_a_window_shorter_than_the_prefix_in_prefill(worlds, backend):
    # Mistral, window 6: the sharded prefill runs seqpar.attention(window=6), decode the same.
    worlds(2).run(check_greedy, "mistral-w6", backend, None, 20, timeout=240)


def check_sampling(world_prompt: int) -> list:
    expected, actual = both("llama", "ring", None, world_prompt, max_new_tokens=10,
                            do_sample=True, temperature=1.3, top_k=40)
    assert torch.equal(actual, expected), (actual, expected)
    return actual.tolist()


def test_sampling_with_a_shared_seed(worlds):
    results = worlds(4).run(check_sampling, 21, timeout=240)
    assert all(r == results[0] for r in results)


def refused(case: str) -> tuple[str, str]:
    model = tiny_model("llama")
    ids = prompt()
    kwargs = {"max_new_tokens": 2}
    if case == "padding":
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        kwargs["attention_mask"] = mask
    elif case == "beams":
        kwargs["num_beams"] = 2
    elif case == "short prompt":
        ids = ids[:, :4]
    elif case == "prompts differ" and dist.get_rank() == 1:
        ids = ids.flip(1)
    try:
        hf.generate(model, ids, **kwargs)
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        return type(error).__name__, str(error)
    return "nothing raised", ""


@pytest.mark.parametrize("case, pattern", [
    ("padding", r"attention_mask must be absent or all ones"),
    ("beams", r"num_beams=2 is not supported"),
    ("short prompt", r"the prompt has 4 tokens; sharding it over 2 ranks with layout='zigzag' "
                     r"needs more than 4"),
    ("prompts differ", r"prompt differs across ranks"),
])
def test_refused_on_every_rank(worlds, case, pattern):
    for kind, message in worlds(2).run(refused, case, timeout=60):
        assert kind == "ValueError" and message.startswith("hf.generate: "), message
        assert re.search(pattern, message), message
