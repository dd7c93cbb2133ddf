"""The original Transformer: masks, the cross-attention path, KV-cache decoding, greedy and beam search."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plutao.model.config import ModelConfig
from plutao.model.encoder_decoder import EncoderDecoder
from plutao.model.heads import Output, forward_logits
from plutao.model.seq2seq import beam_search, greedy_decode, length_penalty, strip

PAD, BOS, EOS = 0, 2, 3
CFG = ModelConfig(family="encoder_decoder", vocab_size=40, context_length=16, n_layers=2, d_model=32, n_heads=4,
                  norm="post", positions="sinusoidal", activation="relu")


def make(cfg=CFG, seed=0):
    return EncoderDecoder(cfg, nnx.Rngs(seed))


def tokens(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(11, 40, shape), jnp.int32)


@pytest.fixture(scope="module")
def model():
    m = make()
    # Larger weights than the 0.02 init, so outputs depend visibly on their inputs.
    for _, v in nnx.iter_graph(m):
        if isinstance(v, nnx.Param) and v[...].ndim >= 2:
            v[...] = v[...] * 8.0
    return m


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_decoder_self_attention_is_causal(norm):
    m = make(ModelConfig(**{**CFG.__dict__, "norm": norm}))
    src = tokens((2, 7), 0)
    tgt = tokens((2, 9), 1)
    changed = tgt.at[:, 5:].set(tokens((2, 4), 2))
    a, _ = forward_logits(m, src, src != PAD, tgt)
    b, _ = forward_logits(m, src, src != PAD, changed)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:], atol=1e-4)


def test_source_reaches_the_decoder_only_through_cross_attention(model):
    src, other = tokens((2, 7), 0), tokens((2, 7), 5)
    tgt = tokens((2, 6), 1)
    a, _ = forward_logits(model, src, src != PAD, tgt)
    b, _ = forward_logits(model, other, other != PAD, tgt)
    assert not np.allclose(a, b, atol=1e-4)  # the source matters ...
    cut = nnx.clone(model)
    for block in cut.decoder:  # ... and with every cross-attention output zeroed it no longer does
        block.cross_attn.w_o[...] = jnp.zeros_like(block.cross_attn.w_o[...])
    a, _ = forward_logits(cut, src, src != PAD, tgt)
    b, _ = forward_logits(cut, other, other != PAD, tgt)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_padding_never_affects_real_positions(model):
    src, tgt = tokens((2, 6), 0), tokens((2, 5), 1)
    base, _ = forward_logits(model, src, src != PAD, tgt)
    # Extra source padding (different amounts per row, with garbage ids under the mask) changes nothing.
    padded_src = jnp.concatenate([src, tokens((2, 4), 9)], axis=1)
    valid = jnp.concatenate([jnp.ones((2, 6), bool), jnp.zeros((2, 4), bool)], axis=1)
    out, _ = forward_logits(model, padded_src, valid, tgt)
    np.testing.assert_allclose(out, base, atol=1e-5)
    # Right padding of the target changes no earlier position.
    out, _ = forward_logits(model, src, src != PAD, jnp.concatenate([tgt, jnp.zeros((2, 3), jnp.int32)], axis=1))
    np.testing.assert_allclose(out[:, :5], base, atol=1e-5)


def test_incremental_decoding_with_caches_equals_teacher_forcing(model):
    src, tgt = tokens((3, 7), 0), tokens((3, 8), 1)
    valid = (src != PAD).at[1, 4:].set(False)
    full, _ = forward_logits(model, src, valid, tgt)
    memory, _ = model.encode(src, valid)
    kv = model.memory_kv(memory)
    cache = model.init_cache(3, CFG.context_length)
    steps = []
    for i in range(tgt.shape[1]):
        out = model.decode(tgt[:, i:i + 1], kv, valid, cache=cache, cache_index=i)
        logits, cache = model.logits(out.hidden_BTD), out.cache
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-5)


def test_attention_weights_are_distributions_over_real_keys(model):
    src, tgt = tokens((1, 6), 0), tokens((1, 4), 1)
    valid = (src != PAD).at[0, 4:].set(False)
    w = model(src, valid, tgt, return_weights=True).weights
    assert set(w) == {"encoder-self", "decoder-self", "cross"}
    cross = np.asarray(w["cross"][0])  # (B, H, T, S)
    assert cross.shape == (1, CFG.n_heads, 4, 6)
    np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)
    assert np.all(cross[..., 4:] < 1e-6)  # padding gets no attention
    dec = np.asarray(w["decoder-self"][0])
    assert np.all(np.triu(np.ones((4, 4)), 1)[None, None] * dec < 1e-6)  # nothing from the future


def _decode_inputs():
    src = tokens((3, 6), 3)
    valid = (src != PAD).at[2, 3:].set(False)
    return src, valid


def test_one_beam_is_a_greedy_prefix_at_least_as_likely_as_greedy(model):
    """With K = 1 the alive prefix is greedy's while greedy runs; every greedy prefix + <eos> that was
    among the two best continuations is a finished candidate, so (α = 0) the answer is the likeliest of
    them: a prefix of greedy's output, never less likely than it."""
    graphdef, params = nnx.split(model)
    src, valid = _decode_inputs()
    g_tokens, g_score = greedy_decode(graphdef, params, src, valid, BOS, EOS, max_len=12)
    b_tokens, _, b_raw = beam_search(graphdef, params, src, valid, BOS, EOS, PAD, max_len=12, beam_size=1, alpha=0.0)
    for row in range(3):
        b, g = strip(b_tokens[row, 0], EOS, PAD), strip(g_tokens[row], EOS, PAD)
        assert g[:len(b)] == b
    assert np.all(np.asarray(b_raw[:, 0]) >= np.asarray(g_score) - 1e-5)


