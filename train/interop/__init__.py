"""Models in from and out to the formats other systems run: Hugging Face GPT-2 and Llama checkpoints."""
