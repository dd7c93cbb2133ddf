"""The sampler for many requests: per-row settings in one program, per-row stops and random streams,
log-probs of the sampled tokens, and the slot decoder a continuous-batching server drives."""

import random

import jax
import numpy as np
import pytest
from flax import nnx

from plutao.experiments.sampling_bench import compilations
from plutao.model.baselines.rnn import RecurrentLM
from plutao.model.config import ModelConfig
from plutao.model.decode import SlotDecoder, complete, generate, stream
from plutao.model.gpt import GPT
from plutao.model.heads import forward_logits
from plutao.model.sampling import TOP_K_WIDTH, SamplingConfig, SamplingError, filter_logits, prompt_width

CONTEXT = 16
EOT, PAD = 1, 0
# Greedy, temperature, top-k, top-p and both, with budgets that cross the context (re-prefill) or not.
MIXED = [SamplingConfig(temperature=0.0, max_new_tokens=30, stop_at_eot=False),
         SamplingConfig(temperature=0.8, max_new_tokens=25, seed=3, stop_at_eot=False),
         SamplingConfig(temperature=1.0, top_k=5, max_new_tokens=7, seed=4, stop_at_eot=False),
         SamplingConfig(temperature=0.9, top_p=0.9, max_new_tokens=12, seed=5, stop_at_eot=False),
         SamplingConfig(temperature=1.2, top_k=3, top_p=0.8, max_new_tokens=40, seed=5, stop_at_eot=False)]
PROMPTS = [[3, 4, 5], [7] * 9, [2], list(range(2, 16)), [9, 8, 7, 6, 5]]


@pytest.fixture(scope="module")
def gpt():
    return GPT(ModelConfig(vocab_size=40, context_length=CONTEXT, n_layers=2, d_model=32, n_heads=2), nnx.Rngs(0))


def logits_of(model, tokens: list[int]) -> np.ndarray:
    """(T, V) logits of one sequence from a plain forward pass (no cache)."""
    return np.asarray(forward_logits(model, np.array([tokens], np.int32))[0])[0]


@pytest.mark.parametrize("family", ["gpt", pytest.param("gru", marks=pytest.mark.slow)])
def test_each_row_of_a_mixed_batch_equals_its_solo_run(gpt, family):
    model = gpt if family == "gpt" else RecurrentLM(
        ModelConfig(family="gru", vocab_size=40, context_length=CONTEXT, n_layers=1, d_model=32, n_heads=1),
        nnx.Rngs(1))
    batch = complete(model, PROMPTS, MIXED, eot_id=EOT, pad_id=PAD)
    for prompt, sampling, row in zip(PROMPTS, MIXED, batch):
        solo = complete(model, [prompt], sampling, eot_id=EOT, pad_id=PAD)[0]
        assert row.tokens == solo.tokens
        assert len(row.tokens) == sampling.max_new_tokens and row.stop_token is None
        np.testing.assert_allclose(row.model_logprobs, solo.model_logprobs, atol=1e-5)
        np.testing.assert_allclose(row.sampler_logprobs, solo.sampler_logprobs, atol=1e-5)
    # A row's stream is its own: the same row beside different neighbours gives the same tokens.
    assert generate(model, PROMPTS[::-1], MIXED[::-1], eot_id=EOT, pad_id=PAD)[::-1] == [r.tokens for r in batch]


def test_one_setting_for_every_row_is_the_per_row_case(gpt):
    """Also: rows of equal length fill the context at the same step and re-prefill in the same step."""
    s = MIXED[1]
    prompts = [PROMPTS[0], [6, 5, 4]]
    both = generate(gpt, prompts, s, eot_id=EOT, pad_id=PAD)
    assert both == generate(gpt, prompts, [s, s], eot_id=EOT, pad_id=PAD)
    assert both == [generate(gpt, [p], s, eot_id=EOT, pad_id=PAD)[0] for p in prompts]
    with pytest.raises(SamplingError, match="one per prompt"):
        generate(gpt, PROMPTS[:2], [s], eot_id=EOT, pad_id=PAD)


