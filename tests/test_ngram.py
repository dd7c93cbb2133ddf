"""Tests for the n-gram baselines: normalisation, hand-derived Kneser-Ney and add-k values, sampling,
table sizes, persistence, and the pinned Penn Treebank perplexity when it is present."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plutao.model.baselines.ngram import NGramLM
from plutao.model.config import ModelConfig
from plutao.tokenizer import WordTokenizer

PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"

TEXT = """\
the cat sat on the mat
the dog sat on the log
the cat saw the dog
a dog saw a cat on a mat
the end
"""
SMOOTHINGS = ("kneser_ney", "add_k")


@pytest.fixture(scope="module")
def fixture_tokens() -> tuple[np.ndarray, int]:
    """Word ids of TEXT (with <eos> per line), and a vocabulary larger than the words it uses."""
    tok = WordTokenizer.train(TEXT)
    return tok.encode_array(TEXT).astype(np.int64), tok.vocab_size + 5


def seen_contexts(t: np.ndarray, order: int) -> list[tuple[int, ...]]:
    """Every context the model conditions on in training, short ones at the start included."""
    return sorted({tuple(t[max(0, i - order + 1) : i].tolist()) for i in range(len(t) + 1)})


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_distributions_sum_to_one(fixture_tokens, smoothing, order):
    t, V = fixture_tokens
    lm = NGramLM.fit(t, V, order, smoothing, k=0.1)
    unseen = [(V - 1,) * (order - 1), (V - 2, V - 1)[: order - 1], (int(t[0]),) * 3, ()]
    for ctx in [*seen_contexts(t, order), *unseen]:
        p = lm.distribution(list(ctx))
        assert p.shape == (V,) and p.dtype == np.float64
        assert abs(p.sum() - 1.0) < 1e-9, ctx
        assert p.min() > 0.0, ctx  # smoothing leaves no zero, even for never-seen ids


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("order", [1, 2, 4])
def test_logprobs_agree_with_distribution(fixture_tokens, smoothing, order):
    t, V = fixture_tokens
    lm = NGramLM.fit(t, V, order, smoothing, k=0.5)
    held_out = np.array([t[0], V - 1, *t[3:12].tolist(), V - 2, t[5]])  # unseen ids and contexts
    for seq in (t, held_out):
        lp = lm.logprobs(seq)
        assert lp.shape == (len(seq) - 1,)
        direct = [math.log(lm.distribution(seq[max(0, i - order + 1) : i])[w]) for i, w in enumerate(seq)][1:]
        np.testing.assert_allclose(lp, direct, rtol=0, atol=1e-12)
        assert lm.perplexity(seq) == pytest.approx(math.exp(-np.mean(direct)), rel=1e-12)


def test_unigram_add_k_perplexity_closed_form(fixture_tokens):
    t, V = fixture_tokens
    k = 0.5
    lm = NGramLM.fit(t, V, 1, "add_k", k=k)
    c = np.bincount(t, minlength=V)
    by_hand = math.exp(-np.mean([math.log((c[w] + k) / (len(t) + k * V)) for w in t[1:]]))
    assert lm.perplexity(t) == pytest.approx(by_hand, rel=1e-12)
    # The context is ignored by a unigram model.
    np.testing.assert_array_equal(lm.distribution([]), lm.distribution(t[:7]))


def test_add_k_bigram_by_hand():
    # a b a b c with V = 4: c(a b) = 2, c(a •) = 2, c(b •) = 2 (b a, b c); c is never followed.
    lm = NGramLM.fit([0, 1, 0, 1, 2], 4, 2, "add_k", k=1.0)
    assert lm.distribution([0])[1] == pytest.approx((2 + 1) / (2 + 4))
    assert lm.distribution([1])[2] == pytest.approx((1 + 1) / (2 + 4))
    np.testing.assert_allclose(lm.distribution([2]), 0.25)  # unseen context: uniform
    # A missing context (the first token) uses the add-k unigram: counts a2 b2 c1 d0, N = 5.
    np.testing.assert_allclose(lm.distribution([]), np.array([3, 3, 2, 1]) / 9)


def test_kneser_ney_bigram_by_hand():
    # Corpus a b a b c (ids 0 1 0 1 2), V = 4 (d = 3 never occurs).
    # Bigram counts: ab 2, ba 1, bc 1 -> n1 = 2, n2 = 1, D2 = 2 / (2 + 2) = 1/2.
    # Unigram continuation counts (distinct left neighbours; the corpus start counts as one for
    # the first token): a {start, b} = 2, b {a} = 1, c {b} = 1 -> total 4, 3 types, D1 = 1/2.
    # p1(w) = max(N1+(•w) - 1/2, 0) / 4 + (1/2 · 3 / 4) · 1/4:
    p1 = {"a": 1.5 / 4 + 3 / 32, "b": 0.5 / 4 + 3 / 32, "c": 0.5 / 4 + 3 / 32, "d": 3 / 32}
    assert sum(p1.values()) == pytest.approx(1.0)
    # p2(c | b) = max(1 - 1/2, 0) / 2 + (1/2 · 2 / 2) · p1(c) = 1/4 + 1/2 · 7/32 = 23/64
    # p2(b | a) = max(2 - 1/2, 0) / 2 + (1/2 · 1 / 2) · p1(b) = 3/4 + 1/4 · 7/32 = 103/128
    lm = NGramLM.fit([0, 1, 0, 1, 2], 4, 2, "kneser_ney")
    np.testing.assert_allclose(lm.discounts, [0.5, 0.5])
    assert lm.distribution([1])[2] == pytest.approx(23 / 64, abs=1e-15)
    assert lm.distribution([0])[1] == pytest.approx(103 / 128, abs=1e-15)
    # c only ends the corpus, so as a context it is unseen: the unigram level passes through.
    np.testing.assert_allclose(lm.distribution([2]), [p1["a"], p1["b"], p1["c"], p1["d"]], atol=1e-15)
    np.testing.assert_allclose(lm.distribution([]), lm.distribution([2]), atol=0)
    np.testing.assert_allclose(np.exp(lm.logprobs([0, 1, 2])), [103 / 128, 23 / 64], atol=1e-15)


def test_kneser_ney_unigram_is_raw_counts_interpolated_with_uniform():
    # counts a2 b2 c1 d0 -> n1 = 1, n2 = 2, D = 1/5; p(w) = (max(c - D, 0) + D · 3 / 4) / 5
    lm = NGramLM.fit([0, 1, 0, 1, 2], 4, 1, "kneser_ney")
    d = 1 / 5
    expected = (np.maximum(np.array([2, 2, 1, 0]) - d, 0) + d * 3 / 4) / 5
    np.testing.assert_allclose(lm.distribution([3, 3]), expected, atol=1e-15)


def kneser_ney_by_formula(tokens: list[int], V: int, order: int):
    """Interpolated Kneser-Ney written out from its definition with dicts (Chen & Goodman 1998),
    independently of the implementation's arrays: the top order uses raw counts, lower orders
    continuation counts N1+(• g) (distinct left neighbours of the k-gram g, the corpus start
    counting as one for the corpus's first k-gram), D_k = n1 / (n1 + 2 n2) per order, and
    p_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k N1+(h •) p_{k-1}(w | h[1:])) / c_k(h •),
    passing p_{k-1} through when c_k(h •) = 0, down to p_0 = 1 / V."""
    from collections import Counter
    from fractions import Fraction

    grams = {k: Counter(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1)) for k in range(1, order + 1)}
    counts = {order: grams[order]}
    for k in range(1, order):
        left = Counter(g[1:] for g in grams[k + 1])  # each distinct (k+1)-gram adds one left neighbour
        left[tuple(tokens[:k])] += 1  # the corpus start
        counts[k] = Counter({g: left[g] for g in grams[k]})

    def disc(c: Counter) -> Fraction:
        n1, n2 = sum(v == 1 for v in c.values()), sum(v == 2 for v in c.values())
        return Fraction(n1, n1 + 2 * n2) if n1 else Fraction(1, 2)

    D = {k: disc(counts[k]) for k in counts}

    def p(w: int, h: tuple) -> Fraction:
        k = len(h) + 1
        lower = p(w, h[1:]) if h else Fraction(1, V)
        after = {g[-1]: c for g, c in counts[k].items() if g[:-1] == h}
        total = sum(after.values())
        if total == 0:
            return lower
        return (max(after.get(w, 0) - D[k], 0) + D[k] * len(after) * lower) / total

    return D, p


def test_kneser_ney_trigram_against_hand_derived_values():
    # a b c a b c a b d b c (ids 0 1 2 0 1 2 0 1 3 1 2), V = 5 (e = 4 never occurs).
    # Trigrams: abc 2, bca 2, cab 2, abd 1, bdb 1, dbc 1 -> n1 = 3, n2 = 3, D3 = 3 / 9 = 1/3.
    # Bigram continuation counts (distinct left neighbours; the start precedes "a b"):
    #   ab {c, start} 2, bc {a, d} 2, ca {b} 1, bd {a} 1, db {b} 1 -> n1 = 3, n2 = 2, D2 = 3/7.
    # Unigram continuation counts: a {c, start} 2, b {a, d} 2, c {b} 1, d {b} 1 -> D1 = 2/6 = 1/3,
    #   total 6, 4 types: p1(w) = (max(N(w) - 1/3, 0) + 1/3 · 4 · 1/5) / 6
    #   = a 29/90, b 29/90, c 14/90, d 14/90, e 4/90.
    # p2(· | b): continuations bc 2, bd 1 (total 3, 2 types):
    #   p2(c | b) = (2 - 3/7 + 3/7 · 2 · 14/90) / 3 = 179/315, p2(d | b) = (1 - 3/7 + 6/7 · 14/90) / 3 = 74/315,
    #   p2(a | b) = p2(b | b) = (6/7 · 29/90) / 3 = 29/315, p2(e | b) = 4/315.
    # p3(· | a b): abc 2, abd 1 (total 3, 2 types):
    #   p3(c | a b) = (2 - 1/3 + 1/3 · 2 · 179/315) / 3 = 1933/2835, p3(d | a b) = (2/3 + 2/3 · 74/315) / 3 = 778/2835,
    #   p3(a | a b) = p3(b | a b) = 58/2835, p3(e | a b) = 8/2835.
    # p3(c | d b) = (1 - 1/3 + 1/3 · 179/315) / 1 = 809/945.
    # "c c" never occurs as a context: p2(· | c) passes through; ca 1: p2(a | c) = 4/7 + 3/7 · 29/90 = 149/210.
    tokens = [0, 1, 2, 0, 1, 2, 0, 1, 3, 1, 2]
    lm = NGramLM.fit(tokens, 5, 3, "kneser_ney")
    np.testing.assert_allclose(lm.discounts, [1 / 3, 3 / 7, 1 / 3], rtol=0, atol=1e-15)
    by_hand = {
        (): [29 / 90, 29 / 90, 14 / 90, 14 / 90, 4 / 90],
        (1,): [29 / 315, 29 / 315, 179 / 315, 74 / 315, 4 / 315],
        (0, 1): [58 / 2835, 58 / 2835, 1933 / 2835, 778 / 2835, 8 / 2835],
        (3, 1): [29 / 945, 29 / 945, 809 / 945, 74 / 945, 4 / 945],
        (2, 2): [149 / 210, 29 / 210, 14 / 210, 14 / 210, 4 / 210],
    }
    for ctx, expected in by_hand.items():
        p = lm.distribution(list(ctx))
        np.testing.assert_allclose(p, expected, rtol=0, atol=1e-15, err_msg=str(ctx))
        assert math.fsum(expected) == pytest.approx(1.0, abs=1e-15) and p.sum() == pytest.approx(1.0, abs=1e-12)
    # Every context of every length, seen or not, against the definition written with dicts.
    D, p_ref = kneser_ney_by_formula(tokens, 5, 3)
    assert [float(D[k]) for k in (1, 2, 3)] == pytest.approx(list(lm.discounts), abs=1e-15)
    for ctx in [(), *[(a,) for a in range(5)], *itertools.product(range(5), repeat=2)]:
        ref = [p_ref(w, ctx) for w in range(5)]
        assert sum(ref) == 1, ctx  # exact (fractions)
        np.testing.assert_allclose(lm.distribution(list(ctx)), [float(r) for r in ref], rtol=0, atol=1e-14,
                                   err_msg=str(ctx))
    # The scored stream uses the same probabilities (short contexts at its start included).
    held_out = [4, 0, 1, 3, 1, 2, 2, 0, 1]
    expected_lp = [math.log(p_ref(w, tuple(held_out[max(0, i - 2):i]))) for i, w in enumerate(held_out)][1:]
    np.testing.assert_allclose(lm.logprobs(held_out), expected_lp, rtol=0, atol=1e-12)


def grammar_tokens(n_sentences: int = 300, seed: int = 0) -> np.ndarray:
    """Sentences from a small template grammar: enough repetition that every order has counts of 1
    and 2 (on TEXT all 4-grams are singletons, so D4 = 1 and order 4 scores exactly like order 3)."""
    rng = np.random.default_rng(seed)
    pick = {
        "D": ["the", "a", "every"],
        "A": ["big", "small", "red", ""],
        "N": ["cat", "dog", "mat", "log", "bird"],
        "V": ["sat on", "saw", "chased", "likes"],
    }
    lines = []
    for _ in range(n_sentences):
        words = [str(rng.choice(pick[slot])) for slot in "DANVDAN"]
        lines.append(" ".join(w for w in words if w))
    text = "\n".join(lines) + "\n"
    return WordTokenizer.train(text).encode_array(text).astype(np.int64)


@pytest.mark.parametrize(("smoothing", "k"), [("kneser_ney", 1.0), ("add_k", 0.01)])
def test_higher_order_lowers_training_perplexity(smoothing, k):
    t = grammar_tokens()
    V = int(t.max()) + 1
    ppl = [NGramLM.fit(t, V, n, smoothing, k=k).perplexity(t) for n in (1, 2, 3, 4)]
    assert all(a > b for a, b in itertools.pairwise(ppl)), ppl


def test_generation_is_seeded_and_in_vocabulary(fixture_tokens):
    t, V = fixture_tokens
    lm = NGramLM.fit(t, V, 3, "kneser_ney")
    a = lm.generate(t[:2], 200, seed=7)
    assert a == lm.generate(t[:2], 200, seed=7)
    assert a != lm.generate(t[:2], 200, seed=8)
    assert len(a) == 200 and all(isinstance(x, int) and 0 <= x < V for x in a)
    assert len(set(a)) > 5
    # Greedy picks the argmax of each distribution in turn.
    greedy = lm.generate([], 5, seed=0, temperature=0)
    history: list[int] = []
    for tok in greedy:
        assert tok == int(np.argmax(lm.distribution(history[-2:])))
        history.append(tok)
    # A low temperature concentrates the samples.
    cold = lm.generate(t[:2], 200, seed=7, temperature=0.05)
    assert len(set(cold)) < len(set(a))
    with pytest.raises(ValueError, match="temperature"):
        lm.generate([], 1, seed=0, temperature=-1)


def test_table_size_counts():
    lm = NGramLM.fit([0, 1, 0, 1, 2], 4, 3, "kneser_ney")
    size = lm.table_size()
    # unigrams a b c; bigrams ab ba bc; trigrams aba bab abc
    assert size["ngrams"] == {1: 3, 2: 3, 3: 3}
    assert size["total"] == 9
    assert size["possible"] == {1: 4, 2: 16, 3: 64}
    assert size["fraction_stored"][3] == 3 / 64
    assert size["bytes"] > 0
    # |V|^n outgrows any fixed-width integer: the count is exact.
    assert NGramLM.fit([0, 1], 10_009, 5, "add_k").table_size()["possible"][5] == 10_009**5


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_save_load_round_trip(fixture_tokens, tmp_path, smoothing):
    t, V = fixture_tokens
    lm = NGramLM.fit(t, V, 3, smoothing, k=0.3)
    path = tmp_path / "model.ngram"
    lm.save(path)
    assert path.is_file() and not (tmp_path / "model.ngram.npz").exists()
    back = NGramLM.load(path)
    assert (back.vocab_size, back.order, back.smoothing, back.k) == (V, 3, smoothing, 0.3)
    stored = [*lm.keys, *lm.counts, lm.discounts]
    for a, b in zip(stored, [*back.keys, *back.counts, back.discounts], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lm.logprobs(t), back.logprobs(t))
    assert lm.table_size() == back.table_size()
    # Plain arrays only: readable without pickle.
    with np.load(path, allow_pickle=False) as z:
        assert "keys_3" in z.files


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    with open(path, "wb") as f:
        np.savez(f, x=np.arange(3))
    with pytest.raises(ValueError, match="not a saved n-gram model"):
        NGramLM.load(path)


def test_from_config_and_bad_arguments(fixture_tokens):
    t, V = fixture_tokens
    cfg = ModelConfig(family="ngram", vocab_size=V, ngram_order=2, ngram_smoothing="add_k", ngram_k=0.25)
    lm = NGramLM.from_config(t, cfg)
    assert (lm.order, lm.smoothing, lm.k) == (2, "add_k", 0.25)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        NGramLM.fit(t, int(t.max()), 2)
    with pytest.raises(ValueError, match="k > 0"):
        NGramLM.fit(t, V, 2, "add_k", k=0.0)
    with pytest.raises(ValueError, match="smoothing"):
        NGramLM.fit(t, V, 2, "witten_bell")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="order"):
        NGramLM.fit(t, V, 0)
    with pytest.raises(ValueError, match="no training tokens"):
        NGramLM.fit([], V, 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.distribution([V])


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=40),
    st.integers(1, 4),
    st.sampled_from(SMOOTHINGS),
)
def test_property_normalised_on_random_streams(tokens, order, smoothing):
    V = 7  # id 6 never occurs
    lm = NGramLM.fit(tokens, V, order, smoothing, k=0.2)
    seq = [*tokens, 6, *tokens[:3]]
    lp = lm.logprobs(seq)
    assert np.all(np.isfinite(lp)) and np.all(lp < 0)
    for i in range(len(seq) + 1):
        p = lm.distribution(seq[max(0, i - order + 1) : i])
        assert abs(p.sum() - 1.0) < 1e-9 and p.min() > 0


@pytest.mark.skipif(not (PTB / "ptb.train.txt").is_file(), reason=f"{PTB} not present")
def test_ptb_bigram_kneser_ney_validation_perplexity():
    train_text = (PTB / "ptb.train.txt").read_text()
    tok = WordTokenizer.train(train_text)
    assert tok.vocab_size == 11 + 9_998  # PTB's 10k words = 9,998 + <unk> + <eos>
    train = tok.encode_array(train_text)[:100_000]
    valid = tok.encode_array((PTB / "ptb.valid.txt").read_text())
    valid = np.concatenate([[tok.eos_id], valid])  # every sentence, the first included, is scored
    lm = NGramLM.fit(train, tok.vocab_size, 2, "kneser_ney")
    # Counting is deterministic: the value is pinned (float64 sums may differ in the last bits
    # between numpy builds, nothing more). Unigram-level values are ~690; a different discount,
    # a lost continuation count or an off-by-one in the context rows moves it far past 1e-6.
    assert lm.perplexity(valid) == pytest.approx(333.2602422766559, rel=1e-6)
    # The full training set: README's 201.5.
    full = NGramLM.fit(tok.encode_array(train_text), tok.vocab_size, 2, "kneser_ney")
    assert full.perplexity(valid) == pytest.approx(201.53304217200937, rel=1e-6)
