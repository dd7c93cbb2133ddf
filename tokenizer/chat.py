"""The chat template: OpenAI-style `messages` → token ids and the loss weight of each token.

One function for every stage: supervised fine-tuning trains on what `render` returns, sampling and
the chat prompt with `prompt_ids` (the same tokens followed by `<|assistant|>`), the reward model
reads a score at `<|reward|>` after `render`'s tokens, so train and inference tokenization cannot
differ. A conversation is laid out as

    <|endoftext|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

Every token of an assistant turn's text and the `<|end|>` closing it are supervised (weight 1);
everything else (role tokens, system and user text, the leading <|endoftext|>) is context
(weight 0). Padding is `<pad>`, never `<|end|>` or `<|endoftext|>`, so the model learns to stop.

Tool use (a tokenizer that declares <|call|> and <|tool|>; `tokenizer.grown` adds them to a run's):
an assistant message with OpenAI `tool_calls`, each answered by a `tool` message with its
`tool_call_id`, is laid out call by call as

    <|assistant|> text <|call|> NAME: ARGUMENT <|tool|> result <|end|> <|assistant|> text <|end|>

The call, and the <|tool|> that closes it, are the assistant's (supervised); the result and its
<|end|>, and the <|assistant|> after it, are the runtime's (weight 0): a sampler that meets <|tool|>
runs the call and appends exactly those tokens, then the model goes on. ARGUMENT is the one string
value of the call's JSON `arguments` (`{"expression": "347+589"}` → calculator: 347+589). A
tokenizer without the tool tokens renders as before, and its template hash is unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import numpy as np

from plutao.tokenizer.base import Tokenizer
from plutao.tokenizer.specials import TokenizerError
from plutao.tools import TOOLS, format_call, parse_call, run_call

ROLES = ("system", "user", "assistant", "tool")
TEMPLATE = "plutao-chat-v1: <|endoftext|> then <|ROLE|> content <|end|> per message; reply after <|assistant|>"
TOOL_TEMPLATE = ("plutao-chat-tools-v1: assistant text <|call|> NAME: ARGUMENT <|tool|> result <|end|> <|assistant|> "
                 "then the reply goes on")


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
    reward = tokenizer.reward_id if tokenizer.has_special("reward") else -1  # (an imported tokenizer may have none)
    ids = [tokenizer.eot_id, *role_ids(tokenizer).values(), tokenizer.end_id, reward, tokenizer.pad_id]
    if tokenizer.has_tools:  # (a tokenizer without the tool tokens keeps the hash its runs recorded)
        return hashlib.sha256(f"{TEMPLATE}|{TOOL_TEMPLATE}|{ids}|{[tokenizer.call_id, tokenizer.tool_id]}".encode()
                              ).hexdigest()[:16]
    return hashlib.sha256(f"{TEMPLATE}|{ids}".encode()).hexdigest()[:16]


def role_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The role tokens that open a message (a tool's result follows the <|tool|> closing its call)."""
    return {role: tokenizer.special_id(role) for role in ("system", "user", "assistant")
            if role != "system" or tokenizer.has_special(role)}


def call_argument(call, where: str) -> tuple[str, str]:
    """(name, argument text) of an OpenAI tool call {"id", "type": "function", "function": {"name",
    "arguments"}}: `arguments` is a JSON object with one string value (or a plain string)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ChatError(f"{where} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
    arguments = fn.get("arguments", "")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        parsed = arguments
    if isinstance(parsed, dict) and len(parsed) == 1 and isinstance(next(iter(parsed.values())), str):
        parsed = next(iter(parsed.values()))
    if not isinstance(parsed, str):
        raise ChatError(f"{where} has arguments {arguments!r}; give a JSON object with one string value, e.g. "
                        "{\"expression\": \"347+589\"}")
    return fn["name"], parsed


def check_messages(messages, *, needs_reply: bool = False, generation: bool = False) -> list[dict]:
    """`messages` as a list of {"role", "content"} dicts (an assistant's also with "tool_calls", a tool's
    with "tool_call_id"), or a ChatError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("\"messages\" must be a non-empty list of {\"role\", \"content\"} objects")
    out, pending = [], []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise ChatError(f"message {i} must be an object with \"role\" and \"content\"")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise ChatError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise ChatError(f"message {i} ({role}) has non-text content; \"content\" must be a string")
        if role == "system" and i != 0:
            raise ChatError(f"message {i} is a system message; only the first message may be one")
        if pending and role != "tool":
            raise ChatError(f"message {i} ({role}) comes before the result of tool call {pending[0]!r}; answer each "
                            "call with a \"tool\" message first")
        item = {"role": role, "content": content}
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise ChatError(f"message {i}: only an assistant message carries \"tool_calls\" (a list)")
            for k, call in enumerate(calls):
                call_argument(call, f"message {i} tool call {k}")
                pending.append(str(call.get("id", "")))
            item["tool_calls"] = calls
        if role == "tool":
            if not pending:
                raise ChatError(f"message {i} is a tool result that answers no assistant tool call")
            if m.get("tool_call_id", pending[0]) != pending[0]:
                raise ChatError(f"message {i} answers tool call {m.get('tool_call_id')!r}, but {pending[0]!r} is the "
                                "next one to answer; give the results in the order of the calls")
            item["tool_call_id"] = pending.pop(0)
        out.append(item)
    if pending:
        raise ChatError(f"tool call {pending[0]!r} has no \"tool\" message with its result")
    if needs_reply and not any(m["role"] == "assistant" for m in out):
        raise ChatError("the conversation has no assistant turn, so nothing in it would be trained; add one")
    if generation and out[-1]["role"] == "assistant":
        raise ChatError("the conversation ends with an assistant turn; end it with a user message to get a reply")
    return out


