"""Commands that use a trained model on text: sample, eval, score, translate, fill-mask.

Which commands a run supports, and how `plutao eval` scores a token stream, are its task's answers
(train/tasks/); the n-gram table and translation pairs are evaluated by their own functions here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from plutao.experiments.commands import run_parser
from plutao.train.config.errors import UserError


def neural_only(cfg, command: str):
    """`cfg`, refused with a one-line error when it is an n-gram count table (no parameters, no graph)."""
    from plutao.train.tasks import task_class

    task = task_class(cfg)(cfg)
    if not task.trained_by_gradient:
        task.check_command(command, None)
    return cfg


def run_task(run_dir: Path):
    """The task of a saved run (read from its config.json; nothing else is loaded)."""
    from plutao.train.config.schema import Config
    from plutao.train.run.rundir import existing_run_config
    from plutao.train.tasks import task_class

    cfg = Config.from_dict(existing_run_config(run_dir))
    return task_class(cfg)(cfg)


def calls_tools(run_dir: Path, task) -> bool:
    """Whether a saved chat run can call tools: its tokenizer has the tool tokens (its own data.add_specials
    grew it, or it descends from a run that did). Reads the tokenizer only."""
    from plutao.tokenizer import TokenizerError, load_tokenizer

    try:
        return bool(task.chat) and load_tokenizer(Path(run_dir) / "tokenizer").has_tools
    except (OSError, TokenizerError):
        return False


def _sampling(args):
    from plutao.model.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, stop_at_eot=not args.no_stop)


def _sample_ngram(args, sampling) -> int:
    from plutao.tokenizer import load_tokenizer
    from plutao.train.ngram_run import load_ngram

    run_dir = Path(args.run_dir)
    tok = load_tokenizer(run_dir / "tokenizer")
    model = load_ngram(run_dir)
    context = [tok.eot_id] + (tok.encode(args.prompt) if args.prompt else [])
    if args.show_probs:
        import numpy as np

        from plutao.model.sampling import top_candidates
        cands = top_candidates(np.log(np.maximum(model.distribution(context), 1e-300)), args.show_probs,
                               args.temperature or 1.0)
        print(f"next-token candidates after {args.prompt!r} ({model.order}-gram):")
        for r, (i, p) in enumerate(cands, 1):
            print(f"{r:>4}  {i:>6}  {p:8.4f}  {tok.token_strings([i])[0]!r}")
        print()
    for n in range(args.num_samples):
        ids = model.generate(context, sampling.max_new_tokens, seed=sampling.seed + n,
                             temperature=sampling.temperature)
        if sampling.stop_at_eot and tok.eot_id in ids:
            ids = ids[: ids.index(tok.eot_id)]
        if args.num_samples > 1:
            print(f"--- sample {n + 1} ---")
        sep = " " if tok.kind == "word" and args.prompt and ids else ""
        print(args.prompt + sep + tok.decode(ids))
    return 0


def cmd_sample(args) -> int:
    import numpy as np

    from plutao.model.decode import generate, stream
    from plutao.model.sampling import SamplingError, top_candidates
    from plutao.train.run.lineage import load_run

    sampling = _sampling(args)  # validate arguments before loading anything
    if args.num_samples < 1 or args.show_probs < 0:
        raise SamplingError("--num-samples must be ≥ 1 and --show-probs ≥ 0")
    task = run_task(Path(args.run_dir))
    task.check_command("sample", args.run_dir)
    if args.tools:
        _check_tools(args, task)
    if not task.trained_by_gradient:
        return _sample_ngram(args, sampling)
    if args.best_of is not None or args.reward:
        from plutao.experiments.commands.assistant import sample_best_of
        if args.best_of is None:
            raise UserError("--reward judges --best-of N replies; give --best-of N too")
        if args.best_of < 1:
            raise UserError(f"--best-of must be ≥ 1, got {args.best_of}")
        return sample_best_of(args, load_run(Path(args.run_dir), args.step))
    import dataclasses

    run = load_run(Path(args.run_dir), args.step)
    tok = run.tokenizer
    prompt_ids = tok.encode(args.prompt) if args.prompt else []
    prompt = [tok.eot_id] + prompt_ids
    after = repr(args.prompt)  # (what the candidates of --show-probs follow)
    if task.chat:  # the prompt is a user message, answered through the chat template
        from plutao.tokenizer import chat

        if args.system:
            tok.encode(args.system)  # (a character the tokenizer cannot write is refused, as in the prompt)
        prompt = chat.prompt_ids(chat.conversation(args.prompt, system=args.system), tok)
        prompt_ids = prompt
        sampling = dataclasses.replace(sampling, stop_ids=chat.reply_stop_ids(tok))
        after = f"the assistant turn's start, i.e. after the chat prompt {tok.decode(prompt)!r}"
        args.prompt = ""
    elif args.system:
        raise UserError(f"--system applies to chat runs (`plutao sft`); {args.run_dir} completes text")
    # Special tokens that are not text (<pad>, <bos>, ...) are never sampled; the stop tokens are.
    sampling = dataclasses.replace(sampling, banned_ids=tok.unsampled_ids(sampling.stop_ids, run.cfg.model.vocab_size))
    context = run.cfg.model.context_length
    if len(prompt) > context:
        raise SamplingError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {context} "
                            f"(including the start token); shorten it to at most {context - 1} tokens")
    model = run.model
    if args.show_probs:
        import jax

        from plutao.model.heads import forward_logits

        logits, _ = forward_logits(model, np.array([prompt], np.int32))
        cands = top_candidates(np.asarray(jax.device_get(logits))[0, -1], args.show_probs, args.temperature or 1.0)
        print(f"next-token candidates after {after}:")
        print(f"{'rank':>4}  {'id':>6}  {'prob':>8}  token")
        for r, (i, p) in enumerate(cands, 1):
            print(f"{r:>4}  {i:>6}  {p:8.4f}  {tok.token_strings([i])[0]!r}")
        print()
    if args.tools:
        return _sample_with_tools(args, run, task, prompt, sampling)
    if args.stream:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        # The whole continuation is decoded again at each token and only what is new is written, so a
        # word-level run keeps the spaces between words; a partial multi-byte character waits (at most
        # 4 tokens) for the rest of it.
        new_ids: list[int] = []
        shown, waited = "", 0
        for token in stream(model, prompt, sampling, eot_id=tok.eot_id, pad_id=tok.pad_id):
            new_ids.append(token)
            text = tok.decode(new_ids)
            if (text.endswith("\ufffd") and waited < 4) or not text.startswith(shown):
                waited += 1
                continue
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown, waited = text, 0
        text = tok.decode(new_ids)
        sys.stdout.write((text[len(shown):] if text.startswith(shown) else "") + "\n")
        return 0
    outs = generate(model, [prompt] * args.num_samples, sampling, eot_id=tok.eot_id, pad_id=tok.pad_id)
    for i, ids in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tok.decode(ids))
    return 0


def _check_tools(args, task) -> dict:
    """--tools, refused in one line before anything loads: unknown names, a run not trained to call tools."""
    from plutao.tools import ToolError, tools_named
    try:
        tools = tools_named(args.tools)
    except ToolError as e:
        raise UserError(f"--tools: {e}") from None
    if not calls_tools(args.run_dir, task):
        raise UserError(f"--tools: {args.run_dir} has no tool tokens; give a chat run trained to call tools (`plutao "
                        "sft BASE data.add_specials='[\"<|call|>\",\"<|tool|>\"]' world.tool_rate=0.3`)")
    if getattr(args, "stream", False) and getattr(args, "num_samples", 1) > 1:
        raise UserError("--stream with --tools shows one reply as it is written; give --num-samples 1")
    return tools


def _sample_with_tools(args, run, task, prompt, sampling) -> int:
    """Chat replies through the agent loop: each tool turn shown as [NAME: ARGUMENT → RESULT] (with
    --stream as it is written); with --show-probs each reply token's probability, the tool's marked."""
    import math

    from plutao.model.agent import complete_with_tools
    from plutao.tokenizer.chat import (
        MAX_CALLS,
        ReplyStream,
        reply_messages,
        result_tokens,
        shown_reply,
        tool_answerer,
    )

    tok, calls = run.tokenizer, MAX_CALLS
    answer = tool_answerer(tok, _check_tools(args, task), max_calls=calls,
                           max_result_tokens=result_tokens(run.cfg.model.context_length, sampling.max_new_tokens, calls))
    shown = ReplyStream(tok)

    def write(row, tokens, forced):
        sys.stdout.write(shown.feed(tokens, forced))
        sys.stdout.flush()

    outs = complete_with_tools(run.model, [prompt] * args.num_samples, sampling, eot_id=tok.eot_id, pad_id=tok.pad_id,
                               pause_id=tok.tool_id, answer=answer, max_calls=calls,
                               on_tokens=write if args.stream else None)
    for i, c in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print("" if args.stream else shown_reply(reply_messages(tok, c.tokens, c.forced)))
        if args.show_probs:
            forced = set(c.forced)
            print(f"{'pos':>4}  {'prob':>8}  token  (tool: written by the runtime, not sampled)")
            for j, (t, lp) in enumerate(zip(c.tokens, c.sampler_logprobs)):
                print(f"{j:>4}  {'tool' if j in forced else f'{math.exp(lp):.4f}':>8}  {tok.token_strings([t])[0]!r}")
    return 0


def _eval_texts(args, cfg, tokenizer) -> list[tuple[str, object]]:
    import dataclasses

    from plutao.train.data import sources as data_lib

    if not args.data:
        return data_lib.held_out_tokens(cfg.data, tokenizer, cfg.world)
    docs = data_lib.read_documents(args.data, dataclasses.replace(cfg.data, path=args.data), flag="--data", world=cfg.world)
    return [(args.data, data_lib.tokenize_documents(docs, tokenizer, data_lib.cache_root(cfg.data)))]


def _print_result(args, result: dict, lines: list[str]) -> int:
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(lines))
    return 0


def cmd_eval(args) -> int:
    from plutao.train.run.lineage import load_run

    if args.harness:
        return _harness(args)
    task = run_task(Path(args.run_dir))
    if task.rollouts:
        raise UserError(f"{args.run_dir} is a {task.label} run: it learned from replies it sampled itself, not from "
                        f"data it held out, so `plutao eval` does not apply to it; measure it with "
                        f"`plutao report-card {args.run_dir}`")
    special = EVALUATORS.get(task.name)
    if special is not None:
        return special(args)
    run = load_run(Path(args.run_dir), args.step)
    results = [{"data": name} | run.task.eval_stream(run, tokens)
               for name, tokens in _eval_texts(args, run.cfg, run.tokenizer)]
    result = results[0] if len(results) == 1 else {"sources": results}
    result |= {"run_dir": str(run.run_dir), "step": run.step}
    lines = [run.task.eval_line(r, run.step) for r in result.get("sources", [result])]
    return _print_result(args, result, lines)


def _harness(args) -> int:
    try:
        from plutao.experiments.harness import cmd_harness
    except ImportError:
        raise UserError("--harness needs lm-evaluation-harness: pip install 'plutao[eval]'") from None
    return cmd_harness(args)


def _eval_ngram(args) -> int:
    import math

    import numpy as np

    from plutao.tokenizer import load_tokenizer
    from plutao.train.config.schema import Config
    from plutao.train.ngram_run import load_ngram
    from plutao.train.run.rundir import read_run_config

    run_dir = Path(args.run_dir)
    cfg = Config.from_dict(read_run_config(run_dir))
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model = load_ngram(run_dir)
    results = []
    for name, tokens in _eval_texts(args, cfg, tokenizer):
        logprobs = model.logprobs(np.asarray(tokens, np.int64))
        loss = float(-np.mean(logprobs))
        results.append({"data": name, "loss": loss, "perplexity": math.exp(loss), "tokens": len(logprobs)})
    result = (results[0] if len(results) == 1 else {"sources": results}) | {"run_dir": str(run_dir)}
    lines = [f"{r['data']}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f} ({r['tokens']:,} tokens, "
             f"{model.order}-gram {model.smoothing})" for r in result.get("sources", [result])]
    return _print_result(args, result, lines)


def _eval_translation(args) -> int:
    from plutao.train.data.pairs import held_out, read_pairs
    from plutao.train.eval.translate import evaluate_translation
    from plutao.train.run.lineage import load_run

    run = load_run(Path(args.run_dir), args.step)
    if args.data:
        pairs, name = read_pairs(args.data, flag="--data"), args.data
    elif run.cfg.data.val_path:
        pairs, name = read_pairs(run.cfg.data.val_path, flag="data.val_path"), run.cfg.data.val_path
    else:
        from plutao.train.data import sources as data_lib

        pairs = [q for s in data_lib.source_paths(run.cfg.data) for q in read_pairs(s)
                 if held_out(q, run.cfg.data.val_fraction)]
        name = f"held-out {run.cfg.data.val_fraction:.0%} of {run.cfg.data.path}"
    if args.limit < 0:
        raise UserError(f"--limit must be ≥ 0 (0 = all pairs), got {args.limit}")
    unique = list(dict.fromkeys(pairs))  # a pair listed twice is scored once
    duplicates, pairs = len(pairs) - len(unique), unique
    if args.limit:
        pairs = pairs[: args.limit]
    beams = sorted({1, args.beam})
    result = {"data": name, "pairs": len(pairs)} | evaluate_translation(run, pairs, beams, args.length_penalty)
    result |= {"run_dir": str(run.run_dir), "step": run.step, "duplicate_pairs_dropped": duplicates}
    notes = ([f"{duplicates:,} duplicate pair(s) scored once"] if duplicates else []) + (
        [f"{result['sources_cut_to_context']:,} source(s) cut to the context (keeping <eos>)"]
        if result["sources_cut_to_context"] else [])
    lines = [f"{name}: {len(pairs):,} pairs, step {run.step}" + (f" ({'; '.join(notes)})" if notes else ""),
             f"  teacher-forced loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f}"]
    for beam in beams:
        key = "greedy" if beam == 1 else f"beam{beam}"
        r = result[key]
        label = "greedy" if beam == 1 else f"beam {beam} (length penalty α={args.length_penalty:g})"
        lines.append(f"  {label}: BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}   [{r['bleu_signature']}]")
    ex = result["greedy"]["examples"][:3]
    lines += [f"    {e['source']} → {e['hypothesis']}   (reference: {e['reference']})" for e in ex]
    return _print_result(args, result, lines)


# `plutao eval` for the kinds of run that are not scored as token streams.
def _eval_reward(args) -> int:
    from plutao.experiments.commands.assistant import eval_reward

    return eval_reward(args, Path(args.run_dir))


def _eval_held_out(args) -> int:
    """A fine-tuning run (SFT, DPO): the conversations or preference pairs it held out (--data: all of a
    file's), scored by its own objective (SFT: loss on the assistant tokens; DPO: preference accuracy,
    margin and loss)."""
    from plutao.train.run.lineage import load_run

    run = load_run(Path(args.run_dir), args.step)
    result = run.task.eval_held_out(run, args.data) | {"run_dir": str(run.run_dir), "step": run.step}
    return _print_result(args, result, [run.task.eval_line(result, run.step)])


EVALUATORS = {"ngram": _eval_ngram, "translation": _eval_translation, "reward": _eval_reward,
              "sft": _eval_held_out, "dpo": _eval_held_out}


def cmd_translate(args) -> int:
    from plutao.train.eval.translate import translate
    from plutao.train.run.lineage import load_run

    run_task(Path(args.run_dir)).check_command("translate", args.run_dir)
    run = load_run(Path(args.run_dir), args.step)
    sources = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not sources or not all(s.strip() for s in sources):
        raise UserError("give non-empty sentences to translate, as arguments or one per line on standard input")
    outs = translate(run.model, run.tokenizer, sources, beam_size=args.beam, alpha=args.length_penalty,
                     n_best=args.n_best)
    if args.json:
        print(json.dumps([{"source": s, "translations": [{"text": t, "score": sc} for t, sc in o]}
                          for s, o in zip(sources, outs)]))
        return 0
    for s, o in zip(sources, outs):
        if args.n_best == 1 and len(sources) == 1:
            print(o[0][0])
            continue
        print(s)
        for rank, (t, sc) in enumerate(o, 1):
            print(f"  {rank}. {t}   (score {sc:.3f})")
    return 0


def cmd_fill_mask(args) -> int:
    from plutao.experiments.inspect import fill_mask
    from plutao.train.run.lineage import load_run

    run = load_run(Path(args.run_dir), args.step)
    result = fill_mask(run, args.text, args.top_k)
    if args.json:
        print(json.dumps({"text": args.text, "masks": result}))
        return 0
    for n, m in enumerate(result, 1):
        print(f"<mask> #{n}:")
        for f in m["fills"]:
            print(f"  {f['prob']:7.2%}  {f['token']!r}")
    return 0


def cmd_score(args) -> int:
    from plutao.train.eval.likelihood import score_text
    from plutao.train.run.lineage import load_run

    task = run_task(Path(args.run_dir))
    task.check_command("score", args.run_dir)
    if task.judges:  # a reward model scores a reply, not a text
        from plutao.experiments.commands.assistant import score_reward

        return score_reward(args, Path(args.run_dir))
    if args.text is None:
        raise UserError("give --text T to score (--prompt/--response score a reply with a reward-model run)")
    run = load_run(Path(args.run_dir), args.step)
    result = score_text(run.trainer.graphdef, run.params, run.tokenizer, args.text, run.cfg.model.context_length)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'#':>4}  {'token':<16} {'id':>6}  {'log P':>9}  {'P':>8}  {'Σ log P':>9}")
    running = 0.0
    for i, row in enumerate(result["per_token"]):
        running += row["logprob"]
        print(f"{i:>4}  {row['token']!r:<16} {row['id']:>6}  {row['logprob']:9.4f}  {row['prob']:8.4f}  {running:9.3f}")
    print(f"log P(text) = {result['logprob']:.4f} nats = {result['logprob_bits']:.3f} bits over "
          f"{result['tokens']} tokens; perplexity {result['perplexity']:.3f}")
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    s = sub.add_parser("sample", help="generate text from a trained run")
    s.add_argument("run_dir", help="the --workdir of a `plutao train` run")
    s.add_argument("--prompt", default="", help="text to continue (default: none, start from <|endoftext|>)")
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    s.add_argument("--top-k", type=int, default=0,
                   help="sample from the K likeliest tokens only; 0 = all (default: %(default)s)")
    s.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the fewest tokens whose probabilities sum to P; 1 = all (default: %(default)s)")
    s.add_argument("--max-new-tokens", type=int, default=300, help="tokens to generate (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default: %(default)s)")
    s.add_argument("--num-samples", type=int, default=1, help="samples to print (default: %(default)s)")
    s.add_argument("--show-probs", type=int, default=0, metavar="K",
                   help="table of the K likeliest next tokens; 0 = none (default: %(default)s)")
    s.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    s.add_argument("--tools", default="", metavar="NAMES", help="chat runs with the tool tokens: let the reply call "
                   "these tools (e.g. calculator); each call shown as [NAME: ARGUMENT → RESULT]")
    s.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    s.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    s.add_argument("--system", help="chat runs: a system message before the prompt")
    s.add_argument("--best-of", type=int, metavar="N", help="chat runs: sample N replies in one batch and print the "
                   "one --reward scores highest")
    s.add_argument("--reward", metavar="RM_RUN", help="the reward model that judges --best-of replies")
    s.add_argument("--show-all", action="store_true", help="with --best-of: every reply with its reward")
    s.set_defaults(fn=cmd_sample)

    e = run_parser(sub, "eval", cmd_eval, "loss, perplexity, bits per char/byte on held-out or given data (a fine-tuning "
                       "run: its own held-out figures)")
    e.add_argument("--data", help="a text file, folder, .jsonl or corpus name; for a translation run a TSV of "
                   "source<TAB>reference pairs; for an SFT run a .jsonl of conversations, for a DPO run one of "
                   "pairs `plutao dpo` wrote (default: the run's held-out split)")
    e.add_argument("--beam", type=int, default=4, help="translation: beam size scored besides greedy (default 4)")
    e.add_argument("--length-penalty", type=float, default=0.6, help="translation: GNMT length penalty α")
    e.add_argument("--limit", type=int, default=0, help="translation: score only the first N pairs; --harness: the "
                   "first N examples of each task (0 = all)")
    e.add_argument("--harness", metavar="TASKS", help="lm-evaluation-harness tasks, comma-separated (e.g. "
                   "hellaswag,lambada_openai): their metrics for this run (needs the eval extra)")
    e.add_argument("--include-path", help="--harness: a folder of task YAML files of your own")
    e.add_argument("--num-fewshot", type=int, help="--harness: few-shot examples (default: each task's own)")

    tr = run_parser(sub, "translate", cmd_translate,
                    "translate sentences with an encoder-decoder run (greedy or beam search)")
    tr.add_argument("text", nargs="*", help="source sentences (default: one per line on standard input)")
    tr.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    tr.add_argument("--length-penalty", type=float, default=0.6, help="GNMT α: 0 = raw log-probability")
    tr.add_argument("--n-best", type=int, default=1, help="print the N best hypotheses with their scores")

    fm = run_parser(sub, "fill-mask", cmd_fill_mask, "a masked LM's top-k fills for each <mask> in a text")
    fm.add_argument("text", help='e.g. "Return the <mask> of the list."')
    fm.add_argument("--top-k", type=int, default=5)

    c = run_parser(sub, "score", cmd_score, "log P(text) by the chain rule, per token")
    c.add_argument("--text", help="the text to score (language-model runs)")
    c.add_argument("--prompt", help="reward-model runs: the user message")
    c.add_argument("--response", help="reward-model runs: the reply to score")
