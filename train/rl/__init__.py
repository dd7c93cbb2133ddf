"""Reinforcement learning from rewards and preferences.

objectives.py   the RL math: KL penalties, advantages, PPO/GRPO/DPO losses (pure functions)
rollouts.py     prompts and sampled replies with their stop ids
comparisons.py  labelled comparisons sampled from a policy (the reward model's data)
rewards.py      reward sources: a reward-model run or the world's gold checker
loop.py         the RL loop: sample, score, update, evaluate, checkpoint

objectives, rollouts and comparisons sit below tasks/ (they import data/ and worlds/ only);
rewards and loop sit above run/.
"""
