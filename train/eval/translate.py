"""Translate with a trained encoder-decoder run, and score translations with sacrebleu (BLEU, chrF)."""

from __future__ import annotations

import math
import sys

import numpy as np
from flax import nnx

from plutao.model.sampling import to_host
from plutao.model.seq2seq import beam_search, greedy_decode, strip
from plutao.train.config.errors import UserError
from plutao.train.data.pairs import encode_pairs, encode_source, pack, padded_length
from plutao.train.eval.likelihood import pad_rows

DECODE_BATCH = 64


def fit_source(ids: np.ndarray, context: int, eos_id: int) -> tuple[np.ndarray, bool]:
    """A source cut to the context keeps its final <eos> (the encoder was trained on sources that end in
    one); (ids, whether it was cut)."""
    if len(ids) <= context:
        return ids, False
    return np.concatenate([ids[:context - 1], np.array([eos_id], ids.dtype)]), True


def _report_cut(sources: list[str], context: int) -> None:
    first = sources[0] if len(sources[0]) <= 40 else sources[0][:37] + "..."
    print(f"plutao: {len(sources)} source(s) longer than the model's context of {context} tokens were cut to it "
          f"(keeping <eos>), e.g. {first!r}", file=sys.stderr)


def translate(model, tokenizer, sources: list[str], *, beam_size: int = 1, alpha: float = 0.6,
              max_len: int | None = None, n_best: int = 1, on_cut=_report_cut) -> list[list[tuple[str, float]]]:
    """For each source, its n_best translations with their scores (log-probability for greedy,
    length-normalised log-probability for beam search), best first. Sources longer than the context
    are cut to it, and `on_cut(cut_sources, context)` is told."""
    if beam_size < 1 or n_best < 1 or n_best > beam_size:
        raise UserError(f"--beam must be ≥ 1 and --n-best between 1 and the beam size, got beam {beam_size}, "
                        f"n-best {n_best}")
    context = model.cfg.context_length
    max_len = max_len or context
    graphdef, params = nnx.split(model)
    fitted = [fit_source(encode_source(tokenizer, s), context, tokenizer.eos_id) for s in sources]
    encoded = [ids for ids, _ in fitted]
    cut = [s for s, (_, was_cut) in zip(sources, fitted) if was_cut]
    if cut and on_cut is not None:
        on_cut(cut, context)
    order = np.argsort([len(e) for e in encoded], kind="stable")  # similar lengths share a batch
    out: list[list[tuple[str, float]]] = [[] for _ in sources]
    for lo in range(0, len(order), DECODE_BATCH):
        ids = order[lo:lo + DECODE_BATCH]
        L = padded_length(max(len(encoded[i]) for i in ids), context)
        src = pack([encoded[i] for i in ids], [np.zeros(0, np.int32)] * len(ids), L, tokenizer.pad_id)[:, :L]
        # Fixed batch size: one compilation per source length, however many sentences.
        src = np.concatenate([src, np.full((DECODE_BATCH - len(ids), L), tokenizer.pad_id, np.int32)])
        valid = src != tokenizer.pad_id
        valid[len(ids):, 0] = True  # filler rows attend somewhere; their output is discarded
        if beam_size == 1:
            tokens, score = greedy_decode(graphdef, params, src, valid, tokenizer.bos_id, tokenizer.eos_id,
                                          max_len=max_len)
            tokens, score = to_host(tokens)[:, None], to_host(score)[:, None]
        else:
            tokens, score, _ = beam_search(graphdef, params, src, valid, tokenizer.bos_id, tokenizer.eos_id,
                                           tokenizer.pad_id, max_len=max_len, beam_size=beam_size, alpha=alpha)
            tokens, score = to_host(tokens), to_host(score)
        for row, i in enumerate(ids):
            out[i] = [(tokenizer.decode(strip(tokens[row, k], tokenizer.eos_id, tokenizer.pad_id)), float(score[row, k]))
                      for k in range(n_best)]
    return out


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF from sacrebleu with its default settings (13a tokenisation)."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu_metric, chrf_metric = BLEU(), CHRF()
    bleu = bleu_metric.corpus_score(hypotheses, [references])
    chrf = chrf_metric.corpus_score(hypotheses, [references])
    return {"bleu": bleu.score, "chrf": chrf.score, "bleu_signature": str(bleu_metric.get_signature()),
            "bleu_detail": str(bleu), "brevity_penalty": bleu.bp}


def teacher_forced_loss(trainer, params, tokenizer, pairs: list[tuple[str, str]]) -> dict:
    """Mean cross-entropy per target token (and perplexity) over pairs that fit the context."""
    enc = encode_pairs(pairs, tokenizer)
    L = trainer.model_cfg.context_length
    keep = [i for i in range(len(enc)) if len(enc.src[i]) <= L and len(enc.tgt[i]) <= L + 1]
    total, count = 0.0, 0.0
    for lo in range(0, len(keep), DECODE_BATCH):
        ids = keep[lo:lo + DECODE_BATCH]
        width = padded_length(max(max(len(enc.src[i]), len(enc.tgt[i]) - 1) for i in ids), L)
        batch = pack([enc.src[i] for i in ids], [enc.tgt[i] for i in ids], width, tokenizer.pad_id)
        sums = trainer.eval_step(params, pad_rows(batch, trainer.mesh.size, tokenizer.pad_id), np.int32(lo))
        total, count = total + float(sums["loss"]), count + float(sums["count"])
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "target_tokens": int(count),
            "pairs_scored": len(keep)}


def evaluate_translation(run, pairs: list[tuple[str, str]], beams: list[int], alpha: float) -> dict:
    """Teacher-forced loss, then BLEU/chrF for each beam size (1 = greedy)."""
    if not pairs:
        raise UserError("no sentence pairs to evaluate")
    result = teacher_forced_loss(run.trainer, run.params, run.tokenizer, pairs)
    sources, references = [s for s, _ in pairs], [t for _, t in pairs]
    model = run.model
    context = model.cfg.context_length
    result["sources_cut_to_context"] = sum(len(encode_source(run.tokenizer, s)) > context for s in sources)
    for beam in beams:
        hyps = [h[0][0] for h in translate(model, run.tokenizer, sources, beam_size=beam, alpha=alpha, on_cut=None)]
        name = "greedy" if beam == 1 else f"beam{beam}"
        result[name] = corpus_scores(hyps, references)
        result[name]["examples"] = [{"source": s, "hypothesis": h, "reference": r}
                                    for s, h, r in list(zip(sources, hyps, references))[:5]]
    return result
