"""Looking inside trained runs: attention maps, embedding neighbours and analogies, masked-token fills."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plutao.experiments.attention_plot import plot_attention_sets
from plutao.model.sampling import to_host
from plutao.train.config.errors import UserError


def attention_maps(run, text: str, target: str | None, out_dir: Path) -> list[Path]:
    """PNG grids (layer × head) of the attention weights for `text`: self-attention for a decoder or
    encoder; encoder self-, decoder self- and cross-attention for a translation model (on `target`, or
    the model's own greedy translation)."""
    run.task.check_command("attention", run.run_dir)
    if run.cfg.model.scan_layers:
        raise UserError("attention weights are not collected from scanned layers; this run has "
                        "model.scan_layers=true")
    if not run.tokenizer.encode(text):
        raise UserError("--text is empty; give a sentence to look at")
    sets = run.task.attention_sets(run.model, run.tokenizer, text, target)
    return plot_attention_sets(sets, out_dir, "attention")


def embedding_table(run) -> np.ndarray:
    return np.asarray(to_host(run.params["token_embed"]), np.float64)


def token_id(tokenizer, token: str) -> int:
    """The single id a user's token string stands for (a word-initial BPE piece if the tokenizer has one)."""
    # The word-initial form first: for BPE, " chat" is the word, "chat" a piece inside other words.
    candidates = [tokenizer.encode(" " + token) if not token.startswith(" ") else [], tokenizer.encode(token)]
    for ids in candidates:
        if len(ids) == 1:
            return ids[0]
    pieces = tokenizer.token_strings(candidates[1])
    raise UserError(f"{token!r} is {len(candidates[1])} tokens here ({' '.join(map(repr, pieces))}); give a single "
                    "token (see `plutao tokenize --tokenizer RUN_DIR TEXT`)")


def fill_mask(run, text: str, top_k: int) -> list[dict]:
    """For each <mask> in `text`, the top-k tokens with their probabilities (all masks predicted at once)."""
    run.task.check_command("fill-mask", run.run_dir)
    return run.task.fill(run.model, run.tokenizer, text, top_k)
