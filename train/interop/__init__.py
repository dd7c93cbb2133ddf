"""Models in from and out to the formats other systems run: Hugging Face GPT-2 and Llama checkpoints.

safetensors_io (one tensor at a time), hf_models (config.json and the parameter mapping) and
hf_tokenizer (tokenizer.json and the chat template) import only config/ (and model/, tokenizer/);
hf_run, which writes and reads run directories, adds step, tasks and run/. Never rl/ or loop.
"""
