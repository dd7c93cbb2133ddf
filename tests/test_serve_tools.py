"""A served run that calls tools, with a scripted model behind the real engine and routes: the reply's text is
its content, the call it made and the calculator's result come back as OpenAI messages (already answered),
streamed as they happen; tool_choice "none" answers without a call (the call token is never sampled)."""

import json
import types

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from plutao.experiments.serve.api import create_app
from plutao.experiments.serve.local import LocalServer
from plutao.experiments.serve.served import Served
from plutao.model import engine as eng
from plutao.tokenizer import TOOL_TOKENS, CharTokenizer, grown


class Scripted:
    """Every row writes `script` (ids) — minus any banned id —, pausing wherever the engine's stop ids say;
    after the runtime's tokens it writes the rest of the script, then <|end|>."""

    context = 10 ** 6

    def __init__(self, n_slots, script, end_id):
        self.n_slots, self.script, self.end_id = n_slots, script, end_id
        self.rows = [None] * n_slots  # [script position, sampling, active]

    def stop_ids(self, s):
        return tuple(s.stop_ids)

    def _next(self, b):
        at, s, _ = self.rows[b]
        while at < len(self.script) and self.script[at] in s.banned_ids:
            at += 1
        t = self.script[at] if at < len(self.script) else self.end_id
        self.rows[b][0], self.rows[b][2] = at + 1, t not in s.stop_ids
        return t

    def fill(self, slot_ids, prompts, samplings):
        for b, s in zip(slot_ids, samplings):
            self.rows[b] = [0, s, True]
        out = [self._next(b) for b in slot_ids]
        return np.array(out), np.zeros(len(out)), np.array([self.rows[b][2] for b in slot_ids])

    def run(self, steps):
        tokens = np.zeros((self.n_slots, steps), int)
        valid = np.zeros((self.n_slots, steps), bool)
        for b in range(self.n_slots):
            for k in range(steps):
                if self.rows[b] is not None and self.rows[b][2]:
                    tokens[b, k], valid[b, k] = self._next(b), True
        return tokens, np.zeros(tokens.shape), valid, np.array([r is not None and r[2] for r in self.rows])

    def extend(self, slot_ids, forced):
        for b in slot_ids:
            self.rows[b][2] = True
        out = [self._next(b) for b in slot_ids]
        return np.array(out), np.zeros(len(out)), np.array([self.rows[b][2] for b in slot_ids])

    def release(self, slot_ids):
        for b in slot_ids:
            if self.rows[b] is not None:
                self.rows[b][2] = False


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = grown(CharTokenizer.train(["What is 4821+3379? 0123456789 calculator: so"]), TOOL_TOKENS)
    script = [tok.call_id, *tok.encode("calculator: 4821+3379"), tok.tool_id, *tok.encode("so 8200")]
    backend = Scripted(4, script, tok.end_id)
    s = Served("calc", tmp_path_factory.mktemp("calc"), "SFT", tok, 10 ** 6, True, False,
               model=types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=tok.vocab_size)), backend=backend)
    local = LocalServer(create_app({"calc": s}, eng.Engine({"calc": backend}, chunk=2)), ready_within=30)
    yield local.url
    local.stop()


ASK = {"model": "calc", "messages": [{"role": "user", "content": "What is 4821+3379?"}]}


def test_a_reply_that_called_the_calculator_shows_the_call_and_its_result(served):
    r = httpx.post(served + "/v1/chat/completions", json=ASK, timeout=30).json()
    message = r["choices"][0]["message"]
    assert message["content"] == "so 8200" and r["choices"][0]["finish_reason"] == "stop"
    call, result = message["tool_turns"]
    assert call["tool_calls"][0]["function"] == {"name": "calculator", "arguments": json.dumps({"expression": "4821+3379"})}
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "8200"}
    assert r["usage"]["completion_tokens"] == 1 + len("calculator: 4821+3379") + 1 + len("so 8200")


def test_streamed_the_tool_turn_arrives_before_the_text_and_the_text_is_the_whole_replys(served):
    events = []
    with httpx.stream("POST", served + "/v1/chat/completions", json=ASK | {"stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:])["choices"][0]["delta"])
    turns = [e["tool_turns"] for e in events if "tool_turns" in e]
    assert len(turns) == 1 and turns[0][1]["content"] == "8200"
    assert "".join(e.get("content") or "" for e in events) == "so 8200"
    first_text = next(i for i, e in enumerate(events) if e.get("content"))
    assert events.index(next(e for e in events if "tool_turns" in e)) < first_text


def test_tool_choice_none_answers_without_a_call(served):
    r = httpx.post(served + "/v1/chat/completions", json=ASK | {"tool_choice": "none"}, timeout=30).json()
    message = r["choices"][0]["message"]
    assert "tool_turns" not in message and "<|call|>" not in message["content"]
    assert message["content"].endswith("so 8200")  # (the script without its call token)
