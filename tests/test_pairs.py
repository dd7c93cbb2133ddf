"""Translation data: the held-out split, packing, and step-indexed, length-bucketed batches."""

import numpy as np
import pytest

from plutao.tokenizer import train_tokenizer
from plutao.train.config.errors import UserError
from plutao.train.data.pairs import PairBatches, encode_pairs, held_out, pack, read_pairs

WORDS = ["un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix"]


def make_pairs(n, seed=0):
    rnd = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rnd.integers(1, 12))
        words = [WORDS[i] for i in rnd.integers(0, 10, k)]
        out.append((" ".join(words), " ".join(w.upper() for w in words)))
    return out


def test_every_translation_of_one_target_lands_on_the_same_side():
    pairs = [(f"source {i}", f"target {i % 50}") for i in range(1000)]
    side = {}
    for pair in pairs:
        assert side.setdefault(pair[1], held_out(pair, 0.2)) == held_out(pair, 0.2)
    assert 0.05 < np.mean(list(side.values())) < 0.4


def test_packing_puts_source_then_target_and_pads():
    row = pack([np.array([5, 6, 3])], [np.array([2, 7, 8, 9, 3])], 4, 0)[0]
    assert row.tolist() == [5, 6, 3, 0, 2, 7, 8, 9, 3]


def test_batches_are_a_pure_function_of_seed_and_step_and_bucketed_by_length():
    tok = train_tokenizer("char", [t for p in make_pairs(300) for t in p])
    train, val = encode_pairs(make_pairs(300, 1), tok), encode_pairs(make_pairs(100, 2), tok)
    a = PairBatches(train, val, 64, 8, seed=3, pad_id=tok.pad_id, name="x")
    b = PairBatches(train, val, 64, 8, seed=3, pad_id=tok.pad_id, name="x")
    widths = set()
    for step in (0, 1, 37, 120):
        assert np.array_equal(a.train_rows(step), b.train_rows(step))
        width = a.train_shape(step)[1]
        widths.add(width)
        assert (width - 1) // 2 % 8 == 0 and a.train_rows(step).shape == (8, width)
        assert np.array_equal(a.train_rows(step, slice(2, 5)), a.train_rows(step)[2:5])
    # Batches of similar lengths: most batches are much narrower than the longest pair needs.
    assert min(a.train_shape(s)[1] for s in range(a.batches_per_epoch)) < max(a.train_shape(s)[1]
                                                                             for s in range(a.batches_per_epoch))
    # An epoch covers every training pair once.
    seen = np.concatenate([a._train_ids(s) for s in range(a.batches_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == a.batches_per_epoch * 8
    # Held-out batches are a random sample of lengths, not the shortest pairs first.
    first = np.mean([len(a.val.src[i]) for i in a._val_ids(0)])
    assert first > np.percentile([len(s) for s in a.val.src], 10)


def test_malformed_or_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_pairs(str(tmp_path / "nope.tsv"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n\tonly target\n")
    with pytest.raises(UserError, match="bad.tsv:2"):
        read_pairs(str(bad))


def test_held_out_batches_cover_each_pair_once_and_pad_the_last_batch():
    """Held-out loss sums over whole batches: the last one is filled with padding rows (no loss), not
    with pairs from the beginning again."""
    tok = train_tokenizer("char", [t for p in make_pairs(300) for t in p])
    train, val = encode_pairs(make_pairs(300, 1), tok), encode_pairs(make_pairs(21, 2), tok)
    batches = PairBatches(train, val, 64, 8, seed=3, pad_id=tok.pad_id, name="x")
    assert batches.val_batches() == 3
    ids = np.concatenate([batches._val_ids(i) for i in range(3)])
    real = ids[ids >= 0]
    assert sorted(real.tolist()) == list(range(21)) and (ids < 0).sum() == 3
    last = batches.val_rows(2)
    assert (last[-3:] == tok.pad_id).all() and (last[:-3] != tok.pad_id).any(axis=1).all()


def test_a_source_cut_to_the_context_keeps_its_end_of_sequence():
    from plutao.train.eval.translate import fit_source

    ids = np.array([20, 21, 22, 23, 24, 3], np.int32)  # ... <eos>
    cut, was_cut = fit_source(ids, 4, eos_id=3)
    assert cut.tolist() == [20, 21, 22, 3] and was_cut
    same, was_cut = fit_source(ids, 6, eos_id=3)
    assert same.tolist() == ids.tolist() and not was_cut
