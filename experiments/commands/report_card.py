"""`plutao report-card RUN [RUN ...]`: the stages of the arithmetic-world assistant compared side by
side (experiments/report_card.py); the arguments are checked before any model loads. Each finished
column is kept in OUT/columns/ until the card is written, so a card stopped part-way resumes from
there; then only the report files remain."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_report_card(args) -> int:
    import jax

    from plutao.experiments.report_card import check, evaluate
    from plutao.experiments.report_card_files import markdown, write_report

    plan = check(args.runs, reward=args.reward, best_of=args.best_of, problems=args.problems,
                 problems_file=args.problems_file, match=args.match, seed=args.seed, out=args.out, tools=args.tools)
    report = evaluate(plan, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if jax.process_index() != 0:
        return 0
    files = write_report(report, Path(args.out))
    if args.json:
        print(json.dumps(report | {"files": [str(f) for f in files]}))
    else:
        print(markdown(report))
        print("written: " + ", ".join(str(f) for f in files))
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    rc = sub.add_parser("report-card", help="compare runs (base, SFT, best-of-N, ...) on the arithmetic world and "
                        "your own problems: accuracy by digits, format, win rates, diversity, bits per byte")
    rc.add_argument("runs", nargs="+", help="run directories, one column each")
    rc.add_argument("--reward", metavar="RM_RUN", help="a reward model: RM-judged win rates (and --best-of columns)")
    rc.add_argument("--best-of", type=int, default=0, metavar="N", help="with --reward: a best-of-N column per SFT run")
    rc.add_argument("--problems", type=int, default=500, metavar="N", help="problems per digit count (default 500)")
    rc.add_argument("--problems-file", metavar="FILE.jsonl", help="your own problems: lines of "
                    "{\"messages\": [...], \"answer\": \"799\"}")
    rc.add_argument("--match", choices=("last-number", "exact"), default="last-number",
                    help="--problems-file: the reply's last number must equal the answer, or the whole reply")
    rc.add_argument("--out", default=str(Path("runs") / "report-card"), help="where report.md, report.json and "
                    "the charts go (default: %(default)s; runs/ is ignored by git)")
    rc.add_argument("--tools", default="", metavar="NAMES", help="e.g. calculator: chat runs whose tokenizer has the "
                    "tool tokens also answer with these tools (rows tool_accuracy_by_digits, tool_call_rate_by_digits)")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(fn=cmd_report_card)
