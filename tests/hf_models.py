"""Tiny randomly initialised Hugging Face models and tokenizers, built here (no download), saved the
way `save_pretrained` saves them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = ("Olá, mundo! Não há ação sem reação. 🙂🚀 café crème brûlée. "
        "def add(a, b):\n    return a + b  # soma\n" "The quick brown fox jumps over the lazy dog. 12345 + 678 = 13023.\n")
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# A Phi-3-like template: one special token opens each role, <|end|> closes each message.
ROLE_TEMPLATE = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer(vocab: int = 300, chat: str | None = None):
    """A byte-level BPE trained on a few lines, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] + (CHAT_TOKENS if chat == "roles" else ["<|im_start|>", "<|im_end|>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat:
        fast.chat_template = ROLE_TEMPLATE if chat == "roles" else CHATML
    return fast


def llama(directory: Path, *, n_kv: int = 2, tie: bool = False, theta: float = 50000.0, bias: bool = False,
          vocab: int = 300, chat: str | None = None, rope_scaling: dict | None = None, seed: int = 0,
          shards: str | None = None, bf16: bool = False) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tokenizer(vocab, chat)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=n_kv, max_position_embeddings=64,
                         rms_norm_eps=1e-6, tie_word_embeddings=tie, attention_bias=bias,
                         rope_parameters={"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    _randomise(model, seed)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=shards) if shards else model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def gpt2(directory: Path, *, vocab: int = 300, tie: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = tokenizer(vocab)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).eval()
    _randomise(model, seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def _randomise(model, seed: int) -> None:
    """Non-trivial norms and biases (transformers starts them at 1 and 0, which would hide a swap)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))


def hf_logits(directory: Path, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask))
    return out.logits.numpy()