def test_beam_search_returns_hypotheses_in_score_order(model):
    graphdef, params = nnx.split(model)
    src, valid = _decode_inputs()
    hyps, norm, raw = beam_search(graphdef, params, src, valid, BOS, EOS, PAD, max_len=12, beam_size=4, alpha=0.6)
    norm = np.asarray(norm)
    assert np.all(np.diff(norm, axis=1) <= 1e-6)
    # Each reported score is the hypothesis' own log-probability, recomputed by teacher forcing.
    for row in range(3):
        for k in range(4):
            ids = strip(hyps[row, k], EOS, PAD)
            finished = EOS in np.asarray(hyps[row, k]).tolist()
            tgt = jnp.array([[BOS] + ids], jnp.int32)
            logits, _ = forward_logits(model, src[row:row + 1], valid[row:row + 1], tgt)
            logp = jax.nn.log_softmax(logits[0])
            targets = ids + ([EOS] if finished else [])
            total = float(sum(logp[i, t] for i, t in enumerate(targets)))
            np.testing.assert_allclose(float(raw[row, k]), total, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(float(norm[row, k]), total / float(length_penalty(jnp.array(len(targets)),
                                                                                         0.6)), rtol=1e-4)


class Markov(nnx.Module):
    """A stand-in decoder whose next-token log-probabilities depend on the previous token only (a
    table), with the encoder-decoder's decoding interface: exact scores for any hypothesis are easy."""

    def __init__(self, logp_VV: np.ndarray):
        self.table = nnx.Param(jnp.asarray(logp_VV, jnp.float32))

    def encode(self, src_BS, valid_BS):
        return jnp.zeros((*src_BS.shape, 1)), None

    def memory_kv(self, memory_BSD):
        return {}

    def init_cache(self, batch, length):
        return {"rows": jnp.zeros((batch, 1))}

    def decode(self, token_N1, kv, valid_NS, *, cache, cache_index):
        return Output(self.table[...][token_N1], cache)  # "hidden states" that are already log-probabilities

    def logits(self, hidden):
        return hidden


def chain_table(rows: dict[int, dict[int, float]], V: int) -> np.ndarray:
    """Log-probabilities: the given transitions, the rest of each row's mass spread over ids ≥ EOS."""
    out = np.full((V, V), -1e9)
    for prev, nxt in rows.items():
        rest = [t for t in range(EOS, V) if t not in nxt]
        spare = (1.0 - sum(nxt.values())) / len(rest)
        for t in range(EOS, V):
            out[prev, t] = np.log(nxt.get(t, spare))
    return out


def brute_force(logp_VV: np.ndarray, max_len: int, alpha: float) -> list[tuple[float, list[int]]]:
    """Every hypothesis up to max_len (ended by <eos>, or cut at max_len), by normalised score."""
    V, out = logp_VV.shape[0], []

    def walk(prefix, last, raw):
        for t in range(EOS, V):
            if logp_VV[last, t] < -1e8:
                continue
            seq, score = prefix + [t], raw + logp_VV[last, t]
            if t == EOS or len(seq) == max_len:
                out.append((score / ((5 + len(seq)) / 6) ** alpha, [x for x in seq if x != EOS]))
            else:
                walk(seq, t, score)

    walk([], BOS, 0.0)
    return sorted(out, key=lambda h: -h[0])


def run_beam(table: np.ndarray, max_len: int, beam: int, alpha: float):
    graphdef, params = nnx.split(Markov(table))
    src = jnp.full((1, 3), 11, jnp.int32)
    hyps, norm, _ = beam_search(graphdef, params, src, src != PAD, BOS, EOS, PAD, max_len=max_len, beam_size=beam,
                                alpha=alpha)
    return [strip(h, EOS, PAD) for h in np.asarray(hyps[0])], np.asarray(norm[0])


def test_a_longer_hypothesis_wins_after_the_length_penalty():
    """<eos> right away is the likeliest first step, and [x <eos>] keeps the second beam slot, so a beam
    that kept finished hypotheses in its slots would never extend [a]; with finished hypotheses in their
    own pool, [a b c d <eos>] survives and wins once scores are divided by lp(length)."""
    a, b, c, d, x = 11, 12, 13, 14, 15
    table = chain_table({BOS: {EOS: 0.40, x: 0.35, a: 0.25 - 4e-6}, x: {EOS: 0.9}, a: {b: 0.99}, b: {c: 0.99},
                         c: {d: 0.99}, d: {EOS: 0.99}}, V=16)
    best = brute_force(table, max_len=6, alpha=1.0)[0]
    assert best[1] == [a, b, c, d]
    hyps, norm = run_beam(table, max_len=6, beam=2, alpha=1.0)
    assert hyps[0] == [a, b, c, d] and norm[0] == pytest.approx(best[0], rel=1e-5)
    assert brute_force(table, max_len=6, alpha=0.0)[0][1] == []  # without the penalty the empty output wins
    assert run_beam(table, max_len=6, beam=2, alpha=0.0)[0][0] == []


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_a_beam_wide_enough_to_keep_every_prefix_is_exact(seed, alpha):
    """Two ordinary tokens and max_len 4: at most 8 unfinished prefixes, so K = 8 prunes nothing and the
    K best hypotheses are exactly the K best of all of them, in order."""
    rng = np.random.default_rng(seed)
    V = 6
    table = np.full((V, V), -1e9)
    for prev in (BOS, 4, 5):
        table[prev, [EOS, 4, 5]] = np.log(rng.dirichlet(np.ones(3)))
    every = brute_force(table, max_len=4, alpha=alpha)
    score_of = {tuple(seq): score for score, seq in every}
    hyps, norm = run_beam(table, max_len=4, beam=8, alpha=alpha)
    np.testing.assert_allclose(norm, [score for score, _ in every[:8]], rtol=1e-5)  # the 8 best scores, in order
    assert len({tuple(h) for h in hyps}) == 8  # (hypotheses with equal scores may come in either order)
    np.testing.assert_allclose(norm, [score_of[tuple(h)] for h in hyps], rtol=1e-5)
