"""From sources to batches: load documents, tokenize once into a cached token array, sample rows.

A batch is a pure function of (seed, step): row r of step k starts at a position drawn from a
generator seeded with (seed, k), so resuming at step k needs no replay, and every process computes
the same global batch while materialising only its own rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from plutao.tokenizer import Tokenizer, TokenizerError
from plutao.train.config.errors import UserError
from plutao.train.config.schema import DataConfig
from plutao.train.data import corpora
from plutao.train.worlds import arith
from plutao.train.worlds.arith import World

TRAIN, VAL = 0, 1  # purposes mixed into the sampling seed


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("PLUTAO_CACHE", Path.home() / ".cache" / "plutao")).expanduser()


def source_paths(cfg: DataConfig) -> list[str]:
    return list(cfg.path) if isinstance(cfg.path, list) else [cfg.path]


def read_documents(spec: str, cfg: DataConfig, *, flag: str = "data.path", world: World | None = None) -> list[str]:
    """The documents of one source: a built-in/downloadable name, a .jsonl file, a text file or a folder.

    `flag` is what the user typed to name the source (`data.path`, `data.val_path`, `--data`), for the
    errors; `world` sets the built-in arithmetic world's corpora (builtin:arith-*)."""
    if spec.startswith("builtin:arith-"):
        kind = spec.removeprefix("builtin:arith-")
        if kind not in ("equations", "dialogue"):
            raise UserError(f"unknown built-in corpus {spec!r}; the arithmetic world has builtin:arith-equations and "
                            "builtin:arith-dialogue (builtin:arith is its chats, for `plutao sft`/`plutao reward`)")
        return arith.pretraining_documents(world or World(), kind)
    if spec.startswith("builtin:"):
        return corpora.builtin_documents(spec, cache_root(cfg))
    if spec in corpora.DOWNLOADS:
        spec = str(corpora.download(spec, cache_root(cfg)))
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob(cfg.glob) if p.is_file())
        if not files:
            raise UserError(f"{flag} folder {spec!r} has no files matching data.glob={cfg.glob!r}; "
                            "put text files there or change data.glob")
        docs = [_read_text(p) for p in files]
    elif path.is_file():
        docs = _read_jsonl(path, cfg.jsonl_field) if path.suffix == ".jsonl" else [_read_text(path)]
    else:
        names = ", ".join(corpora.BUILTINS + tuple(corpora.DOWNLOADS))
        raise UserError(f"{flag} {spec!r} does not exist; give a text file, a folder, a .jsonl file, or one of: {names}")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{flag} {spec!r} contains no text; point {flag} at a non-empty corpus")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; convert it or use data.glob to skip it") from None


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON; fix the line or remove it") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise UserError(f"{path}:{n} has no string field {field!r}; set data.jsonl_field to the text field")
        docs.append(record[field])
    return docs


def content_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def tokenize_documents(docs: list[str], tokenizer: Tokenizer, cache_dir: Path, *, unseen: bool = False) -> np.ndarray:
    """Documents joined by <|endoftext|> as one token array, memory-mapped from a cache keyed by
    (content, tokenizer): the corpus is tokenized once per tokenizer, whatever the run. `unseen` marks
    text the tokenizer was not trained on (held-out text): a character it has no id for becomes <unk>."""
    key = hashlib.sha256((content_hash(docs) + tokenizer.fingerprint + ("/unseen" if unseen else "")).encode())
    path = cache_dir / "tokens" / f"{key.hexdigest()[:32]}.npy"
    encode = tokenizer.encode_unseen if unseen else tokenizer.encode_array
    if not path.is_file():
        dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max else np.uint32
        parts = []
        for doc in docs:
            try:
                parts.append(encode(doc).astype(dtype))
            except TokenizerError as e:
                raise UserError(str(e)) from None
            parts.append(np.array([tokenizer.eot_id], dtype))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.concatenate(parts))
        tmp.replace(path)  # atomic: a crash never leaves a truncated cache entry
    return np.load(path, mmap_mode="r")


