"""A plutao run as a model of lm-evaluation-harness (`lm_eval`), the harness the field reports with.

    python -m plutao.experiments.harness --model plutao --model_args run=RUN --tasks hellaswag,...
    plutao eval RUN --harness hellaswag,lambada_openai [--limit N] [--include-path DIR]

The first is lm_eval's own command line with the `plutao` model registered (lm_eval finds models only
among those imported before it parses its arguments, so `lm_eval --model plutao` itself cannot see
it); the second calls lm_eval's `simple_evaluate` with the run and prints its table.

- `loglikelihood` (multiple choice, cloze): each context + continuation scored in one forward pass,
  batched by length (rows padded on the right to a few compiled widths); the log-probability of the
  continuation's tokens and whether each was the argmax.
- `loglikelihood_rolling` (perplexity tasks): `plutao eval`'s own computation (train/eval/likelihood.py
  stream_metrics) over <|endoftext|> + the text: windows of the model's context, each predicting its
  tokens from the ones before it in the window.
- `generate_until`: the slot sampler (model/decode.py), greedy unless the task samples, cut at the
  task's stop strings.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from plutao.model.decode import complete
from plutao.model.heads import forward_logits
from plutao.model.sampling import SamplingConfig
from plutao.train.eval.likelihood import stream_metrics
from plutao.train.losses import token_logprobs
from plutao.train.run.lineage import load_run

MIN_WIDTH = 16  # rows are padded to MIN_WIDTH · 2^k tokens (at most the context): a few compiled shapes


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, params, tokens_BT1):
    """Per position: log P(next token) and whether it was the most likely one."""
    logits_BTV, _ = forward_logits(nnx.merge(graphdef, params), tokens_BT1[:, :-1])
    targets_BT = tokens_BT1[:, 1:]
    return token_logprobs(logits_BTV, targets_BT), jnp.argmax(logits_BTV, axis=-1) == targets_BT


@register_model("plutao")
class PlutaoLM(TemplateLM):
    """`--model_args run=RUN[,step=N,batch_size=16,max_gen_toks=256]`."""

    def __init__(self, run: str, step: int | None = None, batch_size: int | str = 16, max_gen_toks: int = 256,
                 **_ignored):
        super().__init__()
        self.run = load_run(Path(run), None if step in (None, "") else int(step))
        self.tok = self.run.tokenizer
        self.graphdef, self.params = self.run.trainer.graphdef, self.run.params
        self.batch = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: the BOS token where the tokenizer has one (as lm_eval's
        Hugging Face model does), else <|endoftext|>."""
        return self.tok.special_id("bos") if self.tok.has_special("bos") else self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.run.cfg.model.context_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = []
        for i, (_, context, continuation) in enumerate(requests):
            context = list(context) or [self.prefix_token_id]
            whole = (context + list(continuation))[-(self.max_length + 1):]  # (the context's start drops off)
            rows.append((i, whole, min(len(continuation), len(whole) - 1)))
        rows.sort(key=lambda r: -len(r[1]))
        for lo in range(0, len(rows), self.batch):
            chunk = rows[lo:lo + self.batch]
            width = MIN_WIDTH
            while width < max(len(w) for _, w, _ in chunk):
                width *= 2
            width = min(width, self.max_length + 1)
            tokens = np.full((self.batch, width), self.tok.pad_id, np.int32)
            for j, (_, whole, _) in enumerate(chunk):
                tokens[j, :len(whole)] = whole
            logprobs, greedy = (np.asarray(a) for a in _scores(self.graphdef, self.params, tokens))
            for j, (i, whole, n) in enumerate(chunk):
                span = slice(len(whole) - 1 - n, len(whole) - 1)  # (the positions predicting the continuation)
                out[i] = (float(logprobs[j, span].astype(np.float64).sum()), bool(greedy[j, span].all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            (text,) = request.args
            ids = np.asarray([self.tok.eot_id, *self.tok.encode(text)], np.int32)
            if len(ids) < 2:
                out.append(0.0)
                continue
            m = stream_metrics(self.graphdef, self.params, ids, self.max_length, self.tok)
            out.append(-m["loss"] * m["tokens"])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        model, banned = self.run.model, self.tok.unsampled_ids(vocab_size=self.run.cfg.model.vocab_size)
        prompts, samplings, stops = [], [], []
        for request in requests:
            context, gen = request.args
            until = gen.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            budget = max(1, min(int(gen.get("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            prompts.append(self.tok.encode(context)[-(self.max_length - budget):] or [self.tok.eot_id])
            temperature = float(gen.get("temperature", 0.0)) if gen.get("do_sample") else 0.0
            samplings.append(SamplingConfig(temperature=temperature, max_new_tokens=budget, banned_ids=banned))
        out = []
        for lo in range(0, len(prompts), self.batch):  # (a batch of slots decodes together)
            done = complete(model, prompts[lo:lo + self.batch], samplings[lo:lo + self.batch], eot_id=self.tok.eot_id,
                            pad_id=self.tok.pad_id)
            for d, until in zip(done, stops[lo:lo + self.batch]):
                text = self.tok.decode(d.content, skip_special=True)
                cut = min((text.index(u) for u in until if u and u in text), default=len(text))
                out.append(text[:cut])
        return out


def evaluate(run: str, tasks: list[str], *, step: int | None = None, limit: int | None = None,
             num_fewshot: int | None = None, task_manager=None, batch_size: int = 16) -> dict:
    """lm_eval's simple_evaluate on the run (`plutao eval RUN --harness TASKS`)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = PlutaoLM(run, step=step, batch_size=batch_size)
    manager = task_manager or TaskManager()
    return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager, log_samples=False)


def cmd_harness(args) -> int:
    """`plutao eval RUN --harness TASKS`: the tasks named first (an unknown one is a one-line error), then
    lm_eval's table (or its results as JSON)."""
    import json

    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from plutao.train.config.errors import UserError

    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    manager = TaskManager(include_path=args.include_path)
    unknown = [t for t in tasks if t not in set(manager.all_tasks)]
    if unknown:
        raise UserError(f"lm_eval has no task {unknown[0]!r}; `lm_eval ls tasks` lists them (or add --include-path DIR "
                        "with your own task YAML)")
    results = evaluate(args.run_dir, tasks, step=args.step, limit=args.limit or None, num_fewshot=args.num_fewshot,
                       task_manager=manager)
    if args.json:
        print(json.dumps({"run_dir": args.run_dir, "results": results["results"]}, default=str))
    else:
        print(make_table(results))
    return 0


if __name__ == "__main__":  # lm_eval's command line, with the plutao model registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
