"""One reply of a generation request as it is written (`Choice`): its text tokens, its text so far and what
of it was sent, stop strings (matched on the text: they cut and end it; text that could be the start of
one waits), and — for a run that calls tools — each tool turn the runtime answered, kept apart from the
text: the call the model wrote and the result the runtime wrote (an Event marked `forced`)."""

from __future__ import annotations

import json

from plutao.model.engine import Event
from plutao.tools import TOOLS, parse_call


class Choice:
    def __init__(self, tok, stops: list[str], stop_ids, *, tools: bool = False):
        self.tok, self.stops, self.stop_ids, self.tools = tok, stops, set(stop_ids), tools
        self.tokens: list[int] = []  # the reply's text tokens (calls, results and the stop token left out)
        self.generated = 0  # tokens the model wrote (calls included): usage's completion_tokens
        self.text, self.sent, self.finish, self.hit = "", "", None, False
        self.stop_token: int | None = None  # (the token the reply stopped on, left out of its text)
        self.turns: list[dict] = []  # answered tool calls: {"call", "result"}
        self.new_turns: list[dict] = []  # ... those not yet sent
        self.call: list[int] | None = None  # the call being written (after <|call|>)
        self.first_at: float | None = None
        self.last_at: float | None = None

    def add(self, event: Event) -> str:
        """Take an engine event; return the new text to send (possibly none)."""
        tok = self.tok
        if event.forced:  # (the runtime's result: the tool turn of the call the model just closed)
            result = [t for t in event.tokens if t not in (tok.end_id, tok.assistant_id)]
            turn = {"call": tok.decode(self.call or []), "result": tok.decode(result)}
            self.turns.append(turn)
            self.new_turns.append(turn)
            self.call = None
            return ""
        tokens = list(event.tokens)
        if event.finish == "stop" and tokens and tokens[-1] in self.stop_ids:
            self.stop_token, tokens = tokens[-1], tokens[:-1]
        self.generated += len(tokens)
        for t in tokens:
            if self.tools and t == tok.call_id:
                self.call = []
            elif self.call is not None:
                if t != tok.tool_id:
                    self.call.append(t)
            else:
                self.tokens.append(t)
        full = tok.decode(self.tokens)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            full, self.hit, self.finish = full[:cut], True, "stop"
            while self.tokens and len(tok.decode(self.tokens[:-1])) >= cut:
                self.tokens.pop()  # (the tokens of the stop string and after it are not the reply's)
                self.generated -= 1
        elif event.finish:
            self.finish = event.finish
        self.text = full
        done = self.finish is not None
        hold = 0 if done else max((len(s) - 1 for s in self.stops), default=0)
        ready = full[:len(full) - hold] if hold else full
        if not done:  # (a character cut between tokens decodes to U+FFFD, one per byte: it waits for the rest)
            ready = ready.rstrip("\ufffd")
        new = ready[len(self.sent):] if ready.startswith(self.sent) and len(ready) > len(self.sent) else ""
        self.sent += new
        return new

    def take_turns(self) -> list[dict]:
        out, self.new_turns = self.new_turns, []
        return out


def turn_messages(turns: list[dict], first: int = 0) -> list[dict]:
    """Answered tool turns as OpenAI messages: an assistant message with the call, then the tool's result."""
    out = []
    for k, t in enumerate(turns, first):
        name, argument = parse_call(t["call"]) or ("", t["call"])
        parameter = TOOLS[name].parameter if name in TOOLS else "input"
        call_id = f"call_{k}"
        out += [{"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": name, "arguments": json.dumps({parameter: argument})}}]},
                {"role": "tool", "tool_call_id": call_id, "content": t["result"]}]
    return out
