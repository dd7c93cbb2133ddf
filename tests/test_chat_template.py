"""The chat template: golden masks, one rendering for training and sampling, what is supervised."""

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
