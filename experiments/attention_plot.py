"""Attention maps as a PNG grid: one row per layer, one column per head, one shared 0..1 colour scale.

A shared scale makes heads comparable at a glance (a sharp head and a diffuse one look different), and
tokens are drawn escaped ("\\n", "␣") so whitespace and control characters stay visible on the axes.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_INCHES = 40.0  # past this a PNG is too large to open comfortably and labels no longer help
DPI = 100
ALL_TICKS_UP_TO = 16  # with this few tokens every heatmap gets its own labels
MAX_LABEL_CHARS = 24  # longer tokens are cut so labels do not squeeze the heatmaps
MIN_LABEL_PT = 5.0  # smaller text is unreadable, so ticks are thinned instead
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r", " ": "␣", "$": "\\$"}  # "\$": no mathtext


def token_label(token: str) -> str:
    """A token as a tick label: whitespace and control characters shown, not swallowed or drawn as boxes."""
    out = []
    for ch in str(token):
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    label = "".join(out) or "∅"
    return label if len(label) <= MAX_LABEL_CHARS else label[: MAX_LABEL_CHARS - 1] + "…"


def _checked(weights: Sequence[np.ndarray], query_tokens: Sequence[str], key_tokens: Sequence[str]):
    """Weights as float arrays of one shape (H, Tq, Tk), or a one-line ValueError saying what disagrees."""
    if len(weights) == 0:
        raise ValueError("no attention weights: expected one (H, Tq, Tk) array per layer")
    arrays = [np.asarray(w, dtype=np.float32) for w in weights]
    tq, tk = len(query_tokens), len(key_tokens)
    if tq == 0 or tk == 0:
        raise ValueError(f"token lists must not be empty (got {tq} query and {tk} key tokens)")
    for i, w in enumerate(arrays):
        if w.ndim != 3 or w.shape[0] == 0:
            raise ValueError(f"layer {i}: weights must have shape (H, Tq, Tk) with H >= 1, got {w.shape}")
        if w.shape[0] != arrays[0].shape[0]:
            raise ValueError(f"layer {i} has {w.shape[0]} heads but layer 0 has {arrays[0].shape[0]}")
        if w.shape[1:] != (tq, tk):
            raise ValueError(
                f"layer {i}: weights of shape {w.shape} do not match {tq} query and {tk} key tokens "
                f"(expected (H, {tq}, {tk}))"
            )
    return arrays


def _layout(layers: int, heads: int, tq: int, tk: int) -> tuple[tuple[float, float], float, int, int]:
    """Figure size, label font size and tick strides: grows with the grid and tokens, capped at MAX_INCHES."""
    cell_w, cell_h = max(1.8, 0.18 * tk), max(1.8, 0.18 * tq)
    margin_w, margin_h = 2.0, 1.6  # y labels + colorbar; x labels + title
    width, height = heads * cell_w + margin_w, layers * cell_h + margin_h
    scale = min(1.0, MAX_INCHES / width, MAX_INCHES / height)
    per_token_pt = 72.0 * min(cell_w / tk, cell_h / tq) * scale
    fontsize = float(np.clip(0.8 * per_token_pt, MIN_LABEL_PT, 9.0))
    stride_x = max(1, int(np.ceil(fontsize / (72.0 * cell_w * scale / tk))))
    stride_y = max(1, int(np.ceil(fontsize / (72.0 * cell_h * scale / tq))))
    return (width * scale, height * scale), fontsize, stride_x, stride_y


def _save_atomic(fig, path: Path) -> None:
    """Write next to `path`, then rename, so a reader never sees a half-written PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_attention_grid(
    weights: list[np.ndarray], query_tokens: list[str], key_tokens: list[str], path, title: str = ""
) -> Path:
    """One heatmap per (layer, head) of attention probabilities; returns the PNG's path.

    `weights[i]` has shape (H, Tq, Tk) with rows summing to 1: row q is where query token q looks.
    """
    arrays = _checked(weights, query_tokens, key_tokens)
    layers, heads, tq, tk = len(arrays), arrays[0].shape[0], len(query_tokens), len(key_tokens)
    figsize, fontsize, stride_x, stride_y = _layout(layers, heads, tq, tk)
    every_axis = max(tq, tk) <= ALL_TICKS_UP_TO
    xlabels = [token_label(t) for t in key_tokens]
    ylabels = [token_label(t) for t in query_tokens]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(layers, heads, figsize=figsize, dpi=DPI, squeeze=False, layout="constrained")
    try:
        image = None
        for i, layer in enumerate(arrays):
            for j in range(heads):
                ax = axes[i, j]
                image = ax.imshow(layer[j], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                                  interpolation="nearest")
                ax.set_title(f"layer {i} · head {j}", fontsize=max(fontsize, 8.0))
                show_x = every_axis or i == layers - 1
                show_y = every_axis or j == 0
                xs, ys = range(0, tk, stride_x), range(0, tq, stride_y)
                ax.set_xticks(list(xs) if show_x else [])
                ax.set_yticks(list(ys) if show_y else [])
                if show_x:
                    ax.set_xticklabels([xlabels[k] for k in xs], rotation=90, fontsize=fontsize)
                if show_y:
                    ax.set_yticklabels([ylabels[q] for q in ys], fontsize=fontsize)
                if i == layers - 1 and j == 0:
                    ax.set_xlabel("key", fontsize=max(fontsize, 8.0))
                    ax.set_ylabel("query", fontsize=max(fontsize, 8.0))
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
        if title:
            fig.suptitle(title)
        _save_atomic(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_attention_sets(
    sets: dict[str, tuple[list[np.ndarray], list[str], list[str]]], out_dir, stem: str
) -> list[Path]:
    """One grid per named set (e.g. "encoder-self", "decoder-self", "cross") as OUT_DIR/{stem}-{name}.png."""
    for name, (weights, query_tokens, key_tokens) in sets.items():  # all checked before any file is written
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"attention set name {name!r} must be non-empty and contain no path separator")
        _checked(weights, query_tokens, key_tokens)
    out_dir = Path(out_dir)
    paths = []
    for name, (weights, query_tokens, key_tokens) in sets.items():
        paths.append(plot_attention_grid(weights, query_tokens, key_tokens, out_dir / f"{stem}-{name}.png",
                                         title=f"{stem} · {name}"))
    return paths
