"""Tokenizers for plutao: char, byte, sentencepiece BPE and word, each declaring its special tokens.

tok = train_tokenizer("bpe", texts, vocab_size=8192)
tok.save("runs/x/tokenizer"); tok = load_tokenizer("runs/x/tokenizer")
ids = tok.encode_array(corpus)          # int32 [n_tokens]
print(format_tokens(tok, "Hello, world!", price_per_1k=0.002))

Special tokens are the tokenizer's to declare (see `SpecialTokens` in specials.py): ask it, never assume ids.
tok.specials                            {"<pad>": 0, "<|endoftext|>": 1, ...}  token string -> id
tok.special_id("user")                  id by role or by token string; TokenizerError if undeclared
tok.eot_id, tok.pad_id, tok.user_id     the same, for each role
tok.is_special(ids)                     bool / bool array
tok.ordinary_mask(model_vocab_size)     bool [V]: ordinary ids True; specials and padded rows False
train_tokenizer("char", texts, specials={"<pad>": 40, ...})   specials wherever a vocabulary has them
SPECIAL_TOKENS / NUM_SPECIAL describe only the historical layout (those eleven at ids 0..10) that
tokenizers trained here use by default and that every folder saved without a declaration loads with.
"""

from .base import Tokenizer
from .bpe import BPETokenizer
from .byte import ByteTokenizer
from .char import CharTokenizer
from .factory import TOKENIZER_KINDS, grown, load_tokenizer, train_tokenizer
from .hf import HFTokenizer
from .specials import DEFAULT_ROLES, NUM_SPECIAL, SPECIAL_TOKENS, TOOL_TOKENS, SpecialTokens, TokenizerError
from .viewer import format_tokens
from .word import WordTokenizer

__all__ = [
    "DEFAULT_ROLES",
    "NUM_SPECIAL",
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "TOOL_TOKENS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "SpecialTokens",
    "Tokenizer",
    "TokenizerError",
    "WordTokenizer",
    "format_tokens",
    "grown",
    "load_tokenizer",
    "train_tokenizer",
]
