"""The `plutao` command line: the argument parser, and dispatch to the commands in
`plutao.experiments.commands` (one module per concern).

Every user mistake ends in one line on stderr ("plutao: error: ...") and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from plutao.experiments.commands.assistant import cmd_reward, cmd_sft
from plutao.experiments.commands.benchmarks import cmd_bench, cmd_bench_baselines, cmd_bench_sweep
from plutao.experiments.commands.chat import cmd_chat
from plutao.experiments.commands.evaluation import (
    cmd_eval,
    cmd_fill_mask,
    cmd_sample,
    cmd_score,
    cmd_translate,
)
from plutao.experiments.commands.inspection import cmd_analogy, cmd_attention, cmd_neighbors, cmd_tokenize
from plutao.experiments.commands.lora import cmd_merge_lora
from plutao.experiments.commands.report_card import cmd_report_card
from plutao.experiments.commands.rl import cmd_dpo, cmd_grpo, cmd_pipeline, cmd_ppo
from plutao.experiments.commands.scale import (
    cmd_bench_scaling,
    cmd_launch,
    cmd_params,
    cmd_plan,
    cmd_shardings,
)
from plutao.experiments.commands.sweeps import cmd_report, cmd_study, cmd_sweep
from plutao.experiments.commands.training import cmd_plot, cmd_train
from plutao.train.config.presets import PRESETS


def _user_errors():
    from plutao.model.sampling import SamplingError
    from plutao.tokenizer import TokenizerError
    from plutao.train.config.errors import UserError

    return (UserError, TokenizerError, SamplingError)


class OneLineErrors(argparse.ArgumentParser):
    """argparse's usage mistakes in the same one-line form as every other error (subcommands inherit it)."""

    def error(self, message: str):
        print(f"plutao: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from plutao.train.config.schema import config_defaults

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
    s.add_argument("--system", help="chat runs: a system message before the prompt")
    s.add_argument("--best-of", type=int, metavar="N", help="chat runs: sample N replies in one batch and print the "
                   "one --reward scores highest")
    s.add_argument("--reward", metavar="RM_RUN", help="the reward model that judges --best-of replies")
    s.add_argument("--show-all", action="store_true", help="with --best-of: every reply with its reward")
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
    c.add_argument("--text", help="the text to score (language-model runs)")
    c.add_argument("--prompt", help="reward-model runs: the user message")
    c.add_argument("--response", help="reward-model runs: the reply to score")
    c.add_argument("--json", action="store_true")
    c.add_argument("--step", type=int)
    c.set_defaults(fn=cmd_score)

    def stage(name, help, parent, parent_help, data_help, fn, overrides_help="(after the stage's defaults)"):
        """A stage's parser: its parent run, key=value overrides, --workdir, --data, --step, --quiet, --json."""
        sp = sub.add_parser(name, help=help)
        sp.add_argument(parent, help=parent_help)
        sp.add_argument("overrides", nargs="*", help=f"section.key=value overrides {overrides_help}")
        sp.add_argument("--workdir", required=True, help="the new run's directory (re-running resumes it)")
        sp.add_argument("--data", default="builtin:arith", help=data_help)
        which = "base" if parent == "base_run" else "SFT"
        sp.add_argument("--step", type=int, help=f"the {which} run's checkpoint (default: its latest)")
        sp.add_argument("--quiet", action="store_true")
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(fn=fn)
        return sp

    stage("sft", "supervised fine-tuning: a base run learns to answer in the chat template", "base_run",
          "the --workdir of the base run", "builtin:arith (the arithmetic world's demonstrations) or a .jsonl of "
          "{\"messages\": [...]} or {\"prompt\", \"response\"} lines (default %(default)s)", cmd_sft)

    rw = stage("reward", "a reward model on an SFT run's trunk, trained on rankings", "sft_run",
               "the --workdir of a `plutao sft` run", "builtin:arith (replies sampled from the SFT run, ranked by the "
               "world's labeler) or a .jsonl of pairs/ranked lists (default %(default)s)", cmd_reward)
    rw.add_argument("--k", default=None, metavar="MIN..MAX", help="builtin:arith: responses ranked per prompt "
                    "(default 4..9)")
    rw.add_argument("--labeler-noise", type=float, default=None, metavar="X",
                    help="builtin:arith: Bradley–Terry noise of the labeler (0 = gold; README gives agreement rates)")

    prompts_help = ("where the rollout prompts come from: builtin:arith (fresh world questions) or a .jsonl of "
                    "{\"messages\": [...], \"answer\": \"...\"} lines (default %(default)s)")
    po = stage("ppo", "PPO: the SFT policy learns against a frozen reward model, with a KL penalty to itself",
               "sft_run", "the --workdir of a `plutao sft` run (policy and reference)", prompts_help, cmd_ppo,
               "e.g. rl.beta=0 (after the stage's defaults)")
    po.add_argument("--reward", metavar="RM_RUN", help="the --workdir of a `plutao reward` run (required)")
    po.add_argument("--beta", type=float, help="KL coefficient to the SFT policy (default 0.02; 0 = no leash)")

    gr = stage("grpo", "GRPO/RLOO: G replies per prompt, group baselines, against a reward model or the world's "
               "checker", "sft_run", "the --workdir of a `plutao sft` run", prompts_help, cmd_grpo)
    gr.add_argument("--reward", metavar="RM_RUN|gold", help="a `plutao reward` run, or gold (verifiable rewards)")
    gr.add_argument("--group", type=int, help="replies per prompt, G ≥ 2 (default 8)")
    gr.add_argument("--baseline", choices=("group", "rloo"), help="group mean/std (GRPO, default) or leave-one-out")
    gr.add_argument("--beta", type=float, help="weight of the KL-to-reference term (default 0.04; 0 = none)")

    dp = stage("dpo", "DPO: the SFT policy learns from preference pairs directly (no reward model)", "sft_run",
               "the --workdir of a `plutao sft` run (policy and reference)", "builtin:arith (replies sampled from the "
               "SFT run and ranked by the world's labeler, as `plutao reward` does), RM_RUN (the comparisons that "
               "reward run was trained on) or a .jsonl of pairs/ranked lists", cmd_dpo)
    dp.add_argument("--beta", type=float, help="the loss's β (default 0.1)")

    pi = sub.add_parser("pipeline", help="every assistant stage on the arithmetic world (base → SFT → RM → PPO, DPO, "
                        "GRPO), per seed, resumable, then report cards and their summary over seeds")
    pi.add_argument("world", choices=("arith",), help="the built-in world")
    pi.add_argument("overrides", nargs="*", help="key=value for every stage, or STAGE:key=value (stages: base, sft, "
                    "rm, ppo, dpo, grpo-gold, grpo-rm)")
    pi.add_argument("--workdir", required=True, help="where every stage's run goes (re-running skips finished ones)")
    pi.add_argument("--seeds", type=int, default=1, help="independent chains, train.seed 0..S-1 (default %(default)s)")
    pi.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's step count (default 1)")
    pi.add_argument("--problems", type=int, default=200, help="report card: problems per digit count (default 200)")
    pi.add_argument("--best-of", type=int, default=8, help="report card: best-of-N column of the SFT run (default 8)")
    pi.set_defaults(fn=cmd_pipeline)

    ml = sub.add_parser("merge-lora", help="a LoRA run's base plus its adapters as an ordinary run (whole weights)")
    ml.add_argument("run_dir", help="a run trained with lora.rank > 0")
    ml.add_argument("--workdir", required=True, help="the merged run's directory (new)")
    ml.add_argument("--step", type=int, help="the LoRA run's checkpoint (default: its latest)")
    ml.set_defaults(fn=cmd_merge_lora)

    ch = sub.add_parser("chat", help="chat with a run in the terminal (reads one message per line when piped)")
    ch.add_argument("run_dir")
    ch.add_argument("--system", help="a system message at the start of the conversation")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s); /temp X changes it")
    ch.add_argument("--top-k", type=int, default=0)
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--max-new-tokens", type=int, default=64, help="longest reply, in tokens (default: %(default)s)")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--compare", nargs="+", metavar="RUN", help="also answer every message with these runs")
    ch.add_argument("--step", type=int)
    ch.set_defaults(fn=cmd_chat)

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
    rc.add_argument("--out", help="where report.md, report.json and the charts go (default: report-card/)")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--json", action="store_true")
    rc.set_defaults(fn=cmd_report_card)

    pp = sub.add_parser("plot", help="(re)write RUN_DIR/loss.png (RL runs: rewards.png) from metrics.jsonl; "
                        "several RL runs: reward-model and gold reward against KL in one picture")
    pp.add_argument("run_dir", nargs="+")
    pp.add_argument("--out", help="several runs: the picture's path (default overoptimization.png)")
    pp.set_defaults(fn=cmd_plot)

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
            from plutao.train.parallel.distributed import initialize

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