def test_varied_requests_compile_once_per_prompt_width():
    """100 calls, every setting and prompt length varied, batch size fixed: a prefill program per
    prompt-width bucket (1, 2, 4, 8, 16 here) and one decode program, nothing per setting."""
    # A model of its own, so that no other test has compiled its programs already.
    gpt = GPT(ModelConfig(vocab_size=41, context_length=CONTEXT, n_layers=2, d_model=32, n_heads=2), nnx.Rngs(0))
    rng = random.Random(0)
    buckets = {prompt_width(n, CONTEXT) for n in range(1, CONTEXT + 1)}
    assert buckets == {1, 2, 4, 8, 16}
    with compilations() as count:
        for _ in range(100):
            longest = 2 ** rng.randint(0, 4)  # so that every width bucket comes up
            prompts = [[rng.randrange(2, 40) for _ in range(rng.randint(1, longest))] for _ in range(3)]
            samplings = [SamplingConfig(temperature=rng.choice([0.0, 0.5, 0.8, 1.0, 1.3]), top_k=rng.choice([0, 1, 3, 7]),
                                        top_p=rng.choice([1.0, 0.9, 0.5]), seed=rng.randrange(10**6),
                                        max_new_tokens=rng.randint(1, 24), stop_at_eot=rng.random() < 0.5,
                                        stop_ids=rng.sample(range(2, 40), rng.randint(0, 3)))
                         for _ in range(3)]
            complete(gpt, prompts, samplings, eot_id=EOT, pad_id=PAD)
    assert len(buckets) <= count[0] <= len(buckets) + 1, count[0]  # every bucket came up; 1 decode program


def test_each_row_stops_at_its_own_stop_ids(gpt):
    free = [SamplingConfig(**{**s.__dict__, "max_new_tokens": 10}) for s in MIXED[:3]]
    runs = complete(gpt, PROMPTS[:3], free, eot_id=EOT, pad_id=PAD)
    # Row 0 stops at its 4th token (or an earlier one equal to it), row 1 at its 2nd (or at 39, should
    # that come first), row 2 at an id it never produces: it runs on.
    stops = [(runs[0].tokens[3],), (runs[1].tokens[1], 39), (37 if 37 not in runs[2].tokens else 38,)]
    assert stops[2][0] not in runs[2].tokens
    stopping = [SamplingConfig(**{**s.__dict__, "stop_ids": ids}) for s, ids in zip(free, stops)]
    got = complete(gpt, PROMPTS[:3], stopping, eot_id=EOT, pad_id=PAD)
    for run, row, ids in zip(runs, got, stops):
        first = min((run.tokens.index(i) for i in ids if i in run.tokens), default=None)
        if first is None:
            assert row.tokens == run.tokens and row.stop_token is None
        else:
            assert row.tokens == run.tokens[: first + 1] and row.stop_token == run.tokens[first]
            assert row.content == run.tokens[:first]
    assert generate(gpt, PROMPTS[:3], stopping, eot_id=EOT, pad_id=PAD) == [r.content for r in got]
    # The end-of-text token stops a row only where its config says so.
    eot_stops = [SamplingConfig(**{**free[0].__dict__, "stop_at_eot": True})]
    eot = runs[0].tokens[2]
    got = complete(gpt, PROMPTS[:1], eot_stops, eot_id=eot, pad_id=PAD)[0]
    assert got.stop_token == eot and got.content == runs[0].tokens[: runs[0].tokens.index(eot)]
    assert list(stream(gpt, PROMPTS[0], eot_stops[0], eot_id=eot, pad_id=PAD)) == got.content


def test_logprobs_are_those_of_a_teacher_forced_forward(gpt):
    """Both log-probs of every sampled token, against the full forward pass of the produced sequence:
    the model's own (temperature 1, unfiltered) and the one under the distribution sampled from."""
    settings = [SamplingConfig(**{**s.__dict__, "max_new_tokens": CONTEXT - len(p) + 1})
                for s, p in zip(MIXED, PROMPTS)]
    for prompt, s, row in zip(PROMPTS, settings, complete(gpt, PROMPTS, settings, eot_id=EOT, pad_id=PAD)):
        seq = prompt + row.tokens
        logits_TV = logits_of(gpt, seq[:-1])[len(prompt) - 1:]
        model_lp_TV = np.asarray(jax.nn.log_softmax(logits_TV, axis=-1))
        np.testing.assert_allclose(row.model_logprobs, model_lp_TV[np.arange(len(row.tokens)), row.tokens],
                                   atol=2e-5)
        if s.temperature == 0.0:
            assert row.sampler_logprobs == [0.0] * len(row.tokens)
            assert row.tokens == np.argmax(logits_TV, -1).tolist()
        else:
            filtered_TV = np.asarray(jax.nn.log_softmax(filter_logits(logits_TV, s.temperature, s.top_k, s.top_p)))
            np.testing.assert_allclose(row.sampler_logprobs, filtered_TV[np.arange(len(row.tokens)), row.tokens],
                                       atol=2e-5)
            assert np.all(np.isfinite(row.sampler_logprobs))  # never a token the filters removed


