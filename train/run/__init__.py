"""Runs: the run directory and its config (rundir.py), the single-writer lock, orbax checkpoints,
metrics and plots, and lineage.py, which loads a run or a parent run (init_from, LoRA bases) into a Trainer.

rundir, lock, checkpoint and metrics import only config/; lineage imports step and tasks. Never rl/.
"""
