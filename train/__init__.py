"""Training: from a validated config to a run directory with checkpoints, metrics and samples.

One subpackage per part of the data flow; imports point one way, from the bottom of this list up
(tests/test_architecture.py holds the exact table):

    config/    typed config, presets, the one-line user errors      (imports nothing of train/)
    worlds/    generated data with a programmatic judge              (config)
    parallel/  the device mesh, logical-axis shardings, processes    (config)
    losses.py, optim.py   pure loss math and the optax optimizer      (config)
    data/      sources, tokenized cache, splits, named batches, chat/ranked/pair batches (above)
    eval/      likelihood, translation and reward-model evaluation   (data and below)
    rl/objectives, rl/rollouts, rl/comparisons   RL math, sampling replies, labelled comparisons
    tasks/     one module per kind of training: model, batches, loss, evaluation, samples
    step.py    the jit-compiled train step over a mesh               (tasks)
    run/       run dir, lock, checkpoints, metrics (bottom: config only); lineage.py loads runs and parents (step)
    interop/   Hugging Face checkpoints in and out: the mappings (config); hf_run.py writes and reads runs (step)
    rl/rewards, rl/loop   reward sources and the RL loop             (run)
    loop.py, ngram_run.py   the supervised loop and the n-gram fit   (everything)
"""
