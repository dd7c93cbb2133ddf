"""The chat template: OpenAI-style `messages` → token ids and the loss weight of each token.

One function for every stage: supervised fine-tuning trains on what `render` returns, sampling and
the chat prompt with `prompt_ids` (the same tokens followed by `<|assistant|>`), the reward model
reads a score at `<|reward|>` after `render`'s tokens, so train and inference tokenization cannot
differ. A conversation is laid out as

    <|endoftext|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

Every token of an assistant turn's text and the `<|end|>` closing it are supervised (weight 1);
everything else (role tokens, system and user text, the leading <|endoftext|>) is context
(weight 0). Padding is `<pad>`, never `<|end|>` or `<|endoftext|>`, so the model learns to stop.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from plutao.tokenizer.base import Tokenizer
from plutao.tokenizer.specials import TokenizerError

ROLES = ("system", "user", "assistant")
TEMPLATE = "plutao-chat-v1: <|endoftext|> then <|ROLE|> content <|end|> per message; reply after <|assistant|>"


class ChatError(TokenizerError):
    """A conversation the template cannot render (one line: what is wrong)."""


@dataclasses.dataclass(frozen=True)
class Rendered:
    ids: np.ndarray  # int32 (n,)
    weights: np.ndarray  # int32 (n,): 1 = a supervised token (predicted from the ones before it)

    def __len__(self) -> int:
        return len(self.ids)


def template_hash(tokenizer: Tokenizer) -> str:
    """What a run's chat tokens depend on: the layout above and the ids of the tokens it uses."""
    ids = [tokenizer.eot_id, *role_ids(tokenizer).values(), tokenizer.end_id, tokenizer.reward_id, tokenizer.pad_id]
    return hashlib.sha256(f"{TEMPLATE}|{ids}".encode()).hexdigest()[:16]


def role_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {"system": tokenizer.system_id, "user": tokenizer.user_id, "assistant": tokenizer.assistant_id}


def check_messages(messages, *, needs_reply: bool = False, generation: bool = False) -> list[dict]:
    """`messages` as a list of {"role", "content"} dicts, or a ChatError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatError(f"message {i} must be an object with \"role\" and \"content\"")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ChatError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"message {i} ({role}) has non-text content; \"content\" must be a string")
        if role == "system" and i != 0:
            raise ChatError(f"message {i} is a system message; only the first message may be one")
        out.append({"role": role, "content": content})
    if needs_reply and not any(m["role"] == "assistant" for m in out):
        raise ChatError("the conversation has no assistant turn, so nothing in it would be trained; add one")
    if generation and out[-1]["role"] == "assistant":
        raise ChatError("the conversation ends with an assistant turn; end it with a user message to get a reply")
    return out


def render(messages: Sequence[dict], tokenizer: Tokenizer) -> Rendered:
    """The conversation's ids and loss weights (assistant text and its <|end|> are supervised)."""
    messages = check_messages(list(messages))
    roles = role_ids(tokenizer)
    ids, weights = [tokenizer.eot_id], [0]
    for m in messages:
        text = tokenizer.encode_unseen(m["content"]).tolist()  # (a character a char vocabulary lacks: <unk>)
        supervised = int(m["role"] == "assistant")
        ids += [roles[m["role"]], *text, tokenizer.end_id]
        weights += [0, *[supervised] * len(text), supervised]
    return Rendered(np.asarray(ids, np.int32), np.asarray(weights, np.int32))


def prompt_ids(messages: Sequence[dict], tokenizer: Tokenizer) -> list[int]:
    """What a model continues to reply: the rendered conversation, then <|assistant|>."""
    check_messages(list(messages), generation=True)
    return render(messages, tokenizer).ids.tolist() + [tokenizer.assistant_id]


def fitted_prompt_ids(messages: Sequence[dict], tokenizer: Tokenizer, budget: int) -> tuple[list[int], int, int]:
    """`prompt_ids` made to fit in `budget` tokens without breaking the layout: the oldest turns after
    the system message go first, then the system message, then the last message loses tokens from
    the start of its text. Returns (ids, messages dropped, text tokens cut)."""
    messages = check_messages(list(messages), generation=True)
    system, rest = (messages[:1], messages[1:]) if messages[0]["role"] == "system" else ([], messages)
    ids, dropped = prompt_ids(system + rest, tokenizer), 0
    while len(ids) > budget and len(rest) > 1:
        rest = rest[1:]
        dropped += 1
        ids = prompt_ids(system + rest, tokenizer)
    if len(ids) > budget and system:
        system, dropped = [], dropped + 1
        ids = prompt_ids(rest, tokenizer)
    cut = 0
    if len(ids) > budget:  # the layout ends <|role|> text <|end|> <|assistant|>: cut the text's first tokens
        n_text = len(tokenizer.encode_unseen(rest[-1]["content"]))
        cut = min(len(ids) - budget, n_text)
        start = len(ids) - 2 - n_text
        ids = ids[:start] + ids[start + cut:]
    return ids[-budget:], dropped, cut


def reply_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Tokens that end a reply: <|end|> (a proper end), or a role token (the model ran on into a turn of
    its own). <|endoftext|> always stops the sampler."""
    return (tokenizer.end_id, tokenizer.user_id, tokenizer.system_id, tokenizer.assistant_id)


def reward_ids(messages: Sequence[dict], tokenizer: Tokenizer, *, ended: bool = True) -> list[int]:
    """A conversation ending with the reply to score, then <|reward|>: the reward model's input.
    `ended=False`: the reply did not end with <|end|> (it ran to its budget or on into another turn),
    and the reward model sees it without one."""
    messages = check_messages(list(messages))
    if messages[-1]["role"] != "assistant":
        raise ChatError("the conversation to score must end with the assistant's reply")
    ids = render(messages, tokenizer).ids.tolist()
    return (ids if ended else ids[:-1]) + [tokenizer.reward_id]


def conversation(prompt: str | Sequence[dict], response: str | None = None, system: str | None = None) -> list[dict]:
    """Messages from a prompt (text, or messages already) and an optional response."""
    if isinstance(prompt, str):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
    if response is not None:
        messages = messages + [{"role": "assistant", "content": response}]
    return messages


def marked(tokenizer: Tokenizer, rendered: Rendered, *, colour: bool) -> str:
    """The conversation with each token marked trained or not: on a terminal, trained tokens in green
    and the rest dimmed; otherwise trained tokens in [brackets]."""
    strings = tokenizer.token_strings(rendered.ids)
    out = []
    for s, w in zip(strings, rendered.weights):
        shown = s.replace("\n", "\\n\n")
        if colour:
            out.append(f"\x1b[1;32m{shown}\x1b[0m" if w else f"\x1b[2m{shown}\x1b[0m")
        else:
            out.append(f"[{shown}]" if w else shown)
    return "".join(out)
