"""Pre-Transformer language models kept as baselines: recurrent networks and n-grams."""