def test_filters_take_one_setting_per_row():
    logits_BV = jax.random.normal(jax.random.key(0), (4, 30)) * 2
    T, k, p = [0.5, 1.0, 1.5, 1.0], [0, 3, 7, 30], [0.9, 1.0, 0.5, 0.7]
    rows = np.asarray(filter_logits(logits_BV, np.array(T), np.array(k), np.array(p)))
    for b in range(4):
        np.testing.assert_array_equal(rows[b], np.asarray(filter_logits(logits_BV[b:b + 1], T[b], k[b], p[b]))[0])
    assert np.isfinite(rows[1]).sum() == 3
    # A k beyond lax.top_k's static width takes the sorting path; the same k's either way.
    wide_BV = jax.random.normal(jax.random.key(1), (2, 3 * TOP_K_WIDTH))
    for k in ([TOP_K_WIDTH + 10, 5], [TOP_K_WIDTH, 5]):
        kept = np.isfinite(np.asarray(filter_logits(wide_BV, 1.0, np.array(k), 1.0)))
        assert kept.sum(-1).tolist() == k
        want = np.argsort(-np.asarray(wide_BV), -1)
        assert all(set(np.flatnonzero(kept[b])) == set(want[b, :k[b]]) for b in range(2))


def test_stream_arrives_in_chunks_with_the_same_tokens(gpt):
    s = MIXED[4]
    want = generate(gpt, [PROMPTS[0]], s, eot_id=EOT, pad_id=PAD)[0]
    for chunk in (1, 5, 32):
        assert list(stream(gpt, PROMPTS[0], s, eot_id=EOT, pad_id=PAD, chunk=chunk)) == want


def test_slot_decoder_with_staggered_arrivals_gives_each_request_its_solo_tokens(gpt):
    """Three slots serve seven requests arriving at different steps: a request is prefilled into a
    free slot while the others keep decoding, every step advances all active slots, a finished slot
    is reused. Each request gets exactly the tokens and log-probs of its solo run."""
    rng = random.Random(1)
    # Prompts of 5–12 tokens: two prefill widths (8 and 16), so the test compiles little.
    requests = [(rng.randrange(0, 12), [rng.randrange(2, 40) for _ in range(rng.randint(5, 12))],
                 SamplingConfig(temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 4]),
                                top_p=rng.choice([1.0, 0.85]), seed=i, max_new_tokens=rng.randint(3, 26),
                                stop_at_eot=False))
                for i in range(7)]
    requests.sort(key=lambda r: r[0])
    decoder = SlotDecoder.of(gpt, eot_id=EOT, pad_id=PAD)
    slots = decoder.empty(3)
    owner: list[int | None] = [None, None, None]
    got: dict[int, list[tuple[int, float, float]]] = {i: [] for i in range(len(requests))}
    waiting = list(range(len(requests)))
    step = 0
    while waiting or any(o is not None for o in owner):
        active = np.asarray(slots.active_B)
        for slot in range(3):
            if owner[slot] is not None and not active[slot]:
                owner[slot] = None  # finished: free for the next request
        arrived = [i for i in waiting if requests[i][0] <= step]
        free = [slot for slot in range(3) if owner[slot] is None]
        for slot, i in zip(free, arrived):
            slots, first = decoder.fill(slots, [slot], [requests[i][1]], [requests[i][2]])
            owner[slot] = i
            waiting.remove(i)
            got[i].append((int(first.tokens[0]), float(first.sampler_logprobs[0]), float(first.model_logprobs[0])))
        slots, out = decoder.step(slots)
        for slot, i in enumerate(owner):
            if i is not None and bool(out.valid[slot]):
                got[i].append((int(out.tokens[slot]), float(out.sampler_logprobs[slot]),
                               float(out.model_logprobs[slot])))
        step += 1
    assert any(len(p) + s.max_new_tokens > CONTEXT + 1 for _, p, s in requests)  # some slot re-prefills
    for i, (_, prompt, sampling) in enumerate(requests):
        solo = complete(gpt, [prompt], sampling, eot_id=EOT, pad_id=PAD)[0]
        tokens, sampler_lp, model_lp = map(list, zip(*got[i]))
        assert tokens == solo.tokens, i
        np.testing.assert_allclose(model_lp, solo.model_logprobs, atol=1e-5)
        np.testing.assert_allclose(sampler_lp, solo.sampler_logprobs, atol=1e-5)


