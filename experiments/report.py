"""`plutao report SWEEP_DIR`: one table, a significance note and plots, from the trial run directories alone.

Per trial: final and best held-out loss (from metrics.jsonl), tokens/s, parameters and wall time (from
trial.json). Per variant (the trials that differ only by seed): mean ± sample standard deviation
over seeds, ranked by mean final val loss. Between the best and the runner-up: a bootstrap 95%
confidence interval of the difference in means, resampling seeds (fixed generator seed, so the
report is deterministic). Everything is sorted, so the same run directories give the same files.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from plutao.experiments.sweep import DONE, TRIAL_FILE
from plutao.train.config.errors import UserError
from plutao.train.run.metrics import read_metrics

BOOTSTRAP_SAMPLES = 10_000


def _loss_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("split") in ("val", "train") and "loss" in r]


def collect(sweep_dir: Path) -> list[dict]:
    """One row per trial directory that has a trial.json, in name order."""
    trials_dir = Path(sweep_dir) / "trials"
    if not trials_dir.is_dir():
        raise UserError(f"{sweep_dir} has no trials/ folder; pass the --workdir of a `plutao sweep`")
    rows = []
    for directory in sorted(p for p in trials_dir.iterdir() if (p / TRIAL_FILE).is_file()):
        trial = json.loads((directory / TRIAL_FILE).read_text())
        records = _loss_records(directory)
        val = [r for r in records if r["split"] == "val"]
        train = [r for r in records if r["split"] == "train"]
        summary = trial.get("summary") or {}
        finite = [r for r in val if math.isfinite(r["loss"])]
        best = min(finite, key=lambda r: (r["loss"], r["step"])) if finite else None
        tps = [r["tokens_per_sec"] for r in train if "tokens_per_sec" in r]
        rows.append({
            "trial": directory.name, "variant": trial["variant"], "params": trial.get("params", {}),
            "seed": trial.get("seed", 0), "status": trial.get("status"), "error": trial.get("error"),
            # A diverged run (non-finite loss) has no result to rank.
            "final_val_loss": (val[-1]["loss"] if val and trial.get("status") == DONE and math.isfinite(val[-1]["loss"])
                               else None),
            "best_val_loss": best["loss"] if best else None, "best_step": best["step"] if best else None,
            "tokens_per_sec": float(np.median(tps)) if tps else summary.get("tokens_per_sec"),
            "n_params": summary.get("params"), "wall_seconds": trial.get("wall_seconds"),
            "steps_seconds": summary.get("steps_seconds"), "curve": [(r["step"], r["loss"]) for r in val],
            "train_curve": [(r["step"], r["loss"]) for r in train],
        })
    if not rows:
        raise UserError(f"{sweep_dir}/trials has no trial yet; run `plutao sweep` first")
    return rows


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    a = np.asarray(values, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per variant, ranked by mean final val loss (variants without a finished trial last)."""
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], []).append(r)
    out = []
    for variant, trials in sorted(by_variant.items()):
        ok = [t for t in trials if t["final_val_loss"] is not None]
        losses = [t["final_val_loss"] for t in ok]
        mean, std = _mean_std(losses)
        ppl = [math.exp(x) for x in losses]
        out.append({
            "variant": variant, "params": trials[0]["params"], "seeds": len(ok), "unfinished": len(trials) - len(ok),
            "errors": sorted({t["error"] for t in trials if t["error"]}),
            "val_loss_mean": mean, "val_loss_std": std, "losses": losses,
            "perplexity_mean": _mean_std(ppl)[0], "perplexity_std": _mean_std(ppl)[1],
            "best_step": _mean_std([t["best_step"] for t in ok if t["best_step"] is not None])[0],
            "tokens_per_sec": _mean_std([t["tokens_per_sec"] for t in ok if t["tokens_per_sec"]])[0],
            "n_params": ok[0]["n_params"] if ok else None,
            "wall_seconds": _mean_std([t["wall_seconds"] for t in ok if t["wall_seconds"]])[0],
        })
    out.sort(key=lambda v: (v["val_loss_mean"] is None, v["val_loss_mean"] or 0.0, v["variant"]))
    for rank, v in enumerate(out, 1):
        v["rank"] = rank if v["val_loss_mean"] is not None else None
    return out


