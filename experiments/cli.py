"""The `plutao` command line: train, sample, eval, score, tokenize, params, bench.

Every user mistake ends in one line on stderr ("plutao: error: ...") and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plutao.train.config import resolve_config
from plutao.train.presets import PRESETS


def _user_errors():
    from plutao.model.sampling import SamplingError
    from plutao.tokenizer import TokenizerError
    from plutao.train.errors import UserError

    return (UserError, TokenizerError, SamplingError)


def _neural(cfg, command: str):
    from plutao.train.errors import UserError

    if cfg.model.family == "ngram":
        raise UserError(f"`plutao {command}` needs a neural model; an n-gram model is a count table (`plutao train` "
                        "reports its size)")
    return cfg


def cmd_train(args) -> int:
    from plutao.train.loop import train

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # `plutao train key=value ...` without a config
        config, overrides = None, [config] + overrides
    allowed = [k for group in args.allow_changed or [] for k in group]
    overrides += [k for k in allowed if "=" in k]  # (`--allow-changed KEY key=value`: the override is not a key)
    name, cfg = resolve_config(config, overrides)
    run_dir = Path(args.workdir or Path("runs") / name)
    summary = train(cfg, run_dir, quiet=args.quiet, allow_changed=tuple(k for k in allowed if "=" not in k))
    import jax

    if args.json and jax.process_index() == 0:
        print(json.dumps(summary))
    return 0


def _sampling(args):
    from plutao.model.sampling import SamplingConfig

    return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, stop_at_eot=not args.no_stop)


def _family(run_dir: Path) -> str:
    from plutao.train.loop import existing_run_config

    saved = existing_run_config(run_dir)
    return saved.get("model", {}).get("family", "decoder")


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

    from plutao.model.sampling import SamplingError, generate, stream, top_candidates
    from plutao.train.run import load_run

    sampling = _sampling(args)  # validate arguments before loading anything
    if args.num_samples < 1 or args.show_probs < 0:
        raise SamplingError("--num-samples must be ≥ 1 and --show-probs ≥ 0")
    family = _family(Path(args.run_dir))
    if family == "ngram":
        return _sample_ngram(args, sampling)
    if family in ("encoder", "encoder_decoder"):
        raise SamplingError(f"{args.run_dir} is a model.family={family} run; use `plutao "
                            f"{'fill-mask' if family == 'encoder' else 'translate'}` for it")
    run = load_run(Path(args.run_dir), args.step)
    tok = run.tokenizer
    prompt_ids = tok.encode(args.prompt) if args.prompt else []
    prompt = [tok.eot_id] + prompt_ids
    context = run.cfg.model.context_length
    if len(prompt) > context:
        raise SamplingError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {context} "
                            f"(including the start token); shorten it to at most {context - 1} tokens")
    model = run.model
    if args.show_probs:
        import jax

        logits, _, _ = model(np.array([prompt], np.int32))
        cands = top_candidates(np.asarray(jax.device_get(logits))[0, -1], args.show_probs, args.temperature or 1.0)
        print(f"next-token candidates after {args.prompt!r}:")
        print(f"{'rank':>4}  {'id':>6}  {'prob':>8}  token")
        for r, (i, p) in enumerate(cands, 1):
            print(f"{r:>4}  {i:>6}  {p:8.4f}  {tok.token_strings([i])[0]!r}")
        print()
    if args.stream:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        pending: list[int] = []
        for token in stream(model, prompt, sampling, eot_id=tok.eot_id, pad_id=tok.pad_id):
            pending.append(token)
            text = tok.decode(pending)
            if "\ufffd" not in text:  # wait for the rest of a multi-byte character
                sys.stdout.write(text)
                sys.stdout.flush()
                pending = []
        sys.stdout.write(tok.decode(pending) + "\n")
        return 0
    outs = generate(model, [prompt] * args.num_samples, sampling, eot_id=tok.eot_id, pad_id=tok.pad_id)
    for i, ids in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + tok.decode(ids))
    return 0


def _eval_texts(args, cfg, tokenizer) -> list[tuple[str, object]]:
    import dataclasses

    from plutao.train import data as data_lib

    if not args.data:
        return data_lib.held_out_tokens(cfg.data, tokenizer)
    docs = data_lib.read_documents(args.data, dataclasses.replace(cfg.data, path=args.data), flag="--data")
    return [(args.data, data_lib.tokenize_documents(docs, tokenizer, data_lib.cache_root(cfg.data)))]


def _print_result(args, result: dict, lines: list[str]) -> int:
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(lines))
    return 0


def cmd_eval(args) -> int:
    from plutao.train.loop import existing_run_config

    saved = existing_run_config(Path(args.run_dir))
    family = saved.get("model", {}).get("family", "decoder")
    if family == "ngram":
        return _eval_ngram(args)
    if family == "encoder_decoder":
        return _eval_translation(args)
    from plutao.model.families import RECURRENT
    from plutao.train.evaluate import masked_lm_metrics, stream_metrics
    from plutao.train.run import load_run

    run = load_run(Path(args.run_dir), args.step)
    # A recurrent model has no context limit: it carries its state across long windows.
    context = 512 if family in RECURRENT else run.cfg.model.context_length
    results = []
    for name, tokens in _eval_texts(args, run.cfg, run.tokenizer):
        if family == "encoder":
            results.append({"data": name} | masked_lm_metrics(run.trainer, run.params, tokens, context))
        else:
            results.append({"data": name} | stream_metrics(run.trainer.graphdef, run.params, tokens, context,
                                                           run.tokenizer))
    result = results[0] if len(results) == 1 else {"sources": results}
    result |= {"run_dir": str(run.run_dir), "step": run.step}
    lines = []
    for r in result.get("sources", [result]):
        if family == "encoder":
            lines.append(f"{r['data']}: masked-LM loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}, "
                         f"masked-token accuracy {r['masked_accuracy']:.2%} ({r['masked_tokens']:,} masked of "
                         f"{r['tokens']:,} tokens, step {run.step})")
        else:
            lines.append(f"{r['data']}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}, "
                         f"{r['bits_per_char']:.4f} bits/char, {r['bits_per_byte']:.4f} bits/byte "
                         f"({r['tokens']:,} tokens, step {run.step})")
    return _print_result(args, result, lines)


def _eval_ngram(args) -> int:
    import math

    import numpy as np

    from plutao.tokenizer import load_tokenizer
    from plutao.train.config import Config
    from plutao.train.loop import read_run_config
    from plutao.train.ngram_run import load_ngram

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
    from plutao.train.errors import UserError
    from plutao.train.pairs import held_out, read_pairs
    from plutao.train.run import load_run
    from plutao.train.translate import evaluate_translation

    run = load_run(Path(args.run_dir), args.step)
    if args.data:
        pairs, name = read_pairs(args.data, flag="--data"), args.data
    elif run.cfg.data.val_path:
        pairs, name = read_pairs(run.cfg.data.val_path, flag="data.val_path"), run.cfg.data.val_path
    else:
        from plutao.train import data as data_lib

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


def cmd_translate(args) -> int:
    from plutao.train.errors import UserError
    from plutao.train.run import load_run
    from plutao.train.translate import translate

    run = load_run(Path(args.run_dir), args.step)
    if run.cfg.model.family != "encoder_decoder":
        raise UserError(f"{args.run_dir} is a model.family={run.cfg.model.family} run; `plutao translate` needs an "
                        "encoder_decoder run (e.g. `plutao train translate-cpu data.path=pairs.tsv`)")
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


def cmd_attention(args) -> int:
    from plutao.experiments.inspect import attention_maps
    from plutao.train.run import load_run

    run = load_run(Path(args.run_dir), args.step)
    if run.cfg.model.attention != "naive":
        print(f"plutao: attention weights come from the explicit softmax path (this run's model.attention="
              f"{run.cfg.model.attention} kernel returns no weights)", file=sys.stderr)
    out_dir = Path(args.out or Path(args.run_dir) / "attention")
    for path in attention_maps(run, args.text, args.target, out_dir):
        print(path)
    return 0


def cmd_neighbors(args) -> int:
    from plutao.experiments.inspect import embedding_table, token_id
    from plutao.model.probes import nearest_neighbors
    from plutao.train.errors import UserError
    from plutao.train.run import load_run

    if args.k < 1:
        raise UserError(f"-k must be ≥ 1, got {args.k}")
    run = load_run(Path(args.run_dir), args.step)
    table = embedding_table(run)
    i = token_id(run.tokenizer, args.token)
    special = list(run.tokenizer.special_ids.values())
    result = [{"token": run.tokenizer.token_strings([j])[0], "id": j, "cosine": c}
              for j, c in nearest_neighbors(table[: run.tokenizer.vocab_size], i, args.k, exclude=special)]
    if args.json:
        print(json.dumps({"token": args.token, "id": i, "neighbors": result}))
        return 0
    print(f"nearest neighbours of {args.token!r} (id {i}) by cosine similarity of embeddings:")
    for r in result:
        print(f"  {r['cosine']:+.3f}  {r['token']!r}")
    return 0


def cmd_analogy(args) -> int:
    from plutao.experiments.inspect import embedding_table, token_id
    from plutao.model.probes import analogy
    from plutao.train.errors import UserError
    from plutao.train.run import load_run

    if args.k < 1:
        raise UserError(f"-k must be ≥ 1, got {args.k}")
    run = load_run(Path(args.run_dir), args.step)
    table = embedding_table(run)
    a, b, c = (token_id(run.tokenizer, t) for t in (args.a, args.b, args.c))
    special = list(run.tokenizer.special_ids.values())
    result = [{"token": run.tokenizer.token_strings([j])[0], "id": j, "cosine": s}
              for j, s in analogy(table[: run.tokenizer.vocab_size], a, b, c, args.k, exclude=special)]
    if args.json:
        print(json.dumps({"query": [args.a, args.b, args.c], "answers": result}))
        return 0
    print(f"{args.a} − {args.b} + {args.c} ≈")
    for r in result:
        print(f"  {r['cosine']:+.3f}  {r['token']!r}")
    return 0


def cmd_fill_mask(args) -> int:
    from plutao.experiments.inspect import fill_mask
    from plutao.train.run import load_run

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
    from plutao.train.evaluate import score_text
    from plutao.train.run import load_run

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


def cmd_plot(args) -> int:
    from plutao.train.errors import UserError
    from plutao.train.metrics import plot_losses

    path = plot_losses(Path(args.run_dir))
    if path is None:
        raise UserError(f"{args.run_dir} has no metrics.jsonl with losses yet; train it first")
    print(path)
    return 0


def cmd_tokenize(args) -> int:
    from plutao.tokenizer import ByteTokenizer, CharTokenizer, format_tokens, load_tokenizer

    if args.tokenizer == "byte":
        tok = ByteTokenizer()
    elif args.tokenizer == "char":
        tok = CharTokenizer.train([args.text])
    else:
        path = Path(args.tokenizer)
        tok = load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else path)
    print(format_tokens(tok, args.text, args.price_per_1k))
    return 0


def cmd_params(args) -> int:
    from plutao.model.presets import PUBLISHED_PARAMS, count_params, flops_per_token

    name, cfg = resolve_config(args.preset, args.overrides)
    model = _neural(cfg, "params").shaped_model()
    counts = count_params(model)
    published = PUBLISHED_PARAMS.get(name)
    out = {"preset": name, "params": counts["total"], "non_embedding": counts["non_embedding"],
           "embedding": counts["embedding"], "published": published,
           "relative_to_published": (counts["total"] / published - 1) if published else None,
           "n_layers": model.n_layers, "d_model": model.d_model, "n_heads": model.n_heads, "d_head": model.d_head,
           "d_ff": model.d_ff, "context_length": model.context_length, "vocab_size": model.vocab_size,
           "batch_tokens": cfg.train.batch_size * model.context_length, "lr": cfg.optim.lr,
           "train_flops_per_token": flops_per_token(model)}
    if args.json:
        print(json.dumps(out))
        return 0
    pub = f" (published {published / 1e9:.3g}B, {out['relative_to_published']:+.2%})" if published else ""
    print(f"{name}: {counts['total']:,} parameters{pub}")
    print(f"  non-embedding {counts['non_embedding']:,}, embedding {counts['embedding']:,}")
    print(f"  n_layers {model.n_layers}, d_model {model.d_model}, n_heads {model.n_heads}, d_head {model.d_head}, "
          f"d_ff {model.d_ff}, context {model.context_length}, vocab {model.vocab_size}")
    print(f"  batch {cfg.train.batch_size} × {model.context_length} = {out['batch_tokens']:,} tokens, "
          f"lr {cfg.optim.lr:g}; training {out['train_flops_per_token']:.3g} FLOPs/token")
    return 0


def cmd_shardings(args) -> int:
    from plutao.experiments.shardings import dumps, sharding_dump

    _, cfg = resolve_config(args.preset, args.overrides)
    text = dumps(sharding_dump(_neural(cfg, "shardings"), args.devices))
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_plan(args, argv: list[str]) -> int:
    from plutao.experiments.plan import ensure_devices, parse_bytes, plan, report

    device_memory = parse_bytes(args.device_memory) if args.device_memory else None
    name, cfg = resolve_config(args.preset, args.overrides)
    _neural(cfg, "plan")
    if args.devices:
        code = ensure_devices(args.devices, argv)
        if code is not None:
            return code
    result = plan(cfg, device_memory)
    print(json.dumps(result) if args.json else report(name, result))
    return 0


def cmd_launch(args) -> int:
    from plutao.experiments.launch import launch_local

    command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
    return launch_local(command, args.local_processes, args.devices_per_process, args.port)


def cmd_bench_scaling(args) -> int:
    from plutao.experiments.scaling import run_scaling

    result = run_scaling(tuple(args.depths))
    if args.json:
        print(json.dumps(result))
    return 0


def _sweep_spec(args):
    """The sweep to run: a spec file, or a base config (preset/file) plus --grid/--zip/--random flags."""
    from plutao.experiments.sweep import SPEC_KEYS, SweepSpec, load_spec, parse_axis, spec_from_dict
    from plutao.train.config import parse_overrides
    from plutao.train.errors import UserError

    config = args.config
    overrides = list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config, *overrides]
    spec = None
    if config and Path(config).suffix in (".yaml", ".yml", ".py"):
        spec = load_spec(Path(config))
    elif config and Path(config).suffix in (".json", ".toml") and Path(config).is_file():
        from plutao.train.config import load_config_file

        raw = (json.loads(Path(config).read_text()) if config.endswith(".json")
               else __import__("tomllib").loads(Path(config).read_text()))
        if isinstance(raw, dict) and set(raw) & (SPEC_KEYS - {"name"}) and not set(raw) & {"model", "train", "data"}:
            spec = spec_from_dict(raw, config)
        else:
            load_config_file(Path(config))  # a train config: validated when resolved
    if spec is None:
        spec = SweepSpec(base=config)
    for flag, target in (("--grid", spec.grid), ("--zip", spec.zip)):
        for arg in getattr(args, flag[2:]) or []:
            key, values = parse_axis(arg, flag)
            target[key] = values
    if args.random:
        params = {}
        for arg in args.random:
            key, _, dist = arg.partition("=")
            kind, _, bounds = dist.partition(":")
            values = bounds.split(":") if kind != "choice" else bounds.split(",")
            if not key or kind not in ("uniform", "loguniform", "int", "choice") or not values:
                raise UserError(f"cannot read --random {arg!r}; write e.g. --random optim.lr=loguniform:1e-4:1e-2 "
                                "or --random model.norm=choice:pre,post")
            try:
                params[key] = {kind: values if kind == "choice" else [float(v) for v in values]}
            except ValueError:
                raise UserError(f"cannot read the bounds of --random {arg!r}; give numbers") from None
        target = "optuna" if args.optuna else "random"
        setattr(spec, target, {"params": params, "budget": args.budget, "trials": args.budget, "seed": 0})
    elif args.optuna:
        raise UserError("--optuna needs a search space: add --random key=loguniform:lo:hi ...")
    for name in ("seeds", "parallel", "max_steps", "max_seconds", "executor"):
        value = getattr(args, name)
        if value is not None:
            setattr(spec, name, value)
    spec.validate()
    return spec, parse_overrides(overrides)


def cmd_sweep(args) -> int:
    from plutao.experiments.sweep import sweep

    spec, overrides = _sweep_spec(args)
    result = sweep(spec, Path(args.workdir), overrides, retry_failed=args.retry_failed,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    if not args.no_report:
        from plutao.experiments.report import report

        result["report"] = report(Path(args.workdir))["report"]
        print(f"report: {result['report']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return _sweep_exit(result)


def _sweep_exit(result: dict) -> int:
    """130 when interrupted (resumable), 1 when a trial failed (the others ran), else 0."""
    status = result.get("status", {})
    if status.get("interrupted") or status.get("running"):
        return 130
    if status.get("failed"):
        print(f"plutao: {status['failed']} trial(s) failed; their errors are in trial.json and the report",
              file=sys.stderr)
        return 1
    return 0


def cmd_study(args) -> int:
    from plutao.experiments.report import report
    from plutao.experiments.studies import study
    from plutao.experiments.sweep import sweep
    from plutao.train.config import parse_overrides
    from plutao.train.errors import UserError

    scale = args.scale
    rest = []
    for o in args.overrides:  # `scale=4` reads like the other key=value knobs
        if o.startswith("scale="):
            try:
                scale = float(o.partition("=")[2])
            except ValueError:
                raise UserError(f"cannot read {o!r}; scale is a number, e.g. scale=4") from None
        else:
            rest.append(o)
    spec = study(args.name, scale)
    for name in ("seeds", "parallel"):
        if getattr(args, name) is not None:
            setattr(spec, name, getattr(args, name))
    spec.validate()
    workdir = Path(args.workdir or Path("runs") / f"study-{args.name}")
    result = sweep(spec, workdir, parse_overrides(rest), log=lambda m: print(m, file=sys.stderr, flush=True))
    out = report(workdir)
    print((Path(out["report"])).read_text())
    return _sweep_exit(result)


def cmd_report(args) -> int:
    from plutao.experiments.report import report

    out = report(Path(args.sweep_dir), Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps(out))
    else:
        print(Path(out["report"]).read_text())
        print("written: " + ", ".join([out["report"], out["csv"], *out["plots"]]))
    return 0


def cmd_bench_sweep(args) -> int:
    from plutao.experiments.sweep_bench import run_sweep_bench

    result = run_sweep_bench(args.steps, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_bench_baselines(args) -> int:
    from plutao.experiments.baselines_bench import run_baselines

    result = run_baselines(args.task, args.minutes, Path(args.data_dir), args.workdir,
                           out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_bench(args) -> int:
    from plutao.experiments.bench import run_bench

    result = run_bench(data=args.data, steps=args.steps, torch=not args.no_torch, sample_tokens=args.sample_tokens,
                       workdir=args.workdir, out=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0


class OneLineErrors(argparse.ArgumentParser):
    """argparse's usage mistakes in the same one-line form as every other error (subcommands inherit it)."""

    def error(self, message: str):
        print(f"plutao: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from plutao.train.config import config_defaults

    p = OneLineErrors(prog="plutao", description="Train and inspect Transformer language models.")
    dist = p.add_argument_group("multi-process runs (JAX's multi-controller runtime; SLURM, Open MPI and TPU VMs "
                                "are detected without flags)")
    dist.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    dist.add_argument("--num-processes", type=int, metavar="N")
    dist.add_argument("--process-id", type=int, metavar="I")
    dist.add_argument("--init-timeout", type=int, default=300, metavar="S", help="seconds to wait for all processes")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a model", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="presets: " + ", ".join(PRESETS) + "\nconfig keys (defaults before a preset):\n  "
                       + "\n  ".join(f"{k} = {v!r}" for k, v in config_defaults().items()))
    t.add_argument("config", nargs="?", help="preset name or .toml/.json file (default: the default experiment)")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides")
    t.add_argument("--workdir", help="run directory (default runs/CONFIG); re-running resumes it")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    t.add_argument("--allow-changed", nargs="+", action="append", metavar="KEY",
                   help="resume although these experiment-defining keys differ from the run's config.json "
                        "(the change is recorded in its history); train.steps and other run-control keys "
                        "may always change")
    t.set_defaults(fn=cmd_train)

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
    s.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    s.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="loss, perplexity, bits per char/byte on held-out or given data")
    e.add_argument("run_dir")
    e.add_argument("--data", help="a text file, folder, .jsonl or corpus name; for a translation run a TSV of "
                   "source<TAB>reference pairs (default: the run's held-out split)")
    e.add_argument("--beam", type=int, default=4, help="translation: beam size scored besides greedy (default 4)")
    e.add_argument("--length-penalty", type=float, default=0.6, help="translation: GNMT length penalty α")
    e.add_argument("--limit", type=int, default=0, help="translation: score only the first N pairs (0 = all)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--step", type=int)
    e.set_defaults(fn=cmd_eval)

    tr = sub.add_parser("translate", help="translate sentences with an encoder-decoder run (greedy or beam search)")
    tr.add_argument("run_dir")
    tr.add_argument("text", nargs="*", help="source sentences (default: one per line on standard input)")
    tr.add_argument("--beam", type=int, default=4, help="beam size (1 = greedy)")
    tr.add_argument("--length-penalty", type=float, default=0.6, help="GNMT α: 0 = raw log-probability")
    tr.add_argument("--n-best", type=int, default=1, help="print the N best hypotheses with their scores")
    tr.add_argument("--json", action="store_true")
    tr.add_argument("--step", type=int)
    tr.set_defaults(fn=cmd_translate)

    fm = sub.add_parser("fill-mask", help="a masked LM's top-k fills for each <mask> in a text")
    fm.add_argument("run_dir")
    fm.add_argument("text", help='e.g. "Return the <mask> of the list."')
    fm.add_argument("--top-k", type=int, default=5)
    fm.add_argument("--json", action="store_true")
    fm.add_argument("--step", type=int)
    fm.set_defaults(fn=cmd_fill_mask)

    at = sub.add_parser("attention", help="PNG grids (layer × head) of attention weights for a sentence")
    at.add_argument("run_dir")
    at.add_argument("--text", required=True, help="the sentence (the source, for a translation model)")
    at.add_argument("--target", help="translation: the target to attend from (default: the greedy translation)")
    at.add_argument("--out", help="output folder (default RUN_DIR/attention)")
    at.add_argument("--step", type=int)
    at.set_defaults(fn=cmd_attention)

    nb = sub.add_parser("neighbors", help="tokens whose embeddings are closest (cosine) to a token's")
    nb.add_argument("run_dir")
    nb.add_argument("token")
    nb.add_argument("-k", type=int, default=10)
    nb.add_argument("--json", action="store_true")
    nb.add_argument("--step", type=int)
    nb.set_defaults(fn=cmd_neighbors)

    an = sub.add_parser("analogy", help="A − B + C by embedding arithmetic (king − man + woman ≈ queen)")
    an.add_argument("run_dir")
    an.add_argument("a")
    an.add_argument("b")
    an.add_argument("c")
    an.add_argument("-k", type=int, default=5)
    an.add_argument("--json", action="store_true")
    an.add_argument("--step", type=int)
    an.set_defaults(fn=cmd_analogy)

    c = sub.add_parser("score", help="log P(text) by the chain rule, per token")
    c.add_argument("run_dir")
    c.add_argument("--text", required=True)
    c.add_argument("--json", action="store_true")
    c.add_argument("--step", type=int)
    c.set_defaults(fn=cmd_score)

    pp = sub.add_parser("plot", help="(re)write RUN_DIR/loss.png from metrics.jsonl, e.g. while a run trains")
    pp.add_argument("run_dir")
    pp.set_defaults(fn=cmd_plot)

    k = sub.add_parser("tokenize", help="show how text splits into tokens")
    k.add_argument("text")
    k.add_argument("--tokenizer", default="byte", help="RUN_DIR, a tokenizer folder, char or byte (default byte)")
    k.add_argument("--price-per-1k", type=float, help="cost per 1,000 tokens")
    k.set_defaults(fn=cmd_tokenize)

    m = sub.add_parser("params", help="parameter count of a preset without allocating it")
    m.add_argument("preset")
    m.add_argument("overrides", nargs="*")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_params)

    pl = sub.add_parser("plan", help="per-device memory of a training step, compiled ahead of time without allocating")
    pl.add_argument("preset")
    pl.add_argument("overrides", nargs="*", help="e.g. mesh.fsdp=64 train.batch_size=64")
    pl.add_argument("--devices", type=int, help="plan for N devices (forced host devices on a CPU machine)")
    pl.add_argument("--device-memory", help="memory of one device, e.g. 80GB: say whether the step fits")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=None)

    la = sub.add_parser("launch", help="run a command as N local processes joined by jax.distributed (gloo on CPU)",
                        usage="plutao launch --local-processes N [--devices-per-process D] -- train ...")
    la.add_argument("--local-processes", type=int, required=True, metavar="N")
    la.add_argument("--devices-per-process", type=int, default=1, metavar="D",
                    help="CPU devices each process gets (forced host devices; default 1)")
    la.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    la.add_argument("command_args", nargs=argparse.REMAINDER, help="-- then a plutao command, e.g. -- train tiny")
    la.set_defaults(fn=cmd_launch)

    d = sub.add_parser("shardings", help="JSON of every parameter's and key activation's PartitionSpec")
    d.add_argument("preset")
    d.add_argument("overrides", nargs="*", help="e.g. mesh.fsdp=8 mesh.tensor=2")
    d.add_argument("--devices", type=int, required=True, help="number of devices of the mesh")
    d.add_argument("--out", help="write to this file instead of stdout")
    d.set_defaults(fn=cmd_shardings)

    bs = sub.add_parser("bench-scaling", help="compile time vs depth (unrolled vs scanned), host memory 8 vs 1 devices")
    bs.add_argument("--depths", type=int, nargs="+", default=[4, 16, 48])
    bs.add_argument("--json", action="store_true")
    bs.set_defaults(fn=cmd_bench_scaling)

    sw = sub.add_parser("sweep", help="run many trainings as isolated, resumable trials, then report",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="examples:\n  plutao sweep tiny --workdir sweeps/lr --grid optim.lr=1e-3,3e-3 --seeds 2\n"
                               "  plutao sweep spec.yaml --workdir sweeps/ablation --parallel 2\n\n"
                               "spec format (YAML, JSON, TOML, or a .py file defining SWEEP = {...}); every key "
                               "optional:\n"
                               "  base: PRESET_OR_CONFIG_FILE        overrides: {section.key: value}  (every trial)\n"
                               "  grid: {key: [v1, v2]}   zip: {key: [..], key2: [..]}   trials: [{key: value}, ...]\n"
                               "  ablations: {name: {key: value}}   random: {budget: N, seed: S, params: {key: DIST}}\n"
                               "  optuna: {trials: N, params: {key: DIST}, pruner: median|none}\n"
                               "  DIST: {uniform: [lo, hi]} | {loguniform: [lo, hi]} | {int: [lo, hi]} | "
                               "{choice: [a, b]}\n"
                               "  seeds: N   parallel: N   max_steps: N   max_seconds: S   executor: local|slurm\n"
                               "  slurm: {partition: P, timeout_min: M, nodes: N, tasks_per_node: T, cpus_per_task: C}")
    sw.add_argument("config", nargs="?", help="a sweep spec (.yaml/.py/.json/.toml), or the base preset/config file")
    sw.add_argument("overrides", nargs="*", help="section.key=value applied to every trial")
    sw.add_argument("--workdir", required=True, help="the sweep directory (re-running resumes it)")
    sw.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="sweep a key over values (product)")
    sw.add_argument("--zip", action="append", metavar="KEY=V1,V2", help="keys varied together, value by value")
    sw.add_argument("--random", action="append", metavar="KEY=DIST:LO:HI",
                    help="random search: loguniform:lo:hi, uniform:lo:hi, int:lo:hi or choice:a,b")
    sw.add_argument("--budget", type=int, default=8, help="random search / Optuna: number of trials")
    sw.add_argument("--optuna", action="store_true", help="Bayesian search (TPE) with median pruning over --random")
    sw.add_argument("--seeds", type=int, help="seeds per variant (train.seed = 0, 1, ...)")
    sw.add_argument("--parallel", type=int, help="trials at once")
    sw.add_argument("--max-steps", type=int, help="per-trial step budget (sets train.steps)")
    sw.add_argument("--max-seconds", type=float, help="per-trial wall-clock budget (sets train.max_seconds)")
    sw.add_argument("--executor", choices=["local", "slurm"])
    sw.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    sw.add_argument("--no-report", action="store_true")
    sw.add_argument("--json", action="store_true")
    sw.set_defaults(fn=cmd_sweep)

    st = sub.add_parser("study", help="a built-in ablation study (sweep + report): lr-warmup, norm-depth, "
                        "positions, heads, activations, families")
    st.add_argument("name")
    st.add_argument("overrides", nargs="*", help="scale=S (model width × S, steps × S) and section.key=value")
    st.add_argument("--workdir", help="default runs/study-NAME")
    st.add_argument("--scale", type=float, default=1.0)
    st.add_argument("--seeds", type=int)
    st.add_argument("--parallel", type=int)
    st.set_defaults(fn=cmd_study)

    rp = sub.add_parser("report", help="Markdown/CSV table and plots of a sweep, from its trial directories")
    rp.add_argument("sweep_dir")
    rp.add_argument("--out", help="output folder (default SWEEP_DIR/report)")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(fn=cmd_report)

    bw = sub.add_parser("bench-sweep", help="sweep overhead: time to the first step, share outside training steps")
    bw.add_argument("--steps", type=int, default=300, help="steps per trial")
    bw.add_argument("--json", action="store_true")
    bw.set_defaults(fn=cmd_bench_sweep)

    bb = sub.add_parser("bench-baselines", help="Transformer vs LSTM vs n-gram at equal wall-clock (PTB or "
                        "Tiny Shakespeare)")
    bb.add_argument("task", choices=["ptb", "shakespeare"])
    bb.add_argument("--minutes", type=float, default=5.0, help="training budget per neural model")
    bb.add_argument("--data-dir", default="../shared/data", help="folder holding ptb/ and tinyshakespeare.txt")
    bb.add_argument("--workdir", help="where the run directories go (default: a temporary folder)")
    bb.add_argument("--json", action="store_true")
    bb.set_defaults(fn=cmd_bench_baselines)

    b = sub.add_parser("bench", help="nanoGPT's CPU benchmark: speed, MFU and val loss vs PyTorch eager")
    b.add_argument("--data", help="Tiny Shakespeare text file (default: download or cache)")
    b.add_argument("--steps", type=int, default=2000)
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    b.add_argument("--sample-tokens", type=int, default=500)
    b.add_argument("--workdir", help="run directory for the benchmark (default: a temporary one)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "launch":  # everything after `--` belongs to the launched command
        args.command_args, extra = args.command_args + extra, []
    # key=value overrides may come after options (`train tiny --workdir d optim.lr=1e-3`).
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command != "launch":
            from plutao.train.distributed import initialize

            initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
        if args.command == "plan":
            return cmd_plan(args, list(argv if argv is not None else sys.argv[1:]))
        return args.fn(args)
    except _user_errors() as e:
        print(f"plutao: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("plutao: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a permission, an I/O error outside the checkpoints (which say more)
        where = f" ({e.filename})" if e.filename else ""
        print(f"plutao: error: {e.strerror or e}{where}; fix the cause and run the same command again "
              "(a training resumes from its last checkpoint)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
