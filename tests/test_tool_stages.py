"""Replies with tool turns inside the assistant stages: a ranked response may be the messages of a reply
that called a tool; the reward model reads it as the chat template renders it, DPO sums the assistant's
tokens only (never the tool's result), the labeler reads the final answer; a sampled completion with
a tool turn reads back as messages that render to its own tokens."""

import json

import numpy as np
import pytest

from plutao.model.sampling import Completion
from plutao.tokenizer import TOOL_TOKENS, CharTokenizer, grown
from plutao.tokenizer.chat import prompt_ids, render, reward_ids
from plutao.train.config.errors import UserError
from plutao.train.config.schema import Config, TrainConfig
from plutao.train.data.chat_batches import pair_rows
from plutao.train.data.conversations import Ranking, final_text, read_rankings, reply_turns
from plutao.train.rl.comparisons import reply_of
from plutao.train.tasks import TokenIds
from plutao.train.tasks.dpo import DPO, encode_pairs, pairs_of
from plutao.train.worlds import arith

PROMPT = [{"role": "user", "content": "What is 4821+3379?"}]
CALL = {"id": "call_0", "type": "function", "function": {"name": "calculator",
                                                        "arguments": json.dumps({"expression": "4821+3379"})}}
WITH_TOOL = [{"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_0", "content": "8200"},
             {"role": "assistant", "content": "8200"}]


@pytest.fixture(scope="module")
def tok():
    return grown(CharTokenizer.train(["What is 4821+3379? 0123456789 calculator: error"]), TOOL_TOKENS)


def _rankings(tmp_path, line):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(line) + "\n")
    return path


def test_a_ranked_response_may_be_the_messages_of_a_reply_that_called_a_tool(tmp_path):
    [r] = read_rankings(_rankings(tmp_path, {"prompt": PROMPT, "responses": [WITH_TOOL, "8100"]}))
    assert r.responses[0] == WITH_TOOL and reply_turns(r.responses[1]) == [{"role": "assistant", "content": "8100"}]
    assert [final_text(x) for x in r.responses] == ["8200", "8100"]  # (the labeler's reading: never the tool's)
    [pair] = read_rankings(_rankings(tmp_path, {"prompt": PROMPT, "chosen": WITH_TOOL, "rejected": "8100"}))
    assert pair.responses == [WITH_TOOL, "8100"]


@pytest.mark.parametrize("response, said", [
    (WITH_TOOL[:2], "ends with the assistant's final message"),
    ([{"role": "user", "content": "hi"}], "assistant and tool messages only"),
    (WITH_TOOL[:1] + WITH_TOOL[2:], "comes before the result of tool call"),
    (7, "each response must be text, or the list of assistant and tool messages"),
])
def test_a_malformed_response_with_tool_turns_is_a_one_line_error_naming_the_line(tmp_path, response, said):
    path = _rankings(tmp_path, {"prompt": PROMPT, "responses": [response, "8100"]})
    with pytest.raises(UserError, match=said) as e:
        read_rankings(path)
    assert f"{path}:1" in str(e.value) and "\n" not in str(e.value)


def test_dpo_scores_the_assistants_tokens_of_a_reply_with_a_tool_turn_never_the_result(tok):
    [pair] = pairs_of([Ranking(PROMPT, [WITH_TOOL, "8100"], [0, 1], {})])
    task = DPO(Config(train=TrainConfig(task="dpo")), TokenIds.of(tok))
    enc, width = encode_pairs([pair], tok, 64)
    batch = task.named(pair_rows(enc, width))
    full = render(PROMPT + WITH_TOOL, tok)
    start = len(prompt_ids(PROMPT, tok)) - 1  # (the first predicted reply token)
    n = len(full) - 1 - start
    want = full.weights[1:][start:]  # (what SFT would train on: the call, <|tool|>, the answer, <|end|>)
    np.testing.assert_array_equal(batch["pair_tokens"][0, 0, :len(full) - 1], full.ids[:-1])
    np.testing.assert_array_equal(batch["pair_weights"][0, 0, start:start + n], want)
    assert batch["pair_weights"][0, 0].sum() == want.sum() < n  # (the result "8200", <|end|>, <|assistant|>: holes)
    assert batch["pair_weights"][0, 1].sum() == len("8100") + 1  # (a text reply: every token and <|end|>)


def test_the_reward_model_reads_a_reply_with_a_tool_turn_as_the_template_renders_it(tok):
    ids = reward_ids(PROMPT + reply_turns(WITH_TOOL), tok)
    assert ids[:-1] == render(PROMPT + WITH_TOOL, tok).ids.tolist() and ids[-1] == tok.reward_id
    assert tok.decode([t for t in ids if not tok.is_special(t)]).count("8200") == 2  # (the result and the answer)


def test_a_sampled_reply_with_a_tool_turn_reads_back_as_messages_that_render_to_its_tokens(tok):
    head = prompt_ids(PROMPT, tok)
    reply = render(PROMPT + WITH_TOOL, tok).ids.tolist()[len(head):]  # (…, "8200", <|end|>)
    start = reply.index(tok.tool_id) + 1
    forced = tuple(range(start, start + len("8200") + 2))  # (the result, <|end|>, <|assistant|>)
    got, length, ended = reply_of(tok, Completion(reply, [0.0] * len(reply), [0.0] * len(reply), tok.end_id, forced))
    assert ended and length == len(reply) - 1 and got[-1]["content"] == "8200"
    assert render(PROMPT + got, tok).ids.tolist() == head[:-1] + [tok.assistant_id] + reply
    key = arith.gold_key(arith.Problem(4821, 3379, "+"), final_text(got), ended)
    assert key[0] is True  # (the labeler reads the final answer)
    text, _, _ = reply_of(tok, Completion(reply[:3], [0.0] * 3, [0.0] * 3, None))
    assert isinstance(text, str)  # (no call: the reply is its text, as before)


@pytest.mark.parametrize("piece", [1, 3, 100])
def test_a_streamed_reply_shows_what_the_finished_reply_shows_the_tools_tokens_marked(tok, piece):
    from plutao.tokenizer.chat import ReplyStream, reply_messages, shown_reply

    head = prompt_ids(PROMPT, tok)
    reply = render(PROMPT + WITH_TOOL, tok).ids.tolist()[len(head):]
    start = reply.index(tok.tool_id) + 1
    forced = set(range(start, start + len("8200") + 2))
    stream, text, at = ReplyStream(tok), "", 0
    while at < len(reply):  # (in pieces as the agent loop hands them over: a forced run never mixed with the model's)
        end = min(at + piece, len(reply))
        end = next((j for j in range(at + 1, end) if (j in forced) != (at in forced)), end)
        text += stream.feed(reply[at:end], at in forced)
        at = end
    assert text == shown_reply(reply_messages(tok, reply, sorted(forced))) == "[calculator: 4821+3379 → 8200] 8200"
