"""Embedding probes on hand-built tables with known answers, and the attention-map PNG grid."""

import math
import warnings

import numpy as np
import pytest

from plutao.experiments import attention_plot
from plutao.experiments.attention_plot import _layout, plot_attention_grid, plot_attention_sets, token_label
from plutao.model.probes import analogy, cosine_similarities, nearest_neighbors

ANGLES = [0, 10, 30, 60, 90, 180]  # degrees: row i is the unit vector at ANGLES[i]
CIRCLE = np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ANGLES])

# king − man + woman = queen exactly (all rows have length √2); royal and apple are distractors.
KING, QUEEN, MAN, WOMAN, ROYAL, APPLE = range(6)
ROYALTY = np.array([
    [1, 1, 0, 0],  # king
    [1, 0, 1, 0],  # queen
    [0, 1, 0, 1],  # man
    [0, 0, 1, 1],  # woman
    [1, 0, 0, 0],  # royal
    [0, 0, 0, 1],  # apple
], dtype=np.float64)


def test_cosine_similarities_ignore_length():
    table = CIRCLE * np.array([[1.0], [5.0], [0.1], [2.0], [3.0], [7.0]])
    sims = cosine_similarities(table, np.array([2.0, 0.0]))
    np.testing.assert_allclose(sims, [math.cos(math.radians(a)) for a in ANGLES], atol=1e-12)


def test_zero_rows_and_zero_query_score_zero_without_warnings():
    table = np.vstack([CIRCLE, np.zeros((1, 2))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sims = cosine_similarities(table, np.array([1.0, 0.0]))
        assert sims[-1] == 0.0 and np.isfinite(sims).all()
        assert (cosine_similarities(table, np.zeros(2)) == 0.0).all()
        neighbours = nearest_neighbors(table, len(table) - 1, k=3)  # a zero row's neighbours: all 0, by id
        assert neighbours == [(0, 0.0), (1, 0.0), (2, 0.0)]


def test_nearest_neighbors_on_a_circle():
    got = nearest_neighbors(CIRCLE, 0, k=3)
    assert [i for i, _ in got] == [1, 2, 3]  # 10°, 30°, 60° away
    np.testing.assert_allclose([s for _, s in got], [math.cos(math.radians(a)) for a in (10, 30, 60)])
    everything = nearest_neighbors(CIRCLE, 1, k=10)  # from 10°: 0, 30, 60, 90, 180
    assert [i for i, _ in everything] == [0, 2, 3, 4, 5]
    sims = [s for _, s in everything]
    assert sims == sorted(sims, reverse=True)


def test_nearest_neighbors_exclude_k_and_ties():
    got = nearest_neighbors(CIRCLE, 0, k=10, exclude=[1, 3])
    assert [i for i, _ in got] == [2, 4, 5]  # never itself, never an excluded id, k capped at what is left
    assert nearest_neighbors(CIRCLE, 0, k=0) == []
    twins = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]])  # rows 1, 2, 3 point the same way
    assert [i for i, _ in nearest_neighbors(twins, 0, k=3)] == [1, 2, 3]  # equal scores: smaller id first
    assert [i for i, _ in nearest_neighbors(twins, 3, k=3)] == [1, 2, 0]


def test_analogy_king_minus_man_plus_woman_is_queen():
    best, *rest = analogy(ROYALTY, KING, MAN, WOMAN, k=5)
    assert best[0] == QUEEN and best[1] == pytest.approx(1.0)
    ids = [best[0]] + [i for i, _ in rest]
    assert not {KING, MAN, WOMAN} & set(ids)  # the inputs are never answers
    assert sorted(ids) == [QUEEN, ROYAL, APPLE]  # k larger than what is left
    sims = [best[1]] + [s for _, s in rest]
    assert sims == sorted(sims, reverse=True)
    assert [i for i, _ in analogy(ROYALTY, KING, MAN, WOMAN, k=1, exclude=[QUEEN])] == [ROYAL]


def test_analogy_normalises_before_adding():
    """A long king vector would drag the raw offset toward "royal"; unit vectors still give queen."""
    table = ROYALTY.copy()
    table[KING] *= 10
    raw = table[KING] - table[MAN] + table[WOMAN]
    assert int(np.argmax(np.where(np.isin(np.arange(6), [KING, MAN, WOMAN]), -np.inf,
                                  cosine_similarities(table, raw)))) == ROYAL
    assert analogy(table, KING, MAN, WOMAN, k=1)[0][0] == QUEEN


def test_probes_reject_bad_ids():
    with pytest.raises(ValueError, match="outside the table"):
        nearest_neighbors(CIRCLE, 6)
    with pytest.raises(ValueError, match="outside the table"):
        analogy(CIRCLE, 0, 1, -1)
    with pytest.raises(ValueError, match="excluded id"):
        nearest_neighbors(CIRCLE, 0, exclude=[99])
    with pytest.raises(ValueError, match="shape"):
        cosine_similarities(CIRCLE, np.ones(3))


# --- attention grid ------------------------------------------------------------------------------

