"""Commands that look inside a run: attention maps, embedding probes, tokenization."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from plutao.experiments.commands import run_parser


def cmd_attention(args) -> int:
    from plutao.experiments.inspect import attention_maps
    from plutao.train.run.lineage import load_run

    run = load_run(Path(args.run_dir), args.step)
    if run.cfg.model.attention != "naive":
        print(f"plutao: attention weights come from the explicit softmax path (this run's model.attention="
              f"{run.cfg.model.attention} kernel returns no weights)", file=sys.stderr)
    out_dir = Path(args.out or Path(args.run_dir) / "attention")
    for path in attention_maps(run, args.text, args.target, out_dir):
        print(path)
    return 0


def _embeddings(args):
    """(run, its token-embedding table cut to the tokenizer's ids, the special ids) for the probes."""
    from plutao.experiments.inspect import embedding_table
    from plutao.train.config.errors import UserError
    from plutao.train.run.lineage import load_run

    if args.k < 1:
        raise UserError(f"-k must be ≥ 1, got {args.k}")
    run = load_run(Path(args.run_dir), args.step)
    return run, embedding_table(run)[: run.tokenizer.vocab_size], list(run.tokenizer.sorted_special_ids)


def cmd_neighbors(args) -> int:
    from plutao.experiments.inspect import token_id
    from plutao.model.probes import nearest_neighbors

    run, table, special = _embeddings(args)
    i = token_id(run.tokenizer, args.token)
    result = [{"token": run.tokenizer.token_strings([j])[0], "id": j, "cosine": c}
              for j, c in nearest_neighbors(table, i, args.k, exclude=special)]
    if args.json:
        print(json.dumps({"token": args.token, "id": i, "neighbors": result}))
        return 0
    print(f"nearest neighbours of {args.token!r} (id {i}) by cosine similarity of embeddings:")
    for r in result:
        print(f"  {r['cosine']:+.3f}  {r['token']!r}")
    return 0


def cmd_analogy(args) -> int:
    from plutao.experiments.inspect import token_id
    from plutao.model.probes import analogy

    run, table, special = _embeddings(args)
    a, b, c = (token_id(run.tokenizer, t) for t in (args.a, args.b, args.c))
    result = [{"token": run.tokenizer.token_strings([j])[0], "id": j, "cosine": s}
              for j, s in analogy(table, a, b, c, args.k, exclude=special)]
    if args.json:
        print(json.dumps({"query": [args.a, args.b, args.c], "answers": result}))
        return 0
    print(f"{args.a} − {args.b} + {args.c} ≈")
    for r in result:
        print(f"  {r['cosine']:+.3f}  {r['token']!r}")
    return 0


def cmd_tokenize(args) -> int:
    from plutao.tokenizer import ByteTokenizer, CharTokenizer, format_tokens, load_tokenizer
    from plutao.train.config.errors import UserError

    if args.chat:
        from plutao.experiments.commands.chat import tokenize_chat

        return tokenize_chat(args)
    if args.text is None:
        raise UserError("give the TEXT to tokenize (or --chat FILE.jsonl to see a conversation's trained tokens)")
    if args.tokenizer == "byte":
        tok = ByteTokenizer()
    elif args.tokenizer == "char":
        tok = CharTokenizer.train([args.text])
    else:
        path = Path(args.tokenizer)
        tok = load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else path)
    print(format_tokens(tok, args.text, args.price_per_1k))
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    at = run_parser(sub, "attention", cmd_attention, "PNG grids (layer × head) of attention weights for a sentence",
                    json=False)
    at.add_argument("--text", required=True, help="the sentence (the source, for a translation model)")
    at.add_argument("--target", help="translation: the target to attend from (default: the greedy translation)")
    at.add_argument("--out", help="output folder (default RUN_DIR/attention)")

    nb = run_parser(sub, "neighbors", cmd_neighbors, "tokens whose embeddings are closest (cosine) to a token's")
    nb.add_argument("token")
    nb.add_argument("-k", type=int, default=10)

    an = run_parser(sub, "analogy", cmd_analogy, "A − B + C by embedding arithmetic (king − man + woman ≈ queen)")
    an.add_argument("a")
    an.add_argument("b")
    an.add_argument("c")
    an.add_argument("-k", type=int, default=5)

    k = sub.add_parser("tokenize", help="show how text splits into tokens (or, with --chat, which tokens a "
                       "conversation trains)")
    k.add_argument("text", nargs="?")
    k.add_argument("--chat", metavar="FILE.jsonl", help="show a conversation of this file (or builtin:arith, the "
                   "demonstrations) through the chat template, each token marked trained or not (colour on a "
                   "terminal, [brackets] otherwise)")
    k.add_argument("--index", type=int, default=0, help="with --chat: which line's conversation (default 0)")
    k.add_argument("--tokenizer", default="byte", help="RUN_DIR, a tokenizer folder, char or byte (default byte)")
    k.add_argument("--price-per-1k", type=float, help="cost per 1,000 tokens")
    k.set_defaults(fn=cmd_tokenize)
