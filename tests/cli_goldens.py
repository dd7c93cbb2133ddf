"""Command-line goldens: run a fixed list of plutao commands, record what they print and write, compare.

    python tests/cli_goldens.py record DIR     # before a redesign
    python tests/cli_goldens.py record DIR2    # after it
    python tests/cli_goldens.py compare DIR DIR2

Each command's stdout, stderr and exit code are recorded, and every JSON/JSONL file in the run
directories it writes (timings and paths normalised), so a move of code that changes a printed line,
a config key, a metric or a sampled text shows up as a diff. Runs in a fixed work folder so recorded
paths and config hashes are comparable.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

WORK = Path("/tmp/plutao-goldens-work")
TIMING = re.compile(r"(git_commit|time|seconds|per_s|/s|mfu|elapsed|wall|date|started|host|pid)", re.IGNORECASE)

COMMANDS: list[tuple[str, list[str]]] = [
    ("help", ["--help"]),
    ("train-help", ["train", "--help"]),
    ("sft-help", ["sft", "--help"]),
    ("ppo-help", ["ppo", "--help"]),
    ("base", ["train", "tiny", "--workdir", "{W}/base", "data.path=builtin:arith-dialogue", "train.steps=6",
              "world.documents=300", "--quiet"]),
    ("base-resume", ["train", "tiny", "--workdir", "{W}/base", "data.path=builtin:arith-dialogue",
                     "train.steps=8", "world.documents=300", "--quiet", "--allow-changed", "train.steps"]),
    ("tokenize", ["tokenize", "What is 2 plus 3?", "--tokenizer", "{W}/base"]),
    ("sample", ["sample", "{W}/base", "--prompt", "What is", "--max-new-tokens", "12", "--seed", "1"]),
    ("eval", ["eval", "{W}/base"]),
    ("sft", ["sft", "{W}/base", "--workdir", "{W}/sft", "train.steps=4", "train.eval_every=2",
             "train.sample_every=0", "world.demonstrations=300", "--quiet"]),
    ("reward", ["reward", "{W}/sft", "--workdir", "{W}/rm", "train.steps=2", "train.eval_every=2",
                "world.comparisons=8", "--quiet"]),
    ("dpo", ["dpo", "{W}/sft", "--workdir", "{W}/dpo", "train.steps=2", "world.comparisons=8", "--quiet"]),
    ("ppo", ["ppo", "{W}/sft", "--reward", "{W}/rm", "--workdir", "{W}/ppo", "train.steps=2", "rl.max_new_tokens=6", "train.batch_size=4",
             "--quiet"]),
    ("grpo", ["grpo", "{W}/sft", "--reward", "gold", "--workdir", "{W}/grpo", "train.steps=2", "rl.max_new_tokens=6", "train.batch_size=4",
             "--quiet"]),
    ("chat", ["chat", "{W}/sft", "--seed", "0", "--max-new-tokens", "8"]),
    ("bad-key", ["train", "tiny", "--workdir", "{W}/bad", "train.stepz=3"]),
    ("ngram", ["train", "--workdir", "{W}/ngram", "model.family=ngram", "data.tokenizer=word", "data.path=builtin:arith-dialogue",
               "world.documents=300", "--quiet"]),
    ("chat-tokenize", ["tokenize", "--chat", "builtin:arith", "--tokenizer", "{W}/base"]),
]


def normalise(value):
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, str):
        return value.replace(str(WORK), "{W}")
    return value


def text(s: str) -> str:
    s = s.replace(str(WORK), "{W}")
    s = re.sub(r"\d+(\.\d+)? ?(s|ms|tokens/s|it/s)\b", "<t>", s)
    return re.sub(r"MFU[^,\n]*", "MFU<t>", s)


def record(out: Path) -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, args in COMMANDS:
        argv = [a.replace("{W}", str(WORK)) for a in args]
        stdin = "What is 2 plus 2?\n/reset\nHi\n" if name == "chat" else ""
        proc = subprocess.run(["plutao", *argv], capture_output=True, text=True, input=stdin,
                              cwd=WORK, check=False)
        (out / f"{name}.txt").write_text(f"exit {proc.returncode}\n--- stdout\n{text(proc.stdout)}"
                                         f"--- stderr\n{text(proc.stderr)}")
        print(name, proc.returncode, flush=True)
    for path in sorted(WORK.rglob("*.json*")):
        if "checkpoints" in path.parts:
            continue
        rel = str(path.relative_to(WORK)).replace("/", "__")
        lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
        rows = [json.dumps(normalise(json.loads(line)), sort_keys=True, indent=1) for line in lines if line]
        (out / f"files__{rel}.txt").write_text("\n".join(rows) + "\n")


def compare(a: Path, b: Path) -> int:
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    differ = 0
    for name in names:
        pa, pb = a / name, b / name
        if not pa.exists() or not pb.exists():
            print(f"only in {'after' if not pa.exists() else 'before'}: {name}")
            differ += 1
        elif pa.read_text() != pb.read_text():
            print(f"differs: {name}")
            subprocess.run(["diff", "-u", str(pa), str(pb)], check=False)
            differ += 1
    print(f"{differ} of {len(names)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["record"] and len(sys.argv) == 3:
        record(Path(sys.argv[2]).resolve())
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
