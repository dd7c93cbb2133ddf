"""Evaluation: held-out likelihood and accuracy (likelihood.py), translation decoding with BLEU/chrF
(translate.py), and reward-model pairwise evaluation (reward_model.py).

May import: config/, data/, losses.py.
"""
