"""`plutao report-card RUN [RUN ...]`: the stages of the arithmetic-world assistant compared side by
side (experiments/report_card.py); the arguments are checked before any model loads, and nothing is
written into --out until the whole card is measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_report_card(args) -> int:
    import jax

    from plutao.experiments.report_card import check, evaluate
    from plutao.experiments.report_card_files import markdown, write_report

    plan = check(args.runs, reward=args.reward, best_of=args.best_of, problems=args.problems,
                 problems_file=args.problems_file, match=args.match, seed=args.seed, out=args.out)
    report = evaluate(plan, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if jax.process_index() != 0:
        return 0
    files = write_report(report, Path(args.out or "report-card"))
    if args.json:
        print(json.dumps(report | {"files": [str(f) for f in files]}))
    else:
        print(markdown(report))
        print("written: " + ", ".join(str(f) for f in files))
    return 0
