"""Scoring with a trained reward model: conversations in, one number per conversation out.

The score is read at the <|reward|> token after the reply (tokenizer/chat.py: reward_ids), shifted
by the run's offset and divided by its scale (RUN_DIR/reward_offset.json, written when `plutao reward`
finishes: the offset is the mean raw score of the SFT demonstrations, so a demonstration-quality reply
scores about 0; the scale is the standard deviation of the raw scores of the replies in its held-out
rankings, for the built-in world samples of the SFT model, so one unit of score is one spread of what
the policy starts by writing and RL's β is in known units).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from plutao.model.sampling import prompt_width
from plutao.tokenizer.chat import ChatError, reward_ids
from plutao.train.config.errors import UserError
from plutao.train.run.lineage import LoadedRun, load_run
from plutao.train.tasks.reward import reward_scores

OFFSET_FILE = "reward_offset.json"


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, params, tokens_NT, index_N):
    return reward_scores(nnx.merge(graphdef, params), tokens_NT, index_N)


@dataclasses.dataclass
class RewardScorer:
    run: LoadedRun
    offset: float = 0.0  # subtracted from every raw score ...
    scale: float = 1.0  # ... which is then divided by this

    @classmethod
    def load(cls, run_dir, step: int | None = None, *, what: str = "--reward") -> RewardScorer:
        run = load_run(Path(run_dir), step)
        if not run.task.judges:
            raise UserError(f"{what} {run_dir} is not a reward-model run (train.task={run.cfg.train.task or 'none'}); "
                            "give the --workdir of a `plutao reward` run")
        return cls(run, *read_shift(run.run_dir, run.step))

    @property
    def tokenizer(self):
        return self.run.tokenizer

    def encode(self, conversations, ended=None) -> list[list[int]]:
        ended = [True] * len(conversations) if ended is None else ended
        try:
            return [reward_ids(c, self.tokenizer, ended=e)[-self.run.cfg.model.context_length:]
                    for c, e in zip(conversations, ended)]
        except ChatError as e:
            raise UserError(str(e)) from None

    def raw(self, conversations, batch: int = 128, ended=None) -> np.ndarray:
        """Unshifted scores, in batches of right-padded rows (one program per power-of-two width).
        `ended[i]` False: reply i did not end with <|end|>."""
        seqs = self.encode(conversations, ended)
        graphdef, params = nnx.split(self.run.model)
        context = self.run.cfg.model.context_length
        out = np.zeros(len(seqs), np.float32)
        for lo in range(0, len(seqs), batch):
            part = seqs[lo:lo + batch]
            width = prompt_width(max(len(s) for s in part), context)
            tokens = np.full((batch, width), self.tokenizer.pad_id, np.int32)
            index = np.zeros(batch, np.int32)
            for i, s in enumerate(part):
                tokens[i, :len(s)], index[i] = s, len(s) - 1
            out[lo:lo + len(part)] = np.asarray(_scores(graphdef, params, tokens, index))[:len(part)]
        return out

    def score(self, conversations, batch: int = 128, ended=None) -> np.ndarray:
        return (self.raw(conversations, batch, ended) - self.offset) / self.scale


def read_shift(run_dir: Path, step: int) -> tuple[float, float]:
    """(offset, scale) of a reward model's checkpoint; (0, 1) when none was measured for that step (a
    run from before the scale was measured has scale 1)."""
    path = Path(run_dir) / OFFSET_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return 0.0, 1.0
    if record.get("step") != step:
        return 0.0, 1.0
    return float(record["offset"]), float(record.get("scale", 1.0))


def write_shift(run_dir: Path, step: int, offset: float, scale: float, demonstrations: int, replies: int) -> None:
    path = Path(run_dir) / OFFSET_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"offset": offset, "scale": scale, "step": step, "demonstrations": demonstrations,
                               "replies": replies}))
    tmp.replace(path)