def render(messages: Sequence[dict], tokenizer: Tokenizer) -> Rendered:
    """The conversation's ids and loss weights (assistant text and its <|end|> are supervised)."""
    messages = check_messages(list(messages))
    roles = role_ids(tokenizer)
    if any(m["role"] == "system" for m in messages) and "system" not in roles:
        raise ChatError("this tokenizer's chat template has no system role; put the instructions in the first user "
                        "message")
    if any(m["role"] == "tool" for m in messages) and not tokenizer.has_tools:
        raise ChatError("the conversation uses tools, but this tokenizer has no <|call|> and <|tool|> tokens; start "
                        "from a run that has them (a run trained on tool use grows its parent's vocabulary)")
    ids, weights = [tokenizer.eot_id], [0]
    calls: list = []  # (an assistant's later calls: each opens its own <|assistant|> after the result before)

    def add(tokens, weight):
        ids.extend(tokens)
        weights.extend([weight] * len(tokens))

    def call(c):
        add([tokenizer.call_id, *tokenizer.encode_unseen(format_call(*call_argument(c, "a tool call"))).tolist(),
             tokenizer.tool_id], 1)

    for m in messages:
        text = tokenizer.encode_unseen(m["content"]).tolist()  # (a character a char vocabulary lacks: <unk>)
        if m["role"] == "tool":
            add([*text, tokenizer.end_id], 0)
            if calls:
                add([tokenizer.assistant_id], 0)
                call(calls.pop(0))
            continue
        if m.get("tool_calls"):
            add([roles["assistant"]], 0)
            add(text, 1)
            call(m["tool_calls"][0])
            calls = list(m["tool_calls"][1:])
            continue
        supervised = int(m["role"] == "assistant")
        add([roles[m["role"]]], 0)
        add([*text, tokenizer.end_id], supervised)
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
    roles = role_ids(tokenizer)  # (an imported template may have no system role)
    return (tokenizer.end_id, roles["user"], *([roles["system"]] if "system" in roles else []), roles["assistant"])


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


# --- the runtime side of a tool call (model/agent.py runs the loop) -------------------------------

MAX_CALLS = 4  # tool calls per reply everywhere (one more is answered with a refusal; a further one ends the reply)

def call_text(tokenizer: Tokenizer, reply: Sequence[int]) -> str | None:
    """The call a reply's tokens end with: the text from its last <|call|> to the <|tool|> closing it
    (None when the reply opened no call before it)."""
    reply = list(reply)
    turn = len(reply) - reply[::-1].index(tokenizer.assistant_id) if tokenizer.assistant_id in reply else 0
    own = reply[turn:]  # (since the last tool turn: an older call is answered already)
    if not own or own[-1] != tokenizer.tool_id or tokenizer.call_id not in own:
        return None
    start = len(own) - 1 - own[::-1].index(tokenizer.call_id)
    return tokenizer.decode(own[start + 1:-1])


