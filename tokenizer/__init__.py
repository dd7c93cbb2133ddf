"""Tokenizers for plutao: char, byte, sentencepiece BPE and word, with shared special tokens.

tok = train_tokenizer("bpe", texts, vocab_size=8192)
tok.save("runs/x/tokenizer"); tok = load_tokenizer("runs/x/tokenizer")
ids = tok.encode_array(corpus)          # int32 [n_tokens]
print(format_tokens(tok, "Hello, world!", price_per_1k=0.002))
"""

from .base import SPECIAL_TOKENS, Tokenizer, TokenizerError
from .bpe import BPETokenizer
from .byte import ByteTokenizer
from .char import CharTokenizer
from .factory import TOKENIZER_KINDS, load_tokenizer, train_tokenizer
from .viewer import format_tokens
from .word import WordTokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "TokenizerError",
    "WordTokenizer",
    "format_tokens",
    "load_tokenizer",
    "train_tokenizer",
]
