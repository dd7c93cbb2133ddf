"""Looking inside trained runs: attention maps, embedding neighbours and analogies, masked-token fills."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from plutao.model.sampling import to_host
from plutao.train.errors import UserError

MASK_TEXT = "<mask>"  # where a fill-mask query marks a hidden token


def attention_maps(run, text: str, target: str | None, out_dir: Path) -> list[Path]:
    """PNG grids (layer × head) of the attention weights for `text`: self-attention for a decoder or
    encoder; encoder self-, decoder self- and cross-attention for a translation model (on `target`, or
    the model's own greedy translation)."""
    from plutao.experiments.attention_plot import plot_attention_sets

    cfg, tok = run.cfg.model, run.tokenizer
    if cfg.family not in ("decoder", "encoder", "encoder_decoder"):
        raise UserError(f"model.family={cfg.family} has no attention; `plutao attention` needs a Transformer run")
    if cfg.scan_layers:
        raise UserError("attention weights are not collected from scanned layers; this run has "
                        "model.scan_layers=true")
    model = run.model
    ids = tok.encode(text)
    if not ids:
        raise UserError("--text is empty; give a sentence to look at")
    sets = {}
    if cfg.family == "encoder_decoder":
        from plutao.train.translate import translate

        src = ids + [tok.eos_id]
        if len(src) > cfg.context_length:
            raise UserError(f"the source is {len(src)} tokens, longer than model.context_length={cfg.context_length}")
        target = target if target is not None else translate(model, tok, [text], beam_size=1)[0][0][0]
        tgt = [tok.bos_id] + tok.encode(target)
        tgt = tgt[: cfg.context_length]
        src_a, tgt_a = np.array([src], np.int32), np.array([tgt], np.int32)
        _, weights = model(src_a, src_a != tok.pad_id, tgt_a, return_weights=True)
        src_s, tgt_s = tok.token_strings(src), tok.token_strings(tgt)
        sets = {"encoder-self": ([to_host(w)[0] for w in weights["encoder-self"]], src_s, src_s),
                "decoder-self": ([to_host(w)[0] for w in weights["decoder-self"]], tgt_s, tgt_s),
                "cross": ([to_host(w)[0] for w in weights["cross"]], tgt_s, src_s)}
    else:
        seq = ([tok.eot_id] + ids) if cfg.family == "decoder" else ids
        if len(seq) > cfg.context_length:
            raise UserError(f"the text is {len(seq)} tokens, longer than model.context_length={cfg.context_length}")
        arr = np.array([seq], np.int32)
        if cfg.family == "decoder":
            _, _, weights = model(arr, return_weights=True)
        else:
            _, weights = model(arr, return_weights=True)
        strings = tok.token_strings(seq)
        sets = {"self": ([to_host(w)[0] for w in weights], strings, strings)}
    return plot_attention_sets(sets, out_dir, "attention")


def embedding_table(run) -> np.ndarray:
    if run.cfg.model.family == "ngram":
        raise UserError("an n-gram model has no embeddings; use a neural run")
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
    import jax

    if run.cfg.model.family != "encoder":
        raise UserError(f"{run.run_dir} is a model.family={run.cfg.model.family} run; fill-mask needs a masked LM "
                        "(model.family=encoder, e.g. the bert-cpu preset)")
    if MASK_TEXT not in text:
        raise UserError(f"the text has no {MASK_TEXT}; mark the hidden token(s), e.g. \"The cat sat on the {MASK_TEXT}.\"")
    if top_k < 1:
        raise UserError(f"--top-k must be ≥ 1, got {top_k}")
    tok = run.tokenizer
    ids, positions = [], []
    for i, piece in enumerate(text.split(MASK_TEXT)):
        if i:
            positions.append(len(ids))
            ids.append(tok.mask_id)
        ids.extend(tok.encode(piece))
    if len(ids) > run.cfg.model.context_length:
        raise UserError(f"the text is {len(ids)} tokens, longer than model.context_length={run.cfg.model.context_length}")
    logits, _ = run.model(np.array([ids], np.int32))
    probs = np.asarray(jax.nn.softmax(to_host(logits)[0, positions].astype(np.float64), axis=-1))
    out = []
    for n, pos in enumerate(positions):
        p = probs[n].copy()
        p[: len(tok.special_ids)] = 0.0  # a fill is ordinary text
        top = np.argsort(-p)[:top_k]
        out.append({"position": pos, "fills": [{"token": tok.token_strings([int(i)])[0], "id": int(i),
                                                "prob": float(probs[n, i])} for i in top]})
    return out
