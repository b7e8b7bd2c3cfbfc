"""The batched engine: KV cache vs recompute, batched and continuous batching vs one by one, seeded sampling,
stop tokens and strings, streaming, and a prefill from prompt embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from test_gpt import V, randomized, tiny_config

from ghostvis_core.batch_engine import Engine
from ghostvis_core.errors import ConfigError
from ghostvis_core.sampling import SamplingParams, filter_logits, uniform_noise
from ghostvis_core.text_stream import TextStream
from ghostvis_core.tokenizer import Tokenizer

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def model():
    return randomized(tiny_config(sequence_len=48), seed=5).eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def _one_by_one(engine, prompts, sampling, max_tokens):
    """Each prompt alone, keeping its index (so its seed) as in the batched call."""
    out = []
    for i, p in enumerate(prompts):
        shifted = SamplingParams(**{**sampling.__dict__, "seed": sampling.seed + i})
        out.append(engine.generate_many([p], shifted, max_tokens, batch_size=1)[0].token_ids)
    return out


def test_greedy_divergence_reports_the_first_differing_pick_and_its_fp32_margin(model):
    """The report the GPU graph test prints when two greedy runs part: here a run is edited to take the
    runner-up at position 3, so the report must name that position and give gap == margin > 0."""
    from helpers import greedy_divergence

    prompts = _prompts(2)
    got = [c.token_ids for c in Engine(model).generate_many(prompts, GREEDY, 8)]
    ids = torch.tensor([prompts[1] + got[1][:3]])
    with torch.no_grad():
        logits = model(ids)[0, -1].double()
    top = logits.topk(2)
    want = [list(got[0]), got[1][:3] + [int(top.indices[1])] + got[1][4:]]
    assert int(top.indices[0]) == got[1][3]  # greedy picked the top logit
    assert greedy_divergence(model, prompts, got, got) == []
    [row] = greedy_divergence(model, prompts, got, want)
    assert (row["prompt"], row["at"], row["got"], row["want"]) == (1, 3, got[1][3], int(top.indices[1]))
    margin = float(top.values[0] - top.values[1])
    assert row["fp32_top2_margin"] == pytest.approx(margin, rel=1e-5) and margin > 0
    assert row["fp32_gap_got_minus_want"] == pytest.approx(margin, rel=1e-5)
    assert greedy_divergence(model, prompts, got, [got[0], got[1][:5]]) == [{"prompt": 1, "lengths": (8, 5)}]


def test_greedy_divergence_takes_a_served_bf16_model():
    """The GPU test hands it a served model: bf16, q|k|v and gate|up fused (engine.cast_parameters_). Its float32
    reference must still run (a `.float()` copy kept the fused tensors in bf16 and failed in F.linear) and leave
    the served model as it was."""
    from helpers import greedy_divergence

    from ghostvis_core.bench.infer_bench import random_model

    served = random_model("tiny", "cpu", "bfloat16", compile=False).model
    prompts = _prompts(2)
    got = [c.token_ids for c in Engine(served).generate_many(prompts, GREEDY, 6)]
    want = [list(got[0]), got[1][:2] + [(got[1][2] + 1) % V] + got[1][3:]]
    [row] = greedy_divergence(served, prompts, got, want)
    assert (row["prompt"], row["at"], row["got"], row["want"]) == (1, 2, got[1][2], want[1][2])
    assert row["fp32_top2_margin"] >= 0 and math.isfinite(row["fp32_gap_got_minus_want"])
    assert next(served.parameters()).dtype == torch.bfloat16


def test_greedy_with_cache_equals_recompute(model):
    engine = Engine(model)
    for prompt in _prompts(3):
        got = engine.generate_many([prompt], GREEDY, 10)[0]
        ref = model.generate(torch.tensor([prompt]), 10, use_cache=False)[0, len(prompt):].tolist()
        assert got.token_ids == ref and got.finish_reason == "length" and got.prompt_tokens == len(prompt)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_mixed_lengths_batched_and_continuous_equal_one_by_one(model, sampling):
    engine = Engine(model)
    prompts = _prompts(7, seed=1)
    assert len({len(p) for p in prompts}) > 2  # really mixed lengths
    alone = _one_by_one(engine, prompts, sampling, 9)
    batched = [c.token_ids for c in engine.generate_many(prompts, sampling, 9, batch_size=7)]
    continuous = engine.generate_many(prompts, sampling, 9, batch_size=3, sync_every=4)  # 7 prompts, 3 rows
    assert batched == alone
    assert [c.token_ids for c in continuous] == alone
    assert [c.index for c in continuous] == list(range(7))


def test_seeded_sampling_is_reproducible_and_seed_dependent(model):
    engine = Engine(model)
    prompts = _prompts(4, seed=2)
    a = [c.token_ids for c in engine.generate_many(prompts, SAMPLED, 12, batch_size=2)]
    b = [c.token_ids for c in engine.generate_many(prompts, SAMPLED, 12, batch_size=4)]
    other = SamplingParams(temperature=1.0, top_k=40, top_p=0.9, seed=8)
    c = [r.token_ids for r in engine.generate_many(prompts, other, 12, batch_size=2)]
    assert a == b
    assert a != c
    greedy = [r.token_ids for r in engine.generate_many(prompts, GREEDY, 12, batch_size=2)]
    assert a != greedy  # temperature 1 over 97 tokens really samples


def test_noise_is_uniform_and_filters_keep_the_right_tokens():
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([5, 5]), 20000)
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and not torch.equal(u[0], u[1])
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, None, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert torch.isfinite(filter_logits(logits, 1, 1.0)).tolist() == [[True, False, False, False]]


def test_stop_token_ends_the_reply_without_it(model):
    prompt = _prompts(1, seed=3)[0]
    full = Engine(model).generate_many([prompt], GREEDY, 12)[0].token_ids
    stop = full[4]
    cut = full.index(stop)
    got = Engine(model, stop_token_ids=[stop]).generate_many([prompt], GREEDY, 12)[0]
    assert got.token_ids == full[:cut] and got.finish_reason == "stop"
    ignored = Engine(model, stop_token_ids=[stop]).generate_many(
        [prompt], SamplingParams(ignore_eos=True), 12)[0]  # fmt: skip
    assert ignored.token_ids == full


def test_prefill_from_embeddings_equals_token_ids(model):
    engine = Engine(model)
    prompt = _prompts(1, seed=4)[0]
    embeds = model.model.embed_tokens(torch.tensor([prompt])).detach()
    by_ids = engine.generate_many([prompt], GREEDY, 8)[0].token_ids
    by_embeds = engine.generate_many([embeds], GREEDY, 8)[0].token_ids
    assert by_embeds == by_ids


def test_context_limits(model):
    engine = Engine(model)
    with pytest.raises(ConfigError, match="prompt 1 is 48 tokens; the model's context is 48"):
        engine.generate_many([[1, 2], [3] * 48], GREEDY, 4)
    with pytest.raises(ConfigError, match="prompt 0 is empty"):
        engine.generate_many([[]], GREEDY, 4)
    got = engine.generate_many([[1] * 40], GREEDY, 100)[0]  # capped to the 8 tokens that fit
    assert len(got.token_ids) == 8 and got.finish_reason == "length"


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the red ball rolls to the blue box. stop here then go on."] * 50
    return Tokenizer.train(texts, vocab_size=300, min_frequency=1)


def test_stop_strings_and_streaming(tokenizer):
    model = randomized(tiny_config(vocab_size=tokenizer.vocab_size, sequence_len=64), seed=6).eval()
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.bos_id, *tokenizer.encode("the red")]
    sampled = SamplingParams(temperature=1.0, seed=3)
    free = engine.generate_many([prompt], sampled, 30)[0]
    assert len(free.text) > 6
    stop = free.text[3:5]
    streamed: list[str] = []
    got = engine.generate_many([prompt], SamplingParams(temperature=1.0, seed=3, stop=(stop,)), 30,
                               on_text=lambda i, t: streamed.append(t))[0]  # fmt: skip
    assert got.text == free.text[: free.text.index(stop)] and got.finish_reason == "stop"
    assert "".join(streamed) == got.text
    streamed.clear()
    again = engine.generate_many([prompt], sampled, 30, on_text=lambda i, t: streamed.append(t))[0]
    assert "".join(streamed) == again.text == free.text and len(streamed) > 1


def test_text_stream_holds_back_a_possible_stop_prefix(tokenizer):
    ids = tokenizer.encode("the red ball")
    stream = TextStream(tokenizer, stop=("ball",))
    shown = "".join(stream.push([t]) for t in ids)
    assert stream.stopped and stream.text == shown == tokenizer.decode(ids).split("ball")[0]


def test_padded_group_prefill_into_busy_rows_equals_single_prefills(model):
    """prefill_rows: prompts of lengths 3, 9 and 5 right-padded into rows 3, 0 and 2 of a batch whose row 1
    is mid-request give each prompt's own last logits and cached keys (fp32, 1e-5) and leave row 1's cache and length alone."""
    from ghostvis_core.batch_engine import _Batch

    engine = Engine(model)
    prompts = _prompts(8, seed=3)
    group = [p[:n] + [1] * max(0, n - len(p)) for p, n in zip(prompts[:3], (3, 9, 5), strict=True)]
    batch = _Batch(model, 4, 32)
    with torch.no_grad():
        busy = engine.prefill(batch.cache.row(1), prompts[5])
        k1 = batch.cache.k[:, 1].clone()
        got = engine.prefill_rows(batch, [3, 0, 2], group)
        for row, p, logits in zip([3, 0, 2], group, got, strict=True):
            alone = _Batch(model, 1, 32)
            want = engine.prefill(alone.cache, p)[0]
            diff = (logits - want).abs().max().item()
            print(f"row {row} len {len(p)}: max |diff| {diff:.2e}")
            assert diff < 1e-5
            n = len(p)
            kdiff = (batch.cache.k[:, row, :n] - alone.cache.k[:, 0, :n]).abs().max().item()
            assert kdiff < 1e-5, f"row {row} cached keys differ by {kdiff:.2e}"
    assert batch.cache.cache_seqlens.tolist() == [9, len(prompts[5]), 5, 3]
    assert torch.equal(batch.cache.k[:, 1], k1)
    assert busy.shape == got[:1].shape


def test_the_cache_routes_decode_steps_and_prefills_to_the_plans_two_choices():
    from ghostvis_core.kv_cache import KVCache

    cache = KVCache(2, 1, 8, 3, 16, torch.device("cpu"), "triton", "flash_attn")
    assert cache.backend(1) == "triton"  # one new token in every row: a decode step
    assert cache.backend(5) == "flash_attn"  # a prompt
    assert cache.row(1).backend(1) == "triton" and cache.row(1).backend(2) == "flash_attn"
    rows = cache.rows(torch.tensor([0, 2], dtype=torch.int32))
    assert rows.backend(1) == "flash_attn"  # some rows of a running batch: a prefill, even of one token
    assert (rows.decode_backend, rows.prefill_backend) == ("triton", "flash_attn")


def test_the_loop_reports_where_its_time_goes_per_chunk(model):
    """Scheduler.timing(): chunks and steps counted as the loop ran them (4 prompts at batch 2, 10 tokens each,
    chunks of at most 4 steps: each wave of 2 rows takes 9 decode steps after the first token = 4 + 4 + 1)."""
    engine = Engine(model)
    engine.generate_many(_prompts(4), SamplingParams(), 10, batch_size=2, sync_every=4)
    t = engine.last_timing
    assert t["chunks"] == 6 and t["steps_per_chunk"] == pytest.approx(18 / 6)
    assert t["launch_ms_per_chunk"] > 0 and t["host_ms_per_chunk"] >= 0 and t["admit_ms_total"] > 0
