"""The chat template: golden masks, one rendering for training and sampling, what is supervised."""

import json

import numpy as np
import pytest

from plutao.tokenizer import CharTokenizer
from plutao.tokenizer.chat import ChatError, marked, prompt_ids, render, reward_ids
from plutao.train.data.chat_batches import PackedChats

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "and 4+4?"},
    {"role": "assistant", "content": "8"},
]


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(["Be brief. 2+3? and 4+4? 5 8 0123456789"])


def test_golden_masks_for_system_and_two_turns(tok):
    # Trained tokens in brackets: each assistant reply and the <|end|> closing it, nothing else.
    assert marked(tok, render(CONVERSATION, tok), colour=False) == (
        "<|endoftext|><|system|>Be brief.<|end|><|user|>2+3?<|end|><|assistant|>[5][<|end|>]"
        "<|user|>and 4+4?<|end|><|assistant|>[8][<|end|>]")


def test_training_and_sampling_tokenize_alike(tok):
    whole = render(CONVERSATION, tok)
    # The prompt a model replies to is the training sequence up to the reply, then <|assistant|>.
    prompt = prompt_ids(CONVERSATION[:4], tok)
    assert whole.ids[:len(prompt)].tolist() == prompt
    assert prompt[-1] == tok.assistant_id
    # The SFT batch of that conversation holds exactly those ids, and trains exactly those weights.
    rows = PackedChats([whole], [whole], 64, 1, 0, tok.pad_id)
    batch_row = rows.train_rows(0)[0]
    n = len(whole)
    assert batch_row[0, :n].tolist() == whole.ids.tolist() and batch_row[1, :n].tolist() == whole.weights.tolist()
    # The reward model's input is the same tokens, then <|reward|>.
    assert reward_ids(CONVERSATION, tok) == whole.ids.tolist() + [tok.reward_id]


def test_end_is_supervised_and_padding_never(tok):
    r = render(CONVERSATION, tok)
    ends = np.flatnonzero(r.ids == tok.end_id)
    assistant_ends = [i for i in ends if r.ids[i - 2] == tok.assistant_id]
    assert all(r.weights[i] == 1 for i in assistant_ends) and len(assistant_ends) == 2
    assert tok.pad_id not in (tok.end_id, tok.eot_id)
    rows = PackedChats([r, r], [r], 64, 2, 0, tok.pad_id).train_rows(0)
    assert not np.any((rows[:, 0] == tok.pad_id) & (rows[:, 1] == 1))
    supervised = rows[:, 0][rows[:, 1] == 1]
    assert tok.pad_id not in supervised and tok.end_id in supervised


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
    ([{"role": "user", "content": 3}], "non-text content"),
])
def test_bad_conversations_are_one_line_errors(tok, messages, message):
    with pytest.raises(ChatError, match=message):
        render(messages, tok)


def test_prompt_must_end_with_a_user_turn(tok):
    with pytest.raises(ChatError, match="ends with an assistant turn"):
        prompt_ids(CONVERSATION, tok)


def test_the_reward_model_sees_whether_a_reply_ended(tok):
    ended = reward_ids(CONVERSATION, tok)
    cut = reward_ids(CONVERSATION, tok, ended=False)
    assert ended[-2:] == [tok.end_id, tok.reward_id]
    assert cut == ended[:-2] + [tok.reward_id]


def test_a_long_prompt_is_fitted_by_whole_turns_then_the_last_message(tok):
    from plutao.tokenizer.chat import fitted_prompt_ids

    prompt = CONVERSATION[:4]
    full = prompt_ids(prompt, tok)
    assert fitted_prompt_ids(prompt, tok, len(full)) == (full, 0, 0)
    # Too long by a little: the oldest turns after the system message go, the layout stays whole.
    ids, dropped, cut = fitted_prompt_ids(prompt, tok, len(full) - 3)
    assert dropped >= 1 and cut == 0 and ids[0] == tok.eot_id and ids[1] == tok.system_id
    assert ids[-1] == tok.assistant_id and ids == prompt_ids([CONVERSATION[0]] + CONVERSATION[1 + dropped:4], tok)
    # Too long for even the last message: the system message goes, then its text loses its first
    # tokens; the layout's tokens stay.
    ids, _, cut = fitted_prompt_ids(prompt, tok, 8)
    assert len(ids) == 8 and cut > 0 and ids[:2] == [tok.eot_id, tok.user_id]
    assert ids[-2:] == [tok.end_id, tok.assistant_id]


# --- tool use -----------------------------------------------------------------------------------------

def _call(i, expression):
    return {"id": f"c{i}", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}


TOOL_CONVERSATION = [
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [_call(0, "2+3"), _call(1, "4+4")]},
    {"role": "tool", "tool_call_id": "c0", "content": "5"},
    {"role": "tool", "tool_call_id": "c1", "content": "8"},
    {"role": "assistant", "content": "5"},
]


@pytest.fixture(scope="module")
def tool_tok():
    from plutao.tokenizer import TOOL_TOKENS, grown

    return grown(CharTokenizer.train(["Be brief. 2+3? and 4+4? 5 8 0123456789 calculator:"]), TOOL_TOKENS)


