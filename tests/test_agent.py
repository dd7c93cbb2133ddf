"""Tool calls inside sampling: `extend` (model/agent.py) appends tokens a row did not choose to its live
slot — its next tokens and log-probs equal a reference that prefills the whole prefix, its random
stream goes on (never restarts), the other rows are untouched — and the agent loop answers every
call exactly once, never crashing on a bad one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plutao.model.agent import complete_with_tools, extend
from plutao.model.config import ModelConfig
from plutao.model.decode import SlotDecoder, complete
from plutao.model.gpt import GPT
from plutao.model.heads import forward_logits
from plutao.model.sampling import SamplingConfig, sample_rows

CONTEXT = 32
EOT, PAD = 1, 0
FORCED = [21, 22, 23, 24, 25]


@pytest.fixture(scope="module")
def gpt():
    return GPT(ModelConfig(vocab_size=40, context_length=CONTEXT, n_layers=2, d_model=32, n_heads=2), nnx.Rngs(0))


def greedy(n, stops=()):
    return SamplingConfig(temperature=0.0, max_new_tokens=n, stop_at_eot=False, stop_ids=tuple(stops))


def first_token(model, prompt, sampling):
    return complete(model, [prompt], sampling, eot_id=EOT, pad_id=PAD)[0].tokens[0]


def run_out(decoder, slots):
    """Every token the slots emit until they stop, per row."""
    rows = [[] for _ in range(slots.active_B.shape[0])]
    while bool(np.asarray(slots.active_B).any()):
        slots, out = decoder.run(slots)
        for b, (t, v) in enumerate(zip(np.asarray(out.tokens), np.asarray(out.valid))):
            rows[b] += t[v].tolist()
    return slots, rows


@pytest.mark.parametrize("prompt", [[3, 4, 5], list(range(2, 26))], ids=["fits", "overflows"])
def test_a_continued_greedy_row_equals_a_prefill_of_its_whole_prefix(gpt, prompt):
    g = first_token(gpt, prompt, greedy(1))
    decoder = SlotDecoder.of(gpt, eot_id=EOT, pad_id=PAD)
    slots, first = decoder.start([prompt], [greedy(12, stops=(g,))])  # (stops on its first token: a pause)
    assert int(np.asarray(first.tokens)[0]) == g and not bool(np.asarray(slots.active_B)[0])
    slots, e = extend(decoder, slots, [0], [FORCED])
    slots, rest = run_out(decoder, slots)
    after = [int(e.tokens[0])] + rest[0]
    prefix = prompt + [g] + FORCED
    if len(prefix) > CONTEXT:  # (the row restarted its cache from its last context // 2 tokens)
        prefix = prefix[-(CONTEXT // 2):]
    want = complete(gpt, [prefix], greedy(11, stops=(g,)), eot_id=EOT, pad_id=PAD)[0]
    assert after == want.tokens
    np.testing.assert_allclose([float(e.model_logprobs[0])], want.model_logprobs[:1], atol=1e-5)


def test_the_random_stream_goes_on_after_the_forced_tokens(gpt):
    prompt, seed = [5, 6, 7], 11
    hot = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=seed, stop_at_eot=False)
    t0 = first_token(gpt, prompt, hot)
    decoder = SlotDecoder.of(gpt, eot_id=EOT, pad_id=PAD)
    slots, _ = decoder.start([prompt], [SamplingConfig(temperature=1.0, max_new_tokens=8, seed=seed,
                                                       stop_at_eot=False, stop_ids=(t0,))])
    slots, e = extend(decoder, slots, [0], [FORCED])
    logits = forward_logits(gpt, jnp.asarray([prompt + [t0] + FORCED], jnp.int32))[0][:, -1]
    u = jax.random.uniform(jax.random.fold_in(jax.random.key(seed), 1), ())  # (draw 1, not draw 0 again)
    token, sampler_lp, model_lp = sample_rows(logits, u[None], jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.ones(1),
                                              jnp.zeros((1, logits.shape[-1]), bool))
    assert int(e.tokens[0]) == int(token[0])
    np.testing.assert_allclose([float(e.model_logprobs[0]), float(e.sampler_logprobs[0])],
                               [float(model_lp[0]), float(sampler_lp[0])], atol=1e-5)
    assert int(np.asarray(slots.produced_B)[0]) == 2  # (the forced tokens took no draw and no budget)


def test_the_other_rows_keep_decoding_as_if_alone(gpt):
    prompts = [[3, 4, 5], [9, 8], [2, 2, 2, 2]]
    samplings = [greedy(10), SamplingConfig(temperature=0.9, max_new_tokens=10, seed=4, stop_at_eot=False),
                 SamplingConfig(temperature=1.0, top_k=5, max_new_tokens=6, seed=2, stop_at_eot=False)]
    solo = [complete(gpt, [p], s, eot_id=EOT, pad_id=PAD)[0].tokens for p, s in zip(prompts, samplings)]
    g = solo[0][0]
    decoder = SlotDecoder.of(gpt, eot_id=EOT, pad_id=PAD)
    slots, first = decoder.start(prompts, [greedy(10, stops=(g,))] + samplings[1:])
    slots, _ = extend(decoder, slots, [0], [FORCED])
    slots, rest = run_out(decoder, slots)
    for b in (1, 2):
        assert [int(np.asarray(first.tokens)[b])] + rest[b] == solo[b]


def test_the_agent_loop_answers_each_pause_once_and_marks_what_it_wrote(gpt):
    prompt = [3, 4, 5]
    pause = first_token(gpt, prompt, greedy(1))  # (a pause the random model is sure to emit)
    asked = []

    def answer(row, reply, calls):
        asked.append((row, list(reply), calls))
        return FORCED[:2] if calls < 2 else [26]

    out = complete_with_tools(gpt, [prompt, [9, 9]], [greedy(6), greedy(4)], eot_id=EOT, pad_id=PAD,
                              pause_id=pause, answer=answer)
    mine = out[0]
    pauses = [i for i, t in enumerate(mine.tokens) if t == pause and i not in mine.forced]
    assert len(asked) == len(pauses) >= 1 and [a[2] for a in asked] == list(range(len(asked)))
    assert all(r == 0 for r, _, _ in asked)  # (row 1 never emits the pause)
    own = [t for i, t in enumerate(mine.tokens) if i not in mine.forced]
    assert len(own) == 6 and mine.stop_token is None  # (the budget counts the model's own tokens only)
    for i in mine.forced:
        assert mine.sampler_logprobs[i] == 0.0 and mine.model_logprobs[i] == 0.0
    # Each answer sits right after its pause, exactly once.
    for (row, reply, calls), p in zip(asked, pauses):
        want = FORCED[:2] if calls < 2 else [26]
        assert mine.tokens[p + 1:p + 1 + len(want)] == want and reply == mine.tokens[:p + 1]


def test_tool_answers_from_a_real_tokenizer_never_raise():
    from plutao.tokenizer import TOOL_TOKENS, CharTokenizer, grown
    from plutao.tokenizer.chat import call_text, tool_answerer
    from plutao.tools import TOOLS

    tok = grown(CharTokenizer.train(["calculator: 0123456789+-*/ error: abcdefghijklmnopqrstuvwxyz'.;,"]), TOOL_TOKENS)
    answer = tool_answerer(tok, TOOLS, max_calls=2, max_result_tokens=30)

    def reply(text):
        return [tok.call_id, *tok.encode(text), tok.tool_id]

    def said(ids):
        assert ids[-2:] == [tok.end_id, tok.assistant_id]
        return tok.decode(ids[:-2])

    assert call_text(tok, tok.encode("12") + reply("calculator: 2+3")) == "calculator: 2+3"
    assert said(answer(0, reply("calculator: 2+3"), 0)) == "5"
    assert said(answer(0, reply("calculator: 1/0"), 0)) == "error: division by zero"
    assert said(answer(0, reply("abacus: 1"), 1)) == "error: unknown tool 'abacus'; "  # (cut to 30 tokens)
    assert said(answer(0, reply("calculator: 2+3"), 2)).startswith("error: at most 2 tool calls")
    assert said(answer(0, [tok.tool_id], 0)).startswith("error: no call to answer")


def test_a_reply_with_tool_turns_reads_back_as_openai_messages_that_render_to_its_tokens():
    from plutao.tokenizer import TOOL_TOKENS, CharTokenizer, grown
    from plutao.tokenizer.chat import prompt_ids, render, reply_messages, shown_reply, tool_turn_ids

    tok = grown(CharTokenizer.train(["calculator: 0123456789+- What is?"]), TOOL_TOKENS)
    prompt = [{"role": "user", "content": "What is 302+813?"}]
    reply, forced = [], []
    for call, result in (("calculator: 302+813", "1115"), ("calculator: 1115-15", "1100")):
        reply += [tok.call_id, *tok.encode(call), tok.tool_id]
        turn = tool_turn_ids(tok, result)
        forced += range(len(reply), len(reply) + len(turn))
        reply += turn
    reply += [*tok.encode("1100"), tok.end_id]
    messages = reply_messages(tok, reply, forced)
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[0]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": '{"expression": "302+813"}'}
    assert messages[3]["content"] == "1100" and messages[4] == {"role": "assistant", "content": "1100"}
    assert render(prompt + messages, tok).ids.tolist() == prompt_ids(prompt, tok) + reply
    assert shown_reply(messages) == "[calculator: 302+813 → 1115] [calculator: 1115-15 → 1100] 1100"


def test_a_row_that_keeps_calling_is_answered_max_calls_plus_one_times_then_ends(gpt):
    prompt = [3, 4, 5]
    pause = first_token(gpt, prompt, greedy(1))
    asked = []
    out = complete_with_tools(gpt, [prompt], greedy(30), eot_id=EOT, pad_id=PAD, pause_id=pause, max_calls=2,
                              answer=lambda row, reply, calls: asked.append(calls) or [pause])  # (it pauses again)
    assert asked == [0, 1, 2]  # (two calls, one refusal; the next pause ends the reply)
    assert out[0].tokens[-1] == pause and out[0].stop_token is None and len(out[0].forced) == 3


def test_a_malformed_or_cut_off_call_reads_back_without_an_error():
    from plutao.tokenizer import TOOL_TOKENS, CharTokenizer, grown
    from plutao.tokenizer.chat import (
        call_text,
        prompt_ids,
        render,
        reply_messages,
        shown_reply,
        tool_turn_ids,
    )

    tok = grown(CharTokenizer.train(["calculator: 0123456789+- What is? error"]), TOOL_TOKENS)
    prompt = [{"role": "user", "content": "What is 3+4?"}]
    reply = [tok.call_id, *tok.encode("3+4"), tok.tool_id]  # (no NAME: before the expression)
    turn = tool_turn_ids(tok, "error")
    forced = list(range(len(reply), len(reply) + len(turn)))
    reply += turn + [*tok.encode("7"), tok.end_id]
    messages = reply_messages(tok, reply, forced)
    assert messages[0]["tool_calls"][0]["function"]["name"] == "" and shown_reply(messages) == "[3+4 → error] 7"
    assert render(prompt + messages, tok).ids.tolist() == prompt_ids(prompt, tok) + reply
    cut = [*tok.encode("1"), tok.call_id, *tok.encode("calculator: 3")]  # (the budget ran out inside the call)
    assert reply_messages(tok, cut, []) == [{"role": "assistant", "content": "1<|call|>calculator: 3"}]
    # A bare <|tool|> after an answered call is no call at all (the old one is not read again).
    assert call_text(tok, reply[:-1] + [tok.tool_id]) is None


def test_extending_a_recurrent_models_slot_is_refused():
    from plutao.model.baselines.rnn import RecurrentLM
    from plutao.model.sampling import SamplingError

    rnn = RecurrentLM(ModelConfig(family="gru", vocab_size=40, context_length=CONTEXT, n_layers=1, d_model=16,
                                  n_heads=1), nnx.Rngs(0))
    decoder = SlotDecoder.of(rnn, eot_id=EOT, pad_id=PAD)
    slots, _ = decoder.start([[3, 4]], [greedy(1)])
    with pytest.raises(SamplingError, match="needs a Transformer decoder"):
        extend(decoder, slots, [0], [FORCED])
