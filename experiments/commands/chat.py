"""`plutao chat` and `plutao tokenize --chat` (being written)."""


def cmd_chat(args) -> int:
    raise NotImplementedError


def tokenize_chat(args) -> int:
    raise NotImplementedError
