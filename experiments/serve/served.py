"""The runs a server serves: each loaded once (parameters only), named by its directory, with what the
API needs from it — its tokenizer, whether it chats (the training chat template) or judges (a reward
model), its context — and its decoding slots. Scoring passes (log-probs for `logprobs` / `echo`, a
reward model's score) run on the engine thread through `Engine.call`."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plutao.model.engine import MIN_WIDTH, DecoderBackend
from plutao.model.heads import forward_logits
from plutao.model.sampling import prompt_width
from plutao.tokenizer.chat import MAX_CALLS, result_tokens
from plutao.train.config.errors import UserError

TOP_LOGPROBS = 20  # the most alternatives a request may ask for per token (OpenAI's limit)


@dataclasses.dataclass
class Served:
    name: str
    run_dir: Path
    stage: str  # the run's task label: "language model", "SFT", "PPO", "reward model", ...
    tokenizer: object
    context: int
    chat: bool
    judges: bool
    model: object = None  # (the nnx model of a decoder run)
    backend: object = None  # DecoderBackend, or None for a reward model (nothing to decode)
    scorer: object = None  # RewardScorer of a reward model

    @property
    def has_tools(self) -> bool:
        return self.chat and self.tokenizer.has_tools


class NoSlots:
    """The engine's entry for a reward model: no decoding slots, only scoring calls."""

    n_slots, context = 0, 0

    def stop_ids(self, sampling):
        return ()

    def release(self, slot_ids):
        pass


def served_name(run_dir: Path, taken: set[str]) -> str:
    """A run's model id: its directory name, or parent/name when two runs share a name."""
    name = run_dir.name
    if name in taken:
        name = f"{run_dir.parent.name}/{run_dir.name}"
    if name in taken:
        raise UserError(f"two served runs are both named {name!r}; serve runs from directories with distinct names")
    return name


def load_served(run_dirs: list[str], n_slots: int) -> dict[str, Served]:
    from plutao.train.config.schema import Config
    from plutao.train.rl.rewards import RewardScorer
    from plutao.train.run.lineage import load_run
    from plutao.train.run.rundir import existing_run_config
    from plutao.train.tasks import task_class

    out: dict[str, Served] = {}
    for d in map(Path, run_dirs):
        cfg = Config.from_dict(existing_run_config(d))
        task = task_class(cfg)(cfg)
        if not task.trained_by_gradient:
            raise UserError(f"{d} is a {task.label} run, which `plutao serve` cannot serve; serve a language model, "
                            "an assistant stage or a reward model")
        name = served_name(d, set(out))
        if task.judges:
            scorer = RewardScorer.load(d, what="plutao serve")
            run = scorer.run
            out[name] = Served(name, d, task.label, run.tokenizer, run.cfg.model.context_length, False, True,
                               backend=NoSlots(), scorer=scorer)
            continue
        task.check_command("sample", str(d))
        run = load_run(d)
        model = run.model
        tools = bool(task.chat) and run.tokenizer.has_tools
        backend = DecoderBackend(model, n_slots=n_slots, eot_id=run.tokenizer.eot_id, pad_id=run.tokenizer.pad_id,
                                 tool_results=result_tokens(run.cfg.model.context_length, run.cfg.model.context_length // 2,
                                                            MAX_CALLS) if tools else 0)
        out[name] = Served(name, d, task.label, run.tokenizer, run.cfg.model.context_length, bool(task.chat), False,
                           model=model, backend=backend)
    return out


@functools.partial(jax.jit, static_argnums=(0, 3))
def _scored(graphdef, params, tokens_1W, k: int):
    logits, _ = forward_logits(nnx.merge(graphdef, params), tokens_1W)
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)  # (W, V)
    nxt = jnp.take_along_axis(logp[:-1], tokens_1W[0, 1:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp[:-1], min(k, logp.shape[-1]))
    return nxt, top_lp, top_ids


def warm_scoring(served: Served) -> int:
    """Compile the scoring pass at every width a request can need (before the server says it is ready)."""
    widths = sorted({prompt_width(max(n, MIN_WIDTH), served.context) for n in range(1, served.context + 1)})
    for w in widths:
        token_logprobs(served, [served.tokenizer.eot_id] * w, 1)
    return len(widths)


def token_logprobs(served: Served, ids: list[int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ids[1:]: each token's log-prob given the ones before it (the model at temperature 1, as
    `plutao score` computes it), and the k likeliest alternatives (log-probs, ids) at each position.
    Runs on the engine thread."""
    width = prompt_width(max(len(ids), MIN_WIDTH), served.context)
    tokens = np.full((1, width), served.tokenizer.pad_id, np.int32)
    tokens[0, :len(ids)] = ids
    graphdef, params = nnx.split(served.model)
    nxt, top_lp, top_ids = jax.device_get(_scored(graphdef, params, tokens, TOP_LOGPROBS))
    n = len(ids) - 1
    return np.asarray(nxt[:n]), np.asarray(top_lp[:n, :k]), np.asarray(top_ids[:n, :k])
