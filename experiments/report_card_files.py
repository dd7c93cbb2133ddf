"""The report card's files: report.md (the tables), report.json, and the PNG charts, each written
aside and renamed into place (experiments/report_card.py measures what they show); and, while the card
is being measured, OUT/columns/NAME.json: each finished column's replies, so that a card interrupted
half-way resumes from its finished columns (removed once the card is written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from plutao.experiments.report_card_stats import Reply

# --- the files ------------------------------------------------------------------------------------------

def _cell(x, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    runs, s = report["runs"], report["settings"]
    names = list(runs)
    head = ["| | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]

    def line(label, values):
        return f"| {label} | " + " | ".join(values) + " |"

    rows = []
    for d in map(str, s["digit_counts"]):
        rows.append(line(f"{d}-digit accuracy, greedy / T=1",
                         [f"{_cell(r['accuracy_by_digits'].get(d))} / {_cell(r['accuracy_by_digits_t1'].get(d))}"
                          for r in runs.values()]))
    rows.append(line("**all digits**, greedy / T=1",
                     [f"**{_cell(r['accuracy'])}** / {_cell(r['accuracy_t1'])}" for r in runs.values()]))
    rows.append(line("pass@8 at T=1 (the diversity problems)", [_cell(r.get("pass_at_8")) for r in runs.values()]))
    if any("held_out_accuracy" in r for r in runs.values()):
        rows.append(line(f"held-out slice accuracy, greedy ({s.get('held_out_problems')} problems never trained on)",
                         [_cell(r.get("held_out_accuracy")) for r in runs.values()]))
    for key, label in (("accuracy_by_digits_few_shot", "few-shot prompt, direct examples"),
                       ("accuracy_by_digits_few_shot_worked", "few-shot prompt, worked examples"),
                       ("step_by_step_accuracy_by_digits", "asked to think step by step"),
                       ("direct_accuracy_by_digits", "asked for the number only")):
        if any(key in r for r in runs.values()):
            for d in map(str, s["digit_counts"]):
                rows.append(line(f"{d}-digit accuracy, {label}", [_cell(r.get(key, {}).get(d)) for r in runs.values()]))
    rows += [line("format ok (ends with `<\\|end\\|>`, direct or well-formed worked)",
                  [_cell(r["format_ok"]) for r in runs.values()]),
             line("share of greedy replies worked step by step", [_cell(r.get("worked_share")) for r in runs.values()]),
             line("ran on into a `<\\|user\\|>` turn", [_cell(r["ran_on"]) for r in runs.values()]),
             line("mean reply length (tokens)", [_cell(r["mean_length"], 1) for r in runs.values()]),
             line(f"distinct answers per prompt (of {s['distinct']['samples']} at T=1)",
                  [_cell(r["distinct"], 2) for r in runs.values()]),
             line("bits per byte, held-out pretraining mixture", [_cell(r["bits_per_byte"]) for r in runs.values()])]
    if any(r.get("kl_to_reference") is not None for r in runs.values()):
        rows.append(line(f"KL(run ‖ {s.get('reference')}) per T=1 reply (nats)",
                         [_cell(r.get("kl_to_reference")) for r in runs.values()]))
        rows.append(line("entropy per reply token at T=1 (nats)", [_cell(r.get("entropy")) for r in runs.values()]))
    if any("tool_accuracy_by_digits" in r for r in runs.values()):
        for d in map(str, s["digit_counts"]):
            rows.append(line(f"{d}-digit accuracy with {', '.join(s.get('tools') or [])}, greedy / share calling it",
                             [f"{_cell(r.get('tool_accuracy_by_digits', {}).get(d))} / "
                              f"{_cell(r.get('tool_call_rate_by_digits', {}).get(d))}" for r in runs.values()]))
        rows.append(line("tool calls answered with an error; reply tokens with the tool",
                         [f"{_cell(r.get('tool_calls_malformed'))}; {_cell(r.get('tool_tokens_per_reply'), 1)}"
                          for r in runs.values()]))
    if any("gold_logprob_by_digits" in r for r in runs.values()):
        for d in map(str, s["digit_counts"]):
            rows.append(line(f"{d}-digit log p(gold answer) (nats; the direct reply, or the few-shot one for a base run)",
                             [_cell(r.get("gold_logprob_by_digits", {}).get(d), 2) for r in runs.values()]))
    if any("mean_reward" in r for r in runs.values()):
        rows.append(line("mean reward (reward model)", [_cell(r.get("mean_reward")) for r in runs.values()]))
    if s["problems_file"] is not None:
        rows.append(line(f"problems file accuracy ({s['problems_file']} problems, {s['match']})",
                         [_cell(r.get("problems_file_accuracy")) for r in runs.values()]))
    out = ["# Report card", "", *head, *rows, ""]
    if report.get("leaderboard"):
        out += ["## Leaderboard (Elo from the gold labeler's pairwise judgements; bootstrap 95% interval)", "",
                "| | Elo | interval |", "|---|---|---|"]
        out += [f"| `{r['name']}` | {r['rating']:.0f} | [{r['low']:.0f}, {r['high']:.0f}] |" for r in report["leaderboard"]]
        out.append("")
    if report.get("correctness_win_rates"):
        out += ["## Correctness win rate (row vs column: right beats wrong, anything else a tie; by digit count)", "",
                *head]
        for a in names:
            cells = []
            for b in names:
                w = report["correctness_win_rates"].get(f"{a} vs {b}")
                cells.append("—" if w is None else " · ".join(
                    f"{d}: {v['rate']:.2f} [{v['low']:.2f}, {v['high']:.2f}]" for d, v in w["by_digits"].items()))
            out.append(line(f"`{a}`", cells))
        out.append("")
    for key, title in (("win_rates", "Gold labeler win rate (row vs column; ties ½; bootstrap 95% interval)"),
                       ("rm_win_rates", "Reward-model win rate (row vs column; bootstrap 95% interval)")):
        if report.get(key):
            out += [f"## {title}", "", *head]
            for a in names:
                cells = []
                for b in names:
                    w = report[key].get(f"{a} vs {b}")
                    cells.append("—" if w is None else f"{w['rate']:.2f} [{w['low']:.2f}, {w['high']:.2f}]")
                out.append(line(f"`{a}`", cells))
            out.append("")
    out += ["## How it was measured", ""]
    out.append(f"- {s['problems_per_digit_count']} problems per digit count (1–{max(s['digit_counts'])} digits, sums "
               "and differences whose operands both have that many digits), the same problems and sampling seeds "
               f"(--seed {s['seed']}) for every column; each reply at most {s['reply_tokens']} tokens (at most half a "
               "run's context).")
    trained = s.get("training_digits")
    out.append("- Accuracy is exact match of the reply's last number (a worked reply ends with its answer). Greedy and "
               "temperature-1 pass@1 go through the chat template; a base run is also asked with GPT-3's few-shot "
               "plain-text prompt (up to 4 solved examples, direct or worked, as many as fit the context; greedy, "
               "its continuation cut at the first newline)."
               + (f" Problems of more than {trained} digits are beyond the training range." if trained else ""))
    out.append("- The \"ask for precision\" rows ask the same chat model the same problems with a system prompt: "
               f"{s.get('systems', {}).get('step_by_step')!r} or {s.get('systems', {}).get('direct')!r}.")
    out.append("- The correctness win rate counts a right answer against a wrong one as a win and everything else "
               "as a tie. The gold labeler's win rate orders replies by correctness, then ended with `<|end|>`, then "
               "partial credit (correct steps of a worked reply, correct digits of a direct one). Both compare the "
               "greedy replies (a best-of-N column: its kept reply); intervals resample the problems "
               f"{s['bootstrap_samples']} times. The leaderboard fits Bradley–Terry strengths to the gold labeler's "
               "judgements of every pair of columns on every problem, on the Elo scale (mean 1000).")
    out.append(f"- Distinct answers: {s['distinct']['samples']} temperature-1 replies to each of "
               f"{s['distinct']['problems']} problems; a reply without a number counts as one answer.")
    out.append(f"- Bits per byte: the first ~{s['bits_per_byte_tokens_per_source']:,} tokens (whole context windows) "
               "of each held-out source of the run's pretraining ancestor (followed through config.json's lineage), "
               "combined by bytes.")
    if s["best_of"]:
        out.append(f"- `NAME+best-of-{s['best_of']}`: {s['best_of']} temperature-1 replies per prompt, the one the "
                   f"reward model ({s['reward']}) scores highest kept; it has no greedy reply, so its greedy and "
                   "T=1 rows both show that one reply. Its bits per byte are its run's.")
    out += [f"- {n}" for n in report.get("notes", [])]
    out.append("")
    return "\n".join(out)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    _write_bytes(path, buf.getvalue())


def charts(report: dict, out_dir: Path) -> list[Path]:
    """accuracy_by_digits.png (grouped bars; a base run's few-shot accuracy as its own hatched bars) and
    a heatmap per win-rate matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, digits = report["runs"], [str(d) for d in report["settings"]["digit_counts"]]
    series = [(name, r["accuracy_by_digits"], "") for name, r in runs.items()]
    series += [(f"{name} (few-shot)", r["accuracy_by_digits_few_shot"], "//") for name, r in runs.items()
               if "accuracy_by_digits_few_shot" in r]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + len(digits) * (0.6 + 0.35 * len(series))), 4.5))
    width = 0.8 / len(series)
    colours = plt.get_cmap("tab10")
    for k, (label, acc, hatch) in enumerate(series):
        xs = np.arange(len(digits)) + (k - (len(series) - 1) / 2) * width
        ax.bar(xs, [acc.get(d, 0.0) for d in digits], width, label=label, color=colours(k % 10), hatch=hatch,
               edgecolor="white" if not hatch else "black", linewidth=0.5)
    ax.set_xticks(range(len(digits)), [f"{d} digit{'s' if d != '1' else ''}" for d in digits])
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact-match accuracy (greedy)")
    ax.set_title("accuracy by digit count")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = [out_dir / "accuracy_by_digits.png"]
    _save(fig, written[-1])
    plt.close(fig)
    names = list(runs)
    for key, title in (("win_rates", "gold win rate"), ("rm_win_rates", "reward-model win rate")):
        if not report.get(key):
            continue
        grid = np.full((len(names), len(names)), np.nan)
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                if a != b:
                    grid[i, j] = report[key][f"{a} vs {b}"]["rate"]
        side = 1.3 * len(names) + 3
        fig, ax = plt.subplots(figsize=(side + 1, side))
        im = ax.imshow(grid, cmap="RdBu", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("against")
        ax.set_ylabel("column")
        for (i, j), val in np.ndenumerate(grid):
            if not np.isnan(val):
                w = report[key][f"{names[i]} vs {names[j]}"]
                ax.text(j, i, f"{val:.2f}\n[{w['low']:.2f}, {w['high']:.2f}]", ha="center", va="center", fontsize=8,
                        color="w" if abs(val - 0.5) > 0.3 else "k")
        fig.colorbar(im, ax=ax, label=f"{title} (row vs column)")
        ax.set_title(f"{title} (ties ½)")
        fig.tight_layout()
        written.append(out_dir / f"{key}.png")
        _save(fig, written[-1])
        plt.close(fig)
    return written


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """report.md, report.json and the charts in out_dir, each written aside and renamed into place; then
    the finished columns kept while measuring (OUT/columns/) are removed: the card holds them now."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "report.md", out_dir / "report.json"
    _write_bytes(md, markdown(report).encode("utf-8"))
    _write_bytes(js, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    written = [md, js, *charts(report, out_dir)]
    ColumnCache(out_dir).clear()
    return written


# --- finished columns, while the card is measured ----------------------------------------------------------

def _replies(replies) -> list | None:
    return None if replies is None else [[r.text, r.length, r.stop, list(r.tokens)] for r in replies]


def _read_replies(rows) -> list | None:
    return None if rows is None else [Reply(text, length, stop, tuple(tokens)) for text, length, stop, tokens in rows]


def checkpoint_stamp(run_dir: Path, step: int | None = None) -> list | None:
    """[step, modification time in ns] of a run's checkpoint (its latest without `step`): a run trained
    again to the same step in the same folder has another stamp."""
    folder = Path(run_dir) / "checkpoints"
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
    step = step if step is not None else (steps[-1] if steps else None)
    path = folder / str(step)
    return [step, path.stat().st_mtime_ns] if step is not None and path.is_dir() else None


class ColumnCache:
    """OUT/columns/NAME.json: a finished column (its replies, rewards, bits per byte and KL), with the key
    that defines it (run directory, checkpoint step, problems, seed, ...). A column whose key matches is
    reused instead of sampled again; any other is measured anew. `out_dir` None: nothing is kept."""

    def __init__(self, out_dir: Path | None, write: bool = True):
        self.folder = Path(out_dir) / "columns" if out_dir is not None else None
        self.write = write

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json"

    def _read(self, name: str, key: dict) -> dict | None:
        if self.folder is None:
            return None
        try:
            record = json.loads(self._path(name).read_text())
        except (OSError, ValueError):
            return None
        return record if record.get("key") == key else None

    def _store(self, name: str, record: dict) -> None:
        if self.folder is None or not self.write:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_bytes(self._path(name), json.dumps(record, ensure_ascii=False).encode("utf-8"))

    def get(self, name: str, key: dict, make) -> tuple | None:
        """(column, bits per byte, note) of a finished column with this key, or None; `make` builds the
        column from its fields (experiments/report_card.py: Column)."""
        record = self._read(name, key)
        if record is None:
            return None
        c = record["column"]
        rewards = None if c["rewards"] is None else np.asarray(c["rewards"]["values"], dtype=c["rewards"]["dtype"])
        greedy = _read_replies(c["greedy"])
        column = make(c["name"], Path(c["run_dir"]), c["step"], c["kind"], greedy,
                      greedy if c["t1"] == "greedy" else _read_replies(c["t1"]), c["distinct"],
                      few_shot=_read_replies(c["few_shot"]), file_replies=_read_replies(c["file_replies"]),
                      rewards=rewards, best_of=c["best_of"],
                      extra={k: _read_replies(v) for k, v in c.get("extra", {}).items()}, shots=c.get("shots", {}),
                      counts=c.get("counts", {}))
        return column, record["bits_per_byte"], record["note"]

    def put(self, key: dict, column, bits: float | None, note: str | None) -> None:
        c = column
        rewards = None if c.rewards is None else {"dtype": str(np.asarray(c.rewards).dtype),
                                                  "values": np.asarray(c.rewards).tolist()}
        bits = None if bits is None else float(bits)
        self._store(c.name, {"key": key, "bits_per_byte": bits, "note": note, "column": {
            "name": c.name, "run_dir": str(c.run_dir), "step": c.step, "kind": c.kind, "greedy": _replies(c.greedy),
            "t1": "greedy" if c.t1 is c.greedy else _replies(c.t1), "distinct": c.distinct,
            "few_shot": _replies(c.few_shot), "file_replies": _replies(c.file_replies), "rewards": rewards,
            "best_of": c.best_of, "extra": {k: _replies(v) for k, v in c.extra.items()}, "shots": c.shots,
            "counts": c.counts}})

    def derived(self, name: str, key: dict, row: str, reference: dict | None = None):
        """A row measured from the column's run after its replies (its "kl" against `reference`, its
        "gold_logprob"), if measured before under this key (and against this reference)."""
        record = self._read(name, key)
        if record is None or row not in record or record[row].get("reference") != reference:
            return None
        return record[row]["value"]

    def put_derived(self, name: str, key: dict, row: str, value, reference: dict | None = None) -> None:
        record = self._read(name, key)
        if record is not None:
            self._store(name, record | {row: {"reference": reference, "value": value}})

    def clear(self) -> None:
        if self.folder is None or not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.suffix == ".json" or path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # (something else in there: left alone)
            pass