def _weights(layers: int, heads: int, tq: int, tk: int, seed: int = 0) -> list[np.ndarray]:
    """Softmax-normalised random weights: each (layer, head, query) row sums to 1."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        logits = rng.normal(size=(heads, tq, tk)) * 2
        e = np.exp(logits - logits.max(-1, keepdims=True))
        out.append(e / e.sum(-1, keepdims=True))
    return out


def _read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_grid_png_grows_with_layers_and_heads(tmp_path):
    import matplotlib.pyplot as plt

    tokens = list("abcd")
    sizes = {}
    for layers, heads in [(1, 1), (1, 3), (2, 3)]:
        path = plot_attention_grid(_weights(layers, heads, 4, 4), tokens, tokens,
                                   tmp_path / f"a{layers}{heads}.png", title="test")
        assert path == tmp_path / f"a{layers}{heads}.png" and path.is_file()
        sizes[layers, heads] = _read_png(path).shape[:2]  # (height, width) in pixels
    assert sizes[1, 3][1] > sizes[1, 1][1]  # more heads: wider
    assert sizes[2, 3][0] > sizes[1, 3][0]  # more layers: taller
    assert plt.get_fignums() == []  # every figure closed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a11.png", "a13.png", "a23.png"]  # no temp files


def test_special_tokens_render_visibly(tmp_path, monkeypatch):
    tokens = ["<|endoftext|>", "\n", " the", "$x$", "\t", "", "\x00", "é"]
    assert [token_label(t) for t in tokens] == ["<|endoftext|>", "\\n", "␣the", "\\$x\\$", "\\t", "∅", "\\x00", "é"]
    seen = {}
    save = attention_plot._save_atomic

    def spy(fig, path):
        seen["labels"] = [[t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes[:-1]]
        seen["drawn"] = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        save(fig, path)

    monkeypatch.setattr(attention_plot, "_save_atomic", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing glyphs, no mathtext parse errors
        path = plot_attention_grid(_weights(1, 2, 8, 8), tokens, tokens, tmp_path / "special.png")
    _read_png(path)
    assert seen["labels"][0] == [token_label(t) for t in tokens]
    assert seen["labels"][1] == seen["labels"][0]  # ≤ 16 tokens: every heatmap is labelled


def test_many_tokens_label_outer_axes_only(tmp_path, monkeypatch):
    tokens = [f"t{i}" for i in range(24)]
    seen = {}
    save = attention_plot._save_atomic

    def spy(fig, path):
        seen["x"] = [bool(ax.get_xticks().size) for ax in fig.axes[:-1]]
        seen["y"] = [bool(ax.get_yticks().size) for ax in fig.axes[:-1]]
        seen["titles"] = [ax.get_title() for ax in fig.axes[:-1]]
        seen["clim"] = fig.axes[0].images[0].get_clim()
        save(fig, path)

    monkeypatch.setattr(attention_plot, "_save_atomic", spy)
    _read_png(plot_attention_grid(_weights(2, 2, 24, 24), tokens, tokens, tmp_path / "many.png"))
    assert seen["titles"] == ["layer 0 · head 0", "layer 0 · head 1", "layer 1 · head 0", "layer 1 · head 1"]
    assert seen["x"] == [False, False, True, True]  # key tokens on the bottom row
    assert seen["y"] == [True, False, True, False]  # query tokens on the left column
    assert seen["clim"] == (0.0, 1.0)


def test_layout_is_capped():
    (w, h), fontsize, stride_x, stride_y = _layout(layers=48, heads=32, tq=1024, tk=1024)
    assert max(w, h) <= attention_plot.MAX_INCHES and fontsize >= attention_plot.MIN_LABEL_PT
    assert stride_x > 1 and stride_y > 1  # too many tokens to label each one readably
    (w1, h1), *_ = _layout(1, 1, 4, 4)
    (w2, h2), *_ = _layout(2, 4, 4, 4)
    assert w2 > w1 and h2 > h1


def test_shape_mismatch_raises_one_line(tmp_path):
    tokens = list("abc")
    cases = [
        (_weights(1, 2, 3, 4), tokens, tokens),  # Tk disagrees with the key tokens
        (_weights(1, 2, 3, 3), tokens, list("ab")),
        (_weights(1, 2, 3, 3) + _weights(1, 3, 3, 3), tokens, tokens),  # head counts differ
        ([np.ones((3, 3))], tokens, tokens),  # not (H, Tq, Tk)
        ([], tokens, tokens),
    ]
    for weights, q, k in cases:
        with pytest.raises(ValueError) as err:
            plot_attention_grid(weights, q, k, tmp_path / "bad.png")
        assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import matplotlib.figure

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError):
        plot_attention_grid(_weights(1, 1, 2, 2), ["a", "b"], ["a", "b"], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_attention_sets_one_png_each(tmp_path):
    src, tgt = ["<s>", "hi", "</s>"], ["<s>", "yo"]
    sets = {
        "encoder-self": (_weights(2, 2, 3, 3), src, src),
        "decoder-self": (_weights(2, 2, 2, 2), tgt, tgt),
        "cross": (_weights(2, 2, 2, 3), tgt, src),
    }
    paths = plot_attention_sets(sets, tmp_path / "out", "step100")
    assert [p.name for p in paths] == ["step100-encoder-self.png", "step100-decoder-self.png", "step100-cross.png"]
    for p in paths:
        assert p.parent == tmp_path / "out"
        _read_png(p)
    bad = dict(sets, cross=(_weights(2, 2, 3, 2), tgt, src))  # cross has Tq/Tk swapped
    with pytest.raises(ValueError, match="layer 0"):
        plot_attention_sets(bad, tmp_path / "bad", "s")
    assert not (tmp_path / "bad").exists()  # checked before anything is written