def test_scanned_layers_decode_per_row_too():
    cfg = ModelConfig(vocab_size=40, context_length=CONTEXT, n_layers=2, d_model=32, n_heads=2, scan_layers=True)
    model = GPT(cfg, nnx.Rngs(0))
    prompts = [[3, 4, 5, 6], [9, 8, 7]]
    batch = generate(model, prompts, MIXED[:2], eot_id=EOT, pad_id=PAD)
    for prompt, s, row in zip(prompts, MIXED[:2], batch):
        assert row == generate(model, [prompt], s, eot_id=EOT, pad_id=PAD)[0]


@pytest.mark.parametrize("kwargs", [{"stop_ids": (-1,)}, {"stop_ids": tuple(range(2, 10))}])
def test_invalid_stop_ids(kwargs):
    with pytest.raises(SamplingError):
        SamplingConfig(**kwargs)


def test_a_banned_id_is_never_sampled_and_bans_share_one_program():
    """A banned id is never chosen, greedy or sampled, even with by far the highest logit; the model
    log-probs stay the model's own; rows with different bans (and none) run in one compiled program."""
    import jax.numpy as jnp

    from plutao.model.sampling import sample_rows

    # The banned id has the highest logit by far: without the ban every row would pick it.
    logits_BV = jnp.zeros((4, 12)).at[:, 5].set(50.0)
    temperature_B, top_k_B, top_p_B = jnp.array([0.0, 1.0, 3.0, 1.0]), jnp.array([0, 0, 2, 0]), jnp.array([1.0, 1.0,
                                                                                                            1.0, 0.5])
    banned_BV = jnp.zeros((4, 12), bool).at[:, 5].set(True).at[3, 6].set(True)
    for u in np.linspace(0.01, 0.999, 50):
        u_B = jnp.full((4,), u)
        token_B, _, model_lp_B = sample_rows(logits_BV, u_B, temperature_B, top_k_B, top_p_B, banned_BV)
        assert 5 not in token_B.tolist() and token_B[3] != 6
        np.testing.assert_allclose(model_lp_B, np.asarray(jax.nn.log_softmax(logits_BV[0]))[token_B], rtol=1e-6)
        assert sample_rows(logits_BV, u_B, temperature_B, top_k_B, top_p_B)[0].tolist() == [5] * 4

    # Through the decoder: a model of its own, so that no other test has compiled its programs.
    gpt = GPT(ModelConfig(vocab_size=43, context_length=CONTEXT, n_layers=2, d_model=32, n_heads=2), nnx.Rngs(0))
    prompt = [3, 4, 5]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6, stop_at_eot=False)
    top = complete(gpt, [prompt], greedy, eot_id=EOT, pad_id=PAD)[0].tokens[0]
    row = complete(gpt, [prompt], SamplingConfig(**{**greedy.__dict__, "banned_ids": (top,)}), eot_id=EOT,
                   pad_id=PAD)[0]
    logits_V = logits_of(gpt, prompt)[-1]
    assert top == int(np.argmax(logits_V)) and top not in row.tokens
    assert row.tokens[0] == int(np.argsort(-logits_V)[1])  # the next best instead
    np.testing.assert_allclose(row.model_logprobs[0], np.asarray(jax.nn.log_softmax(logits_V))[row.tokens[0]],
                               atol=2e-5)  # (unmasked: the model's own distribution)
    hot = SamplingConfig(temperature=5.0, max_new_tokens=40, seed=1, stop_at_eot=False)
    banned = tuple(range(0, 43, 2))
    bans = [SamplingConfig(**{**hot.__dict__, "banned_ids": b}) for b in (banned, (), (top, 7))]
    rows = complete(gpt, [prompt] * 3, bans, eot_id=EOT, pad_id=PAD)  # (compiles the programs once)
    assert not set(rows[0].tokens) & set(banned) and not {top, 7} & set(rows[2].tokens)
    assert rows[1].tokens == complete(gpt, [prompt], hot, eot_id=EOT, pad_id=PAD)[0].tokens
    with compilations() as count:
        other = [SamplingConfig(**{**hot.__dict__, "seed": 2, "banned_ids": b}) for b in ((1, 3), tuple(range(30)), ())]
        rows = complete(gpt, [prompt] * 3, other, eot_id=EOT, pad_id=PAD)
    assert count[0] == 0, count[0]
    assert not {1, 3} & set(rows[0].tokens) and min(rows[1].tokens) >= 30
    with pytest.raises(SamplingError, match="outside the model's vocabulary"):
        complete(gpt, [prompt], SamplingConfig(banned_ids=(43,)), eot_id=EOT, pad_id=PAD)
