"""`plutao chat` (piped stdin: one message per line, one reply line per run) and `plutao tokenize --chat`
(which tokens of a conversation are trained), on the tiny base → SFT → reward-model runs of conftest."""

import io
import json
import re
import sys

import pytest

from plutao.experiments.cli import main
from plutao.tokenizer import ByteTokenizer, load_tokenizer
from plutao.tokenizer.chat import render

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 plus 3?"},
                  {"role": "assistant", "content": "the answer is 6."}]},
    {"prompt": "What is 1 plus 1?", "response": "2"},
]


@pytest.fixture(scope="module")
def runs(tiny_stages):
    return tiny_stages


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "chats.jsonl"
    lines = [json.dumps(c) for c in CONVERSATIONS]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n")  # (a blank line is skipped, not counted)
    return path


def one_line_error(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def chat(capsys, monkeypatch, args, stdin: str):
    """(exit code, reply lines, stderr lines) of `plutao chat ARGS` reading `stdin`."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(["chat", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


# --- plutao tokenize --chat ------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["byte", "run"])
def test_tokenize_chat_brackets_exactly_the_trained_tokens(jsonl, runs, capsys, which):
    spec = "byte" if which == "byte" else str(runs["sft"])
    tok = ByteTokenizer() if which == "byte" else load_tokenizer(runs["sft"] / "tokenizer")
    assert main(["tokenize", "--chat", str(jsonl), "--index", "0", "--tokenizer", spec]) == 0
    marked, summary = capsys.readouterr().out.rstrip("\n").split("\n")

    messages = CONVERSATIONS[0]["messages"]
    rendered = render(messages, tok)
    strings = tok.token_strings(rendered.ids)
    expected = "".join(f"[{s}]" if w else s for s, w in zip(strings, rendered.weights))
    assert marked == expected
    # The bracketed tokens are the assistant replies, each closed by <|end|>; nothing else is.
    bracketed = re.findall(r"\[([^\]]*)\]", marked)
    assert len(bracketed) == int(rendered.weights.sum())
    assert "".join(bracketed) == "4<|end|>the answer is 6.<|end|>"
    assert "[" not in re.sub(r"\[[^\]]*\]", "", marked)
    assert f"{len(rendered)} tokens, {int(rendered.weights.sum())} trained" in summary


def test_tokenize_chat_index_counts_non_empty_lines(jsonl, capsys):
    assert main(["tokenize", "--chat", str(jsonl), "--index", "1"]) == 0
    marked = capsys.readouterr().out.splitlines()[0]
    assert marked == "<|endoftext|><|user|>What is 1 plus 1?<|end|><|assistant|>[2][<|end|>]"


@pytest.mark.parametrize("index", ["2", "-1"])
def test_tokenize_chat_index_out_of_range(jsonl, capsys, index):
    assert main(["tokenize", "--chat", str(jsonl), "--index", index]) == 2
    line = one_line_error(capsys)
    assert "out of range" in line and "2 conversation(s)" in line


def test_tokenize_chat_malformed_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[1]) + "\n{not json\n")
    assert main(["tokenize", "--chat", str(path)]) == 2
    assert f"{path}:2:" in one_line_error(capsys)
    path.write_text(json.dumps(CONVERSATIONS[1]) + "\n\n" + json.dumps({"messages": [{"role": "user",
                                                                                    "content": "hi"}]}) + "\n")
    assert main(["tokenize", "--chat", str(path)]) == 2
    line = one_line_error(capsys)
    assert f"{path}:3:" in line and "assistant" in line


# --- plutao chat -----------------------------------------------------------------------------------

def replies(lines, label="sft"):
    return [line[len(label) + 2:] for line in lines if line.startswith(f"{label}> ")]


def test_chat_answers_each_line_and_replays_with_the_same_seed(runs, capsys, monkeypatch):
    args = [runs["sft"], "--max-new-tokens", "8", "--temperature", "1", "--seed", "3"]
    stdin = "What is 1 plus 1?\n\n   \nWhat is 2 plus 2?\nWhat is 3 plus 3?\n"
    rc, out, err = chat(capsys, monkeypatch, args, stdin)
    assert rc == 0  # (end of input)
    assert len(out) == 6 and len(replies(out)) == 3  # blank lines are not messages
    # Piped input is written back before each reply, so the transcript shows both sides.
    assert out[::2] == ["you> What is 1 plus 1?", "you> What is 2 plus 2?", "you> What is 3 plus 3?"]
    assert all(line.startswith("sft> ") for line in out[1::2])
    assert not any("not trained on the chat template" in e for e in err)
    assert chat(capsys, monkeypatch, args, stdin)[1] == out
    other = chat(capsys, monkeypatch, args[:-1] + ["4"], stdin)[1]
    assert len(replies(other)) == 3 and other != out


def test_chat_temp_command_sets_the_temperature(runs, capsys, monkeypatch):
    message = "What is 2 plus 2?\n"
    _, greedy, _ = chat(capsys, monkeypatch, [runs["sft"], "--max-new-tokens", "8", "--temperature", "0",
                                              "--seed", "99"], message)
    rc, out, err = chat(capsys, monkeypatch, [runs["sft"], "--max-new-tokens", "8", "--temperature", "2",
                                              "--seed", "1"], "/temp 0\n/temp -1\n/temp hot\n" + message)
    assert rc == 0
    # greedy at any seed: /temp 0 took effect, and the bad values did not replace it
    assert replies(out) == replies(greedy) and len(replies(out)) == 1
    assert out[:3] == ["you> /temp 0", "you> /temp -1", "you> /temp hot"]  # (commands are echoed too)
    assert sum("/temp needs a number ≥ 0" in e for e in err) == 2
    assert any("temperature 0" in e for e in err)


def test_chat_reset_quit_and_unknown_commands(runs, capsys, monkeypatch):
    args = [runs["sft"], "--max-new-tokens", "6", "--system", "Be short."]  # (characters the run's tokenizer has)
    stdin = "What is 1 plus 1?\nWhat is 5 plus 2?\n/reset\nWhat is 1 plus 1?\nWhat is 5 plus 2?\n"
    rc, out, err = chat(capsys, monkeypatch, args, stdin)
    assert rc == 0 and len(replies(out)) == 4
    assert out[5:] == out[:4]  # a fresh conversation (system kept) replays the same replies
    assert out[4] == "you> /reset"
    assert any("history cleared" in e for e in err)

    rc, out, err = chat(capsys, monkeypatch, args, "What is 1 plus 1?\n/frobnicate\n/quit\nWhat is 5 plus 2?\n")
    assert rc == 0
    assert len(replies(out)) == 1 and out[-1] == "you> /quit"  # nothing after /quit is read
    hint = [e for e in err if "unknown command /frobnicate" in e]
    assert len(hint) == 1 and "/reset" in hint[0] and "/quit" in hint[0]


def test_chat_truncates_history_to_fit_the_context(runs, capsys, monkeypatch):
    # The tiny runs have a context of 32 tokens (char tokenizer); greedy replies run to their 4 tokens, so 4
    # stay kept for each reply and 28 are left for a prompt.
    args = [runs["sft"], "--max-new-tokens", "4", "--temperature", "0"]
    stdin = "What is 12 plus 30?\nWhat is 45 plus 17?\n" + "What is 1 plus 2 plus 3 plus 4 plus 5?\n"
    rc, out, err = chat(capsys, monkeypatch, args, stdin)
    assert rc == 0 and len(replies(out)) == 3  # every message answered
    assert all(len(r) == 4 for r in replies(out))
    assert sum("history truncated: dropped the oldest 1 turn(s)" in e for e in err) == 2
    cut = [e for e in err if "message cut" in e]
    assert len(cut) == 1 and "last 24 of 38 tokens" in cut[0]


def fake_side(max_new_tokens: int, context: int = 32):
    from types import SimpleNamespace

    from plutao.experiments.commands.chat import Side

    run = SimpleNamespace(tokenizer=ByteTokenizer(), cfg=SimpleNamespace(model=SimpleNamespace(context_length=context)))
    return Side("m", run, None, max_new_tokens=max_new_tokens)


def test_chat_keeps_for_the_reply_what_replies_have_needed(capsys):
    """Two short turns fit a context of 32 beside a short reply: reserving half the context for every reply
    (16 tokens) would drop the first turn. Before the first reply (and after /reset) --max-new-tokens is
    kept, at most half the context; a long reply raises the reserve, never past that."""
    from plutao.experiments.commands.chat import _fit, _reserve
    from plutao.tokenizer.chat import prompt_ids

    side = fake_side(max_new_tokens=20)
    assert _reserve(side) == 16  # (no reply yet: min(--max-new-tokens, half the context))
    side.history = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                    {"role": "user", "content": "2+2?"}]
    want = prompt_ids(side.history, side.tokenizer)
    assert 16 < len(want) <= 32 - 2  # (too long beside 16 kept tokens; fits beside the 2 the reply took)
    side.longest_reply = 2  # "2" and its <|end|>
    assert _fit(side, [], "") == want and len(side.history) == 3
    assert capsys.readouterr().err == ""
    side.longest_reply = 30  # a long reply: the reserve stops at half the context, and the oldest turn goes
    assert _reserve(side) == 16
    assert _fit(side, [], "") == prompt_ids(side.history, side.tokenizer) and len(side.history) == 1
    assert "dropped the oldest 1 turn(s)" in capsys.readouterr().err
    assert _reserve(fake_side(max_new_tokens=4)) == 4


def test_chat_reserve_comes_from_the_replies_of_the_session(runs, capsys, monkeypatch):
    """Short replies (sampled, ending early) leave the history of short messages in place; /reset forgets
    how long the replies were."""
    from plutao.experiments.commands import chat as chat_command

    reserves = []
    fit = chat_command._fit
    monkeypatch.setattr(chat_command, "_fit", lambda side, *a: reserves.append(chat_command._reserve(side))
                        or fit(side, *a))
    rc, out, _ = chat(capsys, monkeypatch, [runs["sft"], "--max-new-tokens", "12", "--temperature", "1"],
                        "1+1?\n2+2?\n/reset\n3+3?\n")
    assert rc == 0 and len(replies(out)) == 3
    assert reserves[0] == 12 and reserves[2] == 12  # (the first reply of a conversation: --max-new-tokens)
    first = len(load_tokenizer(runs["sft"] / "tokenizer").encode(replies(out)[0].replace("\\n", "\n")))
    assert reserves[1] == min(first + 1, 12)  # (the first reply's tokens and its <|end|>)


def test_chat_compare_answers_with_every_run(runs, capsys, monkeypatch):
    args = [runs["sft"], "--max-new-tokens", "6", "--temperature", "1"]
    stdin = "What is 1 plus 1?\nWhat is 5 plus 2?\n"
    _, alone, _ = chat(capsys, monkeypatch, args, stdin)
    rc, out, err = chat(capsys, monkeypatch, args + ["--compare", runs["base"]], stdin)
    assert rc == 0
    assert [line.split("> ")[0] for line in out] == ["you", "sft", "base", "you", "sft", "base"]
    assert replies(out, "sft") == replies(alone, "sft")  # each run keeps its own history
    notices = [e for e in err if "not trained on the chat template" in e]
    assert len(notices) == 1 and str(runs["base"]) in notices[0]


def test_chat_refuses_a_reward_model_before_loading_it(runs, capsys, monkeypatch):
    rm = runs["rm"]
    before = sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in rm.rglob("*"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 1 plus 1?\n"))
    assert main(["chat", str(rm)]) == 2
    line = one_line_error(capsys)
    assert "reward model" in line and "cannot chat" in line and "plutao score" in line
    assert sorted((p, p.stat().st_size, p.stat().st_mtime_ns) for p in rm.rglob("*")) == before
    # Also as a compared run: refused before the main run is loaded.
    assert main(["chat", str(runs["sft"]), "--compare", str(rm)]) == 2
    assert "reward model" in one_line_error(capsys)


def test_chat_refuses_max_new_tokens_that_fill_the_context(runs, capsys, monkeypatch):
    before = sorted(p.stat().st_mtime_ns for p in runs["sft"].rglob("*"))
    for extra in ([], ["--compare", runs["base"]]):
        assert main(["chat", str(runs["sft"]), "--max-new-tokens", "32", *map(str, extra)]) == 2
        line = one_line_error(capsys)
        assert "--max-new-tokens 32 is not below the context" in line and "32 tokens" in line
    assert sorted(p.stat().st_mtime_ns for p in runs["sft"].rglob("*")) == before
    # Without --max-new-tokens the default fits each run's context (half of it, here).
    rc, out, _ = chat(capsys, monkeypatch, [runs["sft"], "--temperature", "0"], "What is 1 plus 1?\n")
    assert rc == 0 and len(replies(out)) == 1 and len(replies(out)[0]) <= 16


def test_chat_refuses_characters_the_tokenizer_cannot_write_and_goes_on(runs, capsys, monkeypatch):
    assert main(["sample", str(runs["sft"]), "--prompt", "hi ☃"]) == 2
    refusal = one_line_error(capsys)  # (what `plutao sample` says)
    assert "'☃'" in refusal
    rc, out, err = chat(capsys, monkeypatch, [runs["sft"], "--max-new-tokens", "4"], "hi ☃\nWhat is 1 plus 1?\n")
    assert rc == 0
    assert err.count(refusal) == 1 and len(replies(out)) == 1  # the chat went on with the next line
    assert out[:2] == ["you> hi ☃", "you> What is 1 plus 1?"]
    assert main(["chat", str(runs["sft"]), "--system", "be ☃", "--max-new-tokens", "4"]) == 2
    assert "'☃'" in one_line_error(capsys)


def test_chat_never_samples_special_tokens_that_are_not_text(runs, capsys, monkeypatch):
    """At a temperature that makes every token about as likely, the replies hold no <pad>, <bos>, ...; the
    tokens that end a reply (<|end|>, <|endoftext|>, the turn tokens) stay possible."""
    from plutao.model import decode

    tok = load_tokenizer(runs["sft"] / "tokenizer")
    sampled, configs = [], []
    real = decode.stream

    def recording(model, prompt, sampling, **kwargs):
        configs.append(sampling)
        for token in real(model, prompt, sampling, **kwargs):
            sampled.append(token)
            yield token

    monkeypatch.setattr(decode, "stream", recording)
    rc, out, _ = chat(capsys, monkeypatch, [runs["sft"], "--max-new-tokens", "16", "--temperature", "100"],
                      "".join(f"What is {i} plus {i}?\n" for i in range(20)))
    assert rc == 0 and len(replies(out)) == 20
    banned = {tok.special_id(r) for r in ("pad", "bos", "eos", "unk", "mask", "reward")}
    assert all(set(c.banned_ids) == banned for c in configs)
    assert len(sampled) > 50 and not set(sampled) & banned


@pytest.mark.parametrize("flag, value, message", [("--temperature", "-1", "--temperature must be ≥ 0"),
                                                  ("--max-new-tokens", "0", "--max-new-tokens must be ≥ 1"),
                                                  ("--top-p", "0", "--top-p must be in (0, 1]")])
def test_chat_bad_arguments_are_refused_first(tmp_path, capsys, flag, value, message):
    # (the run directory does not exist: the arguments are checked before any run is read)
    assert main(["chat", str(tmp_path / "missing"), flag, value]) == 2
    assert message in one_line_error(capsys)


def test_chat_refuses_a_system_message_that_leaves_no_room(runs, capsys):
    assert main(["chat", str(runs["sft"]), "--system", "a" * 40, "--max-new-tokens", "16"]) == 2
    line = one_line_error(capsys)
    assert "--system is too long" in line


@pytest.mark.parametrize("command", ["sample", "chat"])
@pytest.mark.parametrize("tools, message", [("calculator", "has no tool tokens"),
                                            ("abacus", "--tools: unknown tool 'abacus'; the tools are calculator")])
def test_tools_need_a_run_trained_to_call_them(runs, capsys, monkeypatch, command, tools, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 1 plus 1?\n"))
    extra = ["--prompt", "What is 1 plus 1?"] if command == "sample" else []
    assert main([command, str(runs["sft"]), "--tools", tools, *extra]) == 2
    assert message in one_line_error(capsys)
