"""Runs: the run directory and its config (rundir.py), the single-writer lock, orbax checkpoints,
metrics and plots, resuming (resume.py), and lineage.py, which loads a run or a parent run (init_from, LoRA bases) into a Trainer.

rundir, lock, checkpoint and metrics import only config/; resume.py (what may change between invocations,
the stop flag, restoring the newest readable checkpoint) adds parallel/; lineage imports step and tasks.
Never rl/.
"""