def test_golden_masks_with_tool_calls_the_result_is_never_a_target(tool_tok):
    # The call and the <|tool|> closing it are the assistant's; each result, its <|end|> and the
    # <|assistant|> the runtime writes after it are not.
    assert marked(tool_tok, render(TOOL_CONVERSATION, tool_tok), colour=False) == (
        "<|endoftext|><|user|>2+3?<|end|><|assistant|>[<|call|>][c][a][l][c][u][l][a][t][o][r][:][ ][2][+][3]"
        "[<|tool|>]5<|end|><|assistant|>[<|call|>][c][a][l][c][u][l][a][t][o][r][:][ ][4][+][4][<|tool|>]8<|end|>"
        "<|assistant|>[5][<|end|>]")
    # A prompt that ends with a result is continued by the model after <|assistant|>, as at sampling.
    one_call = [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], "tool_calls": [_call(0, "2+3")]}, TOOL_CONVERSATION[2]]
    assert prompt_ids(one_call, tool_tok) == render(one_call, tool_tok).ids.tolist() + [tool_tok.assistant_id]


def test_the_runtime_targets_are_the_unsupervised_tokens_of_a_reply_with_tool_turns(tok, tool_tok):
    from plutao.tokenizer.chat import runtime_targets, tool_turn_marks

    # What a DPO pair or a rollout reads from tokens alone equals what the template supervises.
    history = [{"role": "user", "content": "4+4?"}, {**TOOL_CONVERSATION[1], "tool_calls": [_call(2, "4+4")]},
               {"role": "tool", "tool_call_id": "c2", "content": "8"}, {"role": "assistant", "content": "8"}]
    for messages in (TOOL_CONVERSATION, history + TOOL_CONVERSATION):
        r = render(messages, tool_tok)
        reply = len(prompt_ids(messages[:len(messages) - 4], tool_tok)) - 1  # (the last reply's first target)
        hole = runtime_targets(r.ids[1:], tool_turn_marks(tool_tok))
        assert (hole[reply:] == (r.weights[1:][reply:] == 0)).all()
        assert hole[reply:].sum() == 6  # (two results: "5" <|end|> <|assistant|> and "8" <|end|> <|assistant|>)
    assert tool_turn_marks(tok) == () and not runtime_targets(render(CONVERSATION, tok).ids, ()).any()


def test_a_tokenizer_without_tool_tokens_keeps_its_template_and_refuses_tool_turns(tok, tool_tok):
    from plutao.tokenizer.chat import template_hash

    # The hash a run recorded before tools existed (an old run keeps loading), and a new one with them.
    assert template_hash(tok) == "b201478371d350c0" and template_hash(tool_tok) != template_hash(tok)
    from plutao.tokenizer import TOOL_TOKENS, grown

    assert render(CONVERSATION, tok).ids.tolist() == render(CONVERSATION, grown(tok, TOOL_TOKENS)).ids.tolist()
    with pytest.raises(ChatError, match="no <\\|call\\|> and <\\|tool\\|> tokens"):
        render(TOOL_CONVERSATION, tok)


@pytest.mark.parametrize("messages, said", [
    ([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "c0", "content": "5"}], "answers no assistant"),
    (TOOL_CONVERSATION[:3] + TOOL_CONVERSATION[4:], "before the result of tool call 'c1'"),
    (TOOL_CONVERSATION[:2] + TOOL_CONVERSATION[3:], "answers tool call 'c1', but 'c0'"),
    (TOOL_CONVERSATION[:3], "tool call 'c1' has no \"tool\" message"),
    ([TOOL_CONVERSATION[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "c0", "function": {}}]}],
     "must be {\"id\""),
    ([TOOL_CONVERSATION[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c0", "type": "function", "function": {"name": "calculator", "arguments": '{"a": "1", "b": "2"}'}}]}],
     "one string value"),
    ([{"role": "user", "content": "x", "tool_calls": [_call(0, "1")]}], "only an assistant message"),
])
def test_malformed_tool_turns_are_one_line_chat_errors(tool_tok, messages, said):
    with pytest.raises(ChatError) as e:
        render(messages, tool_tok)
    assert said in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["char", "byte", "word", "bpe"])
def test_growing_a_vocabulary_keeps_every_id_and_adds_the_tool_tokens_after_it(kind):
    from plutao.tokenizer import TOOL_TOKENS, grown, train_tokenizer

    text = "the cat sat on the mat, 347+589=936 and <|call|> stays text\n" * 40
    old = train_tokenizer(kind, [text], **({"vocab_size": 300} if kind == "bpe" else {}))
    new = grown(old, TOOL_TOKENS)
    assert (new.call_id, new.tool_id, new.vocab_size) == (old.vocab_size, old.vocab_size + 1, old.vocab_size + 2)
    assert new.encode_unseen(text).tolist() == old.encode_unseen(text).tolist()  # (text never becomes a call)
    assert new.specials == old.specials | {"<|call|>": old.vocab_size, "<|tool|>": old.vocab_size + 1}
    assert new.token_strings([new.call_id, new.tool_id]) == ["<|call|>", "<|tool|>"] and new.has_tools
    assert not old.has_tools
    assert grown(new, TOOL_TOKENS) is new and new.fingerprint != old.fingerprint