@dataclasses.dataclass
class Split:
    """One source's tokens, cut into a training part and a held-out tail."""

    name: str
    train: np.ndarray
    val: np.ndarray


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): the first 1 − val_fraction of a source's characters
    train and the rest is held out; the document the cut falls in is split in two there. The split is
    made on text, before any tokenizer exists, so the tokenizer is trained on the training part only."""
    cut = int(sum(len(d) for d in docs) * (1.0 - val_fraction))
    seen = 0
    for k, doc in enumerate(docs):
        if seen + len(doc) >= cut:
            head, tail = doc[: cut - seen], doc[cut - seen:]
            return docs[:k] + ([head] if head else []), ([tail] if tail else []) + docs[k + 1:]
        seen += len(doc)
    return list(docs), []


def training_texts(cfg: DataConfig, docs_per_source: list[list[str]]):
    """The text a run's tokenizer is trained on: every source's training part, never held-out text."""
    for docs in docs_per_source:
        yield from (docs if cfg.val_path else split_documents(docs, cfg.val_fraction)[0])


def load_splits(cfg: DataConfig, docs_per_source: list[list[str]], tokenizer: Tokenizer,
                world: World | None = None) -> list[Split]:
    """Each source's training and held-out tokens (the held-out part is data.val_path when given)."""
    cache = cache_root(cfg)
    sources = source_paths(cfg)
    if cfg.val_path:
        if len(sources) > 1:
            raise UserError("data.val_path holds out one file for one source; with a mixture use data.val_fraction")
        val_docs = read_documents(cfg.val_path, cfg, flag="data.val_path", world=world)
        return [Split(sources[0], tokenize_documents(docs_per_source[0], tokenizer, cache),
                      tokenize_documents(val_docs, tokenizer, cache, unseen=True))]
    out = []
    for name, docs in zip(sources, docs_per_source):
        train, val = split_documents(docs, cfg.val_fraction)
        out.append(Split(name, tokenize_documents(train, tokenizer, cache),
                         tokenize_documents(val, tokenizer, cache, unseen=True)))
    return out


def held_out_tokens(cfg: DataConfig, tokenizer: Tokenizer, world: World | None = None) -> list[tuple[str, np.ndarray]]:
    """(name, tokens) of each held-out part of a run's data, as its training evaluated them."""
    docs_per_source = [read_documents(s, cfg, world=world) for s in source_paths(cfg)]
    splits = load_splits(cfg, docs_per_source, tokenizer, world)
    if cfg.val_path:
        return [(cfg.val_path, splits[0].val)]
    return [(f"{s.name} (held-out {cfg.val_fraction:.0%})", s.val) for s in splits]


class Batches:
    """Step-indexed batches of (B, T+1) tokens from a weighted mixture of sources.

    `train_rows(step, rows)` materialises only the requested rows of the global batch; the
    trainer asks for exactly the rows its devices hold (see `train/data/batches.py: sharded_batch`), so
    each process reads its part of the batch, whatever the mesh.
    """

    def __init__(self, splits: list[Split], weights: list[float], seq_len: int, global_batch: int, seed: int):
        for s in splits:
            for part, arr in (("training", s.train), ("held-out", s.val)):
                if len(arr) < seq_len + 2:
                    raise UserError(
                        f"the {part} part of {s.name!r} has {len(arr)} tokens, fewer than the context "
                        f"model.context_length={seq_len} + 2; use more text or a smaller context")
        self.splits, self.seq_len, self.global_batch, self.seed = splits, seq_len, global_batch, seed
        w = np.asarray(weights or [1.0] * len(splits), np.float64)
        self.weights = w / w.sum()

    @property
    def shape(self) -> tuple[int, int]:
        return self.global_batch, self.seq_len + 1

    def train_shape(self, step: int) -> tuple[int, int]:
        return self.shape

    def val_shape(self, index: int) -> tuple[int, int]:
        return self.shape

    def tokens_per_step(self, step: int) -> int:
        return self.global_batch * self.seq_len

    def _draw(self, purpose: int, index: int, parts: list[np.ndarray], rows: slice) -> np.ndarray:
        rng = np.random.default_rng([self.seed, purpose, index])
        source_B = rng.choice(len(parts), size=self.global_batch, p=self.weights)
        # One uniform draw per row, scaled by each row's own source length: the same numbers for any split.
        u_B = rng.random(self.global_batch)
        rows = range(*rows.indices(self.global_batch))
        out = np.empty((len(rows), self.seq_len + 1), np.int32)
        for i, r in enumerate(rows):
            part = parts[source_B[r]]
            start = int(u_B[r] * (len(part) - self.seq_len))
            out[i] = part[start: start + self.seq_len + 1]
        return out

    def train_rows(self, step: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows of the global training batch for `step` (all of them by default)."""
        return self._draw(TRAIN, step, [s.train for s in self.splits], rows)

    def val_rows(self, index: int, rows: slice = slice(None)) -> np.ndarray:
        return self._draw(VAL, index, [s.val for s in self.splits], rows)

    def epochs_consumed(self, steps: int) -> dict[str, float]:
        """Expected passes over each source's training tokens after `steps` steps."""
        tokens = steps * self.global_batch * self.seq_len
        return {s.name: float(tokens * w / len(s.train)) for s, w in zip(self.splits, self.weights)}
