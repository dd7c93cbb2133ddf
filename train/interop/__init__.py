"""Models in from and out to the formats other systems run: Hugging Face GPT-2 and Llama checkpoints.

safetensors_io (one tensor at a time), the layouts (hf_layout, hf_gpt2, hf_llama: config.json and the
parameter mapping of each architecture; hf_models, their registry) and hf_tokenizer (tokenizer.json and
the chat template) import only config/ (and model/, tokenizer/);
hf_run, which writes and reads run directories, adds step, tasks and run/. Never rl/ or loop.
"""