def result_tokens(context: int, reply_budget: int, max_calls: int) -> int:
    """The most tokens of one tool result: what lets a reply of `reply_budget` tokens of its own and up to
    max_calls + 1 tool turns (each result, <|end|>, <|assistant|>) stay within the context, but never less
    than a quarter of the context (at most 64 tokens), so a long reply budget never cuts a result to a few
    meaningless tokens (a reply that then outgrows the context goes on from its last tokens: model/agent.py)."""
    return max((context - 2 - reply_budget) // (max_calls + 1) - 2, min(context // 4, 64), 1)


def tool_turn_ids(tokenizer: Tokenizer, result: str, max_tokens: int | None = None) -> list[int]:
    """What the runtime writes after a call's <|tool|>: the result (its first `max_tokens` tokens),
    <|end|>, then <|assistant|>, from which the model goes on."""
    ids = tokenizer.encode_unseen(result).tolist()
    return [*(ids if max_tokens is None else ids[:max_tokens]), tokenizer.end_id, tokenizer.assistant_id]


def tool_turn_marks(tokenizer: Tokenizer) -> tuple[int, int] | tuple[()]:
    """(<|tool|>, <|assistant|>): the ids `runtime_targets` reads; () for a tokenizer without tools."""
    return (tokenizer.tool_id, tokenizer.assistant_id) if tokenizer.has_tools else ()


def runtime_targets(targets, tool_turn: tuple[int, int] | tuple[()]) -> np.ndarray:
    """Which of a reply's target tokens (..., T) the runtime wrote, by the layout above: everything after a
    <|tool|> up to and including the <|assistant|> that follows its result (weight 0 in `render`; holes
    in a DPO pair). `tool_turn`: `tool_turn_marks(tokenizer)`; with () all False."""
    targets = np.asarray(targets)
    if not tool_turn:
        return np.zeros(targets.shape, bool)
    tool_id, assistant_id = tool_turn
    index = np.broadcast_to(np.arange(targets.shape[-1]), targets.shape)

    def last_before(token):  # (the index of the latest `token` strictly before each position; -1 if none)
        seen = np.maximum.accumulate(np.where(targets == token, index, -1), axis=-1)
        return np.concatenate([np.full(targets.shape[:-1] + (1,), -1), seen[..., :-1]], axis=-1)

    return last_before(tool_id) > last_before(assistant_id)


def tool_answerer(tokenizer: Tokenizer, tools, *, max_calls: int = MAX_CALLS, max_result_tokens: int | None = None):
    """The agent loop's `answer`: run the call a row's reply ends with (plutao.tools: run_call never
    raises) and give the tokens of its tool turn; a call beyond `max_calls`, or a <|tool|> with no
    call before it, is answered with an error line and the reply goes on."""

    def answer(row: int, reply: list[int], calls: int) -> list[int]:
        text = call_text(tokenizer, reply)
        if calls >= max_calls:
            result = f"error: at most {max_calls} tool calls per reply; answer without another"
        elif text is None:
            result = "error: no call to answer; write NAME: ARGUMENT after the call token first"
        else:
            result = run_call(tools, text)
        return tool_turn_ids(tokenizer, result, max_result_tokens)

    return answer


def reply_messages(tokenizer: Tokenizer, tokens: Sequence[int], forced: Sequence[int]) -> list[dict]:
    """A reply the agent loop sampled (its tokens, the positions the runtime forced) as OpenAI messages:
    each call an assistant message with `tool_calls`, each result a `tool` message, the text after the
    last result the final assistant message (its stop token left out)."""
    forced, stops = set(forced), set(reply_stop_ids(tokenizer)) | {tokenizer.eot_id}
    out: list[dict] = []
    text: list[int] = []
    i, n = 0, len(tokens)
    while i < n:
        t = tokens[i]
        if t == tokenizer.call_id and i not in forced:
            j = i + 1
            while j < n and tokens[j] != tokenizer.tool_id:
                j += 1
            if j >= n:  # (cut off inside its call: no tool turn happened)
                text += [x for x in tokens[i:] if x not in stops]
                break
            call = tokenizer.decode(list(tokens[i + 1:j]))
            name, argument = parse_call(call) or ("", call)  # (unreadable: the raw text, with no name)
            parameter = TOOLS[name].parameter if name in TOOLS else "input"
            call_id = f"call_{len(out)}"
            out.append({"role": "assistant", "content": tokenizer.decode(text), "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": name, "arguments": json.dumps({parameter: argument})}}]})
            k = j + 1
            while k < n and k in forced:
                k += 1
            result = [x for x in tokens[j + 1:k] if x not in (tokenizer.end_id, tokenizer.assistant_id)]
            out.append({"role": "tool", "tool_call_id": call_id, "content": tokenizer.decode(result)})
            text, i = [], k
            continue
        if not (i == n - 1 and t in stops):
            text.append(t)
        i += 1
    out.append({"role": "assistant", "content": tokenizer.decode(text)})
    return out


def shown_reply(messages: Sequence[dict]) -> str:
    """A reply's messages as one line of text, each tool turn as [NAME: ARGUMENT → RESULT]."""
    parts = []
    for m in messages:
        if m.get("tool_calls"):
            name, argument = call_argument(m["tool_calls"][0], "a tool call")
            parts.append(m["content"] + f"[{format_call(name, argument)} → ")
        elif m["role"] == "tool":
            parts.append(m["content"] + "] ")
        else:
            parts.append(m["content"])
    return "".join(parts)


class ReplyStream:
    """A reply shown while the agent loop writes it, as `shown_reply` shows it when done: the model's
    text, each tool turn as [NAME: ARGUMENT → RESULT] (the result is the runtime's: `forced`), stop
    tokens left out. `feed` returns the text to add; a partial multi-byte character waits."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.segment, self.shown = tokenizer, [], ""
        self.stops = set(reply_stop_ids(tokenizer)) | {tokenizer.eot_id}

    def _new(self, flush: bool = False) -> str:
        text = self.tok.decode(self.segment)
        if text.endswith("\ufffd") and not flush:
            return ""
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.segment, self.shown = ([], "") if flush else (self.segment, text)
        return new

    def feed(self, tokens: Sequence[int], forced: bool) -> str:
        tok, out = self.tok, []
        for t in tokens:
            if forced and t == tok.assistant_id:  # (the runtime hands the turn back: the tool turn is over)
                out.append(self._new(flush=True) + "] ")
            elif not forced and t in (tok.call_id, tok.tool_id) and tok.has_tools:
                out.append(self._new(flush=True) + ("[" if t == tok.call_id else " → "))
            elif t != tok.end_id and (forced or t not in self.stops):
                self.segment.append(t)
                out.append(self._new())
        return "".join(out)
