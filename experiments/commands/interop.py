"""`plutao import-hf DIR --workdir RUN` and `plutao export-hf RUN --out DIR`: Hugging Face GPT-2 and
Llama checkpoints in and out (train/interop/hf_run.py)."""

from __future__ import annotations

from pathlib import Path


def cmd_import_hf(args) -> int:
    from plutao.train.interop.hf_run import import_hf

    done = import_hf(Path(args.directory), Path(args.workdir), context=args.context_length, seed=args.seed)
    print(f"imported {done.architecture} from {args.directory}: {done.n_params:,} parameters "
          f"({done.checkpoint_bytes / 2**20:,.1f} MiB of safetensors) into {done.run_dir} in {done.seconds:.1f} s")
    for note in done.notes:
        print(f"  {note}")
    print(f"  use it like any run: plutao sample {done.run_dir} --prompt '...', plutao sft {done.run_dir} ...")
    return 0


def cmd_export_hf(args) -> int:
    from plutao.train.interop.hf_run import export_hf
    from plutao.train.run.lineage import load_run

    run = load_run(Path(args.run_dir), args.step, lazy=True)
    done = export_hf(run, Path(args.out))
    print(f"exported {args.run_dir} (step {run.step}) as {done.architecture}: {done.n_params:,} parameters, "
          f"{done.nbytes / 2**20:,.1f} MiB, into {done.out} in {done.seconds:.1f} s")
    if done.note:
        print(f"  {done.note}")
    print(f"  load it with transformers: AutoModelForCausalLM.from_pretrained({str(done.out)!r})")
    return 0


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    imp = sub.add_parser("import-hf", help="a Hugging Face GPT-2 or Llama checkpoint directory as a plutao run")
    imp.add_argument("directory", help="what transformers' save_pretrained wrote: config.json, model.safetensors "
                                       "(or shards with their index), tokenizer.json")
    imp.add_argument("--workdir", required=True, help="the new run's directory (must not exist or be empty)")
    imp.add_argument("--context-length", type=int, default=0,
                     help="a rotary model's context (default: its max_position_embeddings, at most 8192)")
    imp.add_argument("--seed", type=int, default=0, help="train.seed recorded in the run")
    imp.set_defaults(fn=cmd_import_hf)
    exp = sub.add_parser("export-hf", help="a run as a Hugging Face checkpoint (GPT-2 or Llama layout)")
    exp.add_argument("run_dir", help="a decoder run (a LoRA run is written with its adapters added in)")
    exp.add_argument("--out", required=True, help="the new directory (must not exist or be empty)")
    exp.add_argument("--step", type=int, help="the checkpoint to export (default: the newest)")
    exp.set_defaults(fn=cmd_export_hf)