def bootstrap_difference(a: list[float], b: list[float], seed: int = 0) -> dict | None:
    """95% CI of mean(b) − mean(a) by resampling each group's seeds with replacement."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    a_, b_ = np.asarray(a), np.asarray(b)
    diffs = (rng.choice(b_, (BOOTSTRAP_SAMPLES, len(b_))).mean(1) - rng.choice(a_, (BOOTSTRAP_SAMPLES, len(a_))).mean(1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float(b_.mean() - a_.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "fraction_not_worse": float(np.mean(diffs <= 0.0))}


def significance_note(variants: list[dict]) -> str:
    ranked = [v for v in variants if v["rank"] is not None]
    if not ranked:
        return "No trial finished; nothing to compare (each trial's error is listed below)."
    if len(ranked) < 2:
        return "Only one variant finished; nothing to compare."
    best, second = ranked[0], ranked[1]
    ci = bootstrap_difference(best["losses"], second["losses"])
    if ci is None:
        return (f"**{best['variant']}** ranks first, **{second['variant']}** second (val loss "
                f"{best['val_loss_mean']:.4f} vs {second['val_loss_mean']:.4f}), but with fewer than 2 seeds per "
                "variant there is no spread to test against; re-run with `--seeds 3`.")
    verdict = ("the interval excludes 0: the difference is significant at the 95% level"
               if ci["ci_low"] > 0 else "the interval includes 0: the difference is within seed-to-seed noise")
    return (f"**{best['variant']}** vs runner-up **{second['variant']}**: the runner-up's mean val loss is higher by "
            f"{ci['difference']:.4f} (bootstrap 95% CI over seeds [{ci['ci_low']:.4f}, {ci['ci_high']:.4f}], "
            f"{BOOTSTRAP_SAMPLES:,} resamples); {verdict}.")


def _f(x, fmt=".4f") -> str:
    return "–" if x is None else format(x, fmt)


def markdown(sweep_dir: Path, variants: list[dict], rows: list[dict], plots: list[str]) -> str:
    lines = [f"# Sweep report: {Path(sweep_dir).name}", "",
             (f"{len(rows)} trials, {len(variants)} variants; ranked by mean final validation loss "
             "(mean ± std over seeds)."), "",
             "| rank | variant | seeds | val loss | perplexity | best step | tokens/s | params | wall time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        spread = v["seeds"] > 1  # one seed has no spread to show
        loss = "–" if v["val_loss_mean"] is None else (f"{v['val_loss_mean']:.4f}" + (
            f" ± {v['val_loss_std']:.4f}" if spread else ""))
        ppl = "–" if v["perplexity_mean"] is None else (f"{v['perplexity_mean']:.3f}" + (
            f" ± {v['perplexity_std']:.3f}" if spread else ""))
        failed = f" ({v['unfinished']} not finished)" if v["unfinished"] else ""
        params = "–" if v["n_params"] is None else f"{v['n_params'] / 1e6:.3f}M"
        lines.append(f"| {v['rank'] or '–'} | {v['variant']} | {v['seeds']}{failed} | {loss} | {ppl} | "
                     f"{_f(v['best_step'], '.0f')} | {_f(v['tokens_per_sec'], ',.0f')} | {params} | "
                     f"{_f(v['wall_seconds'], '.1f')}{'' if v['wall_seconds'] is None else ' s'} |")
    lines += ["", significance_note(variants), ""]
    failures = [r for r in rows if r["status"] != DONE]
    if failures:
        lines += ["## Trials that did not finish", ""]
        lines += [f"- `{r['trial']}`: {r['status']}" + (f" — {r['error']}" if r["error"] else "") for r in failures]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def csv_text(variants: list[dict]) -> str:
    keys = sorted({k for v in variants for k in v["params"]})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "variant", *keys, "seeds", "unfinished", "val_loss_mean", "val_loss_std", "perplexity_mean",
                "perplexity_std", "best_step", "tokens_per_sec", "params", "wall_seconds"])
    for v in variants:
        w.writerow([v["rank"] or "", v["variant"], *[v["params"].get(k, "") for k in keys], v["seeds"], v["unfinished"],
                    *[("" if x is None else f"{x:.6g}") for x in (
                        v["val_loss_mean"], v["val_loss_std"], v["perplexity_mean"], v["perplexity_std"],
                        v["best_step"], v["tokens_per_sec"], v["n_params"], v["wall_seconds"])]])
    return buf.getvalue()


def _order(x):
    """Numbers by value, then everything else by text."""
    is_number = isinstance(x, (int, float)) and not isinstance(x, bool)
    return (0, x, "") if is_number else (1, 0, str(x))


def plots(out_dir: Path, variants: list[dict], rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []  # a plot with no data is not drawn at all
    # Overlaid val-loss curves: one colour per variant, one line per seed.
    if any(r["curve"] for r in rows):
        fig, ax = plt.subplots(figsize=(8, 5))
        colours = plt.get_cmap("tab10")
        for i, v in enumerate(variants):
            for j, r in enumerate(t for t in rows if t["variant"] == v["variant"] and t["curve"]):
                steps, losses = zip(*r["curve"])
                ax.plot(steps, losses, color=colours(i % 10), alpha=0.85, marker=".",
                        label=v["variant"] if j == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("validation loss per variant (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "loss_curves.png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append("loss_curves.png")
    # Final val loss against each swept hyperparameter.
    keys = sorted({k for v in variants for k in v["params"]})
    finished = [v for v in variants if v["val_loss_mean"] is not None]
    for key in keys:
        points = [(v["params"].get(key), v["val_loss_mean"], v["val_loss_std"]) for v in finished if key in v["params"]]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _, _ in points)
        labels = sorted({x for x, _, _ in points}, key=_order)
        for x, m, s in points:
            ax.errorbar(x if numeric else labels.index(x), m, yerr=s, fmt="o", color="tab:blue", alpha=0.8)
        if numeric and len(labels) > 2 and min(labels) > 0 and max(labels) / min(labels) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), [str(x) for x in labels])
        ax.set_xlabel(key)
        ax.set_ylabel("final val loss (mean ± std)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"val_loss_vs_{key.replace('.', '_')}.png"
        fig.savefig(out_dir / name, dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append(name)
    # A heatmap when exactly two hyperparameters were swept.
    if len(keys) == 2 and finished:
        xs = sorted({v["params"].get(keys[0]) for v in finished}, key=_order)
        ys = sorted({v["params"].get(keys[1]) for v in finished}, key=_order)
        grid = np.full((len(ys), len(xs)), np.nan)
        for v in finished:
            grid[ys.index(v["params"].get(keys[1])), xs.index(v["params"].get(keys[0]))] = v["val_loss_mean"]
        fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 1.0 * len(ys) + 2))
        im = ax.imshow(grid, cmap="viridis_r")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(keys[0])
        ax.set_ylabel(keys[1])
        lo, hi = np.nanmin(grid), np.nanmax(grid)
        for (yi, xi), val in np.ndenumerate(grid):
            if not np.isnan(val):  # dark text on the light (low-loss) cells of viridis_r, white on dark ones
                light = hi == lo or (val - lo) / (hi - lo) < 0.5
                ax.text(xi, yi, f"{val:.3f}", ha="center", va="center", color="k" if light else "w", fontsize=8)
        fig.colorbar(im, ax=ax, label="mean final val loss")
        fig.tight_layout()
        fig.savefig(out_dir / "heatmap.png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        written.append("heatmap.png")
    return written


def report(sweep_dir: Path, out_dir: Path | None = None) -> dict:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    variants = aggregate(rows)
    out_dir = Path(out_dir or sweep_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = plots(out_dir, variants, rows)
    for stale in [out_dir / "loss_curves.png", out_dir / "heatmap.png", *out_dir.glob("val_loss_vs_*.png")]:
        if stale.name not in written:  # an earlier report's plot that has no data now
            stale.unlink(missing_ok=True)
    (out_dir / "report.md").write_text(markdown(sweep_dir, variants, rows, written))
    (out_dir / "results.csv").write_text(csv_text(variants))
    return {"report": str(out_dir / "report.md"), "csv": str(out_dir / "results.csv"),
            "plots": [str(out_dir / p) for p in written],
            "ranking": [{k: v[k] for k in ("rank", "variant", "val_loss_mean", "val_loss_std", "seeds", "unfinished")}
                        for v in variants], "significance": significance_note(variants)}
