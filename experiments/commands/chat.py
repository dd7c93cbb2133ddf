"""`plutao chat`: talk to a run in the terminal (or to several side by side), and `plutao tokenize
--chat`: which tokens of a conversation supervised fine-tuning trains.

Both go through the one chat template (tokenizer/chat.py), so what the chat sends a model is laid
out exactly as what `plutao sft` trained it on.

The chat keeps the conversation as messages and sends the whole history with each new message.
When the prompt does not fit the model's context less the room kept for the reply, the oldest turns
(a user message and its reply) leave the history, the system message stays; a single message that
is still too long loses its first tokens. Either is said on stderr. The room kept for the reply is
what a reply has needed so far: the longest reply of the conversation (its stop token included), at
most --max-new-tokens and half the context (past that the sampler slides its window anyway); before
the first reply (and after /reset), --max-new-tokens up to half the context. --max-new-tokens must
be below the context (default: 64, or half the context when that is less).

Reading from a terminal, the chat prompts with "you> " and streams each reply as it is sampled.
Otherwise (piped input or output) it reads one message per line, writes it back as "you> message"
(so the transcript shows both sides) and writes each reply as one line, "RUN> reply", with newlines
in a reply written as \\n, so a session can be scripted.

A message with characters the run's tokenizer cannot write (a char tokenizer's unseen characters) is
refused with the one-line error `plutao sample` gives, and the chat reads the next line. Special
tokens that are not text (<pad>, <bos>, <mask>, ...) are never sampled; the tokens that end a reply
(<|end|>, <|endoftext|>, a turn token) are.

Lines starting with / are commands: /reset, /temp X, /quit (end of input quits too); // sends a
message that starts with /. Reply n (from 0, counted from the start or the last /reset) samples
with seed --seed + n, so a session replays exactly for the same --seed. --step picks the main
run's checkpoint; compared runs (--compare) use their newest, each with its own tokenizer and history.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

COMMANDS = "/reset clears the history, /temp X sets the temperature, /quit ends (so does end of input)"
DEFAULT_MAX_NEW_TOKENS = 64  # (or half the context, when that is less)


# --- plutao tokenize --chat ------------------------------------------------------------------------

def _tokenizer(spec: str, texts: list[str]):
    """The tokenizer `--tokenizer` names: byte, char (trained on `texts`), a run directory or a
    tokenizer folder."""
    from plutao.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer

    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        return CharTokenizer.train(texts)
    path = Path(spec)
    return load_tokenizer(path / "tokenizer" if (path / "tokenizer").is_dir() else path)


def tokenize_chat(args) -> int:
    """Print conversation --index of a JSONL file with each token marked trained or not."""
    from plutao.tokenizer import chat
    from plutao.train.config.errors import UserError
    from plutao.train.data.conversations import read_conversations

    if args.text is not None:
        raise UserError("give TEXT to tokenize or --chat FILE.jsonl, not both")
    if args.chat == "builtin:arith":  # the arithmetic world's demonstrations (what `plutao sft` trains on)
        from plutao.train.config.schema import Config
        from plutao.train.run.rundir import read_run_config
        from plutao.train.worlds import arith

        saved = read_run_config(Path(args.tokenizer)) if args.tokenizer and Path(args.tokenizer).is_dir() else None
        world = Config.from_dict(saved).world if saved else arith.World()  # (a run's own world: its tool rate)
        conversations = [d["messages"] for d in arith.demonstrations(world)]
    else:
        conversations = read_conversations(Path(args.chat))
    n = len(conversations)
    if not 0 <= args.index < n:
        raise UserError(f"--index {args.index} is out of range: {args.chat} has {n} conversation(s), "
                        f"so --index goes from 0 to {n - 1}")
    messages = conversations[args.index]
    tok = _tokenizer(args.tokenizer, [m["content"] for m in messages])
    rendered = chat.render(messages, tok)
    colour = sys.stdout.isatty()
    print(chat.marked(tok, rendered, colour=colour))
    total, trained = len(rendered), int(rendered.weights.sum())
    shown = "in green" if colour else "in [brackets]"
    print(f"conversation {args.index} of {n}: {total} tokens, {trained} trained ({shown}: the assistant's "
          f"text and its <|end|>), {total - trained} context only")
    return 0


# --- plutao chat -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Side:
    """One run's side of the chat: its model, tokenizer and history (user/assistant messages)."""

    label: str
    run: object  # plutao.train.run.lineage.LoadedRun
    model: object
    history: list[dict] = dataclasses.field(default_factory=list)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    answer: object = None  # with --tools: the agent loop's answer (tokenizer/chat.py: tool_answerer)
    longest_reply: int = 0  # tokens the longest reply of the conversation took, its stop token included

    @property
    def tokenizer(self):
        return self.run.tokenizer

    @property
    def context(self) -> int:
        return self.run.cfg.model.context_length


def _labels(run_dirs: list[str]) -> list[str]:
    """Each run's directory name, or the path as given where two names agree (numbered if still)."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    out = []
    for i, name in enumerate(names):
        same = names[:i].count(name)
        out.append(f"{name} ({same + 1})" if same else name)
    return out


def _check_runs(run_dirs: list[str], max_new_tokens: int | None) -> list:
    """Each run's task (from its config.json alone), refused in one line when it cannot chat or when
    --max-new-tokens leaves no room in its context for a prompt."""
    from plutao.experiments.commands.evaluation import run_task
    from plutao.train.config.errors import UserError

    tasks = []
    for d in run_dirs:
        task = run_task(Path(d))
        if task.judges or not task.trained_by_gradient or not (task.chat or "sample" in task.commands):
            task.check_command("chat", d)
        context = task.cfg.model.context_length
        if max_new_tokens is not None and max_new_tokens >= context:
            raise UserError(f"--max-new-tokens {max_new_tokens} is not below the context of {d} ({context} tokens), "
                            f"which must hold the prompt too; give fewer, e.g. --max-new-tokens {max(context // 2, 1)}")
        tasks.append(task)
    return tasks


def _reserve(side: Side) -> int:
    """Tokens kept for the side's next reply: what its longest reply so far took, at most --max-new-tokens
    and half the context; before its first reply, --max-new-tokens (at most half the context)."""
    cap = min(side.max_new_tokens, side.context // 2)
    return min(side.longest_reply, cap) if side.longest_reply else cap


def _prompt_budget(side: Side) -> tuple[int, int]:
    """(tokens the prompt may use, tokens kept for the reply)."""
    reserve = _reserve(side)
    return side.context - reserve, reserve


def _check_system(side: Side, system: list[dict]) -> None:
    from plutao.tokenizer import chat
    from plutao.train.config.errors import UserError

    if system:
        side.tokenizer.encode(system[0]["content"])  # (characters it cannot write: sample's one-line error)
    budget, reserve = _prompt_budget(side)
    least = len(chat.prompt_ids(system + [{"role": "user", "content": ""}], side.tokenizer))
    if least > budget:
        raise UserError(f"--system is too long for {side.label}: with an empty message the prompt is {least} tokens, "
                        f"but its context of {side.context} leaves {budget} after {reserve} for the reply; shorten "
                        "--system or lower --max-new-tokens")


def _fit(side: Side, system: list[dict], where: str) -> list[int]:
    """The prompt for the side's history (which ends with the new user message), made to fit: the
    oldest turns leave the history, then the last message loses tokens from its start. `where`
    starts the notice on stderr that says so."""
    from plutao.tokenizer import chat

    def note(message: str) -> None:
        print(f"plutao: {where}{message}", file=sys.stderr)

    tok = side.tokenizer
    budget, reserve = _prompt_budget(side)
    dropped = 0
    ids = chat.prompt_ids(system + side.history, tok)
    while len(ids) > budget and len(side.history) > 1:
        # (a turn: the user's message, then the reply's messages — tool turns included — up to the next one)
        nxt = next((i for i, m in enumerate(side.history) if i and m["role"] == "user"), len(side.history) - 1)
        del side.history[:nxt]
        dropped += 1
        ids = chat.prompt_ids(system + side.history, tok)
    if dropped:
        note(f"history truncated: dropped the oldest {dropped} turn(s)")
    if len(ids) > budget:
        # The layout ends <|user|> text <|end|> <|assistant|>: cut the text's first tokens.
        n_text = len(tok.encode_unseen(side.history[-1]["content"]))
        cut = len(ids) - budget
        start = len(ids) - 2 - n_text
        ids = ids[:start] + ids[start + cut:]
        note(f"message cut: the model sees only its last {n_text - cut} of {n_text} tokens (context {side.context}, "
             f"{reserve} kept for the reply)")
    return ids


def _reply_with_tools(side: Side, prompt: list[int], sampling, one_line: bool) -> list[dict]:
    """The side's reply through the agent loop, streamed with each tool turn shown as
    [NAME: ARGUMENT → RESULT]; its messages (the calls and results too) for the history."""
    from plutao.model.agent import complete_with_tools
    from plutao.tokenizer.chat import MAX_CALLS, ReplyStream, reply_messages

    tok = side.tokenizer
    shown = ReplyStream(tok)

    def write(row, tokens, forced):
        text = shown.feed(tokens, forced)
        sys.stdout.write(text.replace("\r", "\\r").replace("\n", "\\n") if one_line else text)
        sys.stdout.flush()

    sys.stdout.write(f"{side.label}> ")
    [c] = complete_with_tools(side.model, [prompt], sampling, eot_id=tok.eot_id, pad_id=tok.pad_id,
                              pause_id=tok.tool_id, answer=side.answer, max_calls=MAX_CALLS, on_tokens=write)
    sys.stdout.write("\n")
    sys.stdout.flush()
    side.longest_reply = max(side.longest_reply, min(len(c.tokens) + 1, sampling.max_new_tokens))
    return reply_messages(tok, c.tokens, c.forced)


def _reply(side: Side, prompt: list[int], sampling, one_line: bool) -> str:
    """Stream the side's reply to stdout after its label; the reply's text. Records how many tokens it
    took (`longest_reply`)."""
    from plutao.model.decode import stream

    tok = side.tokenizer
    out = sys.stdout

    def write(text: str) -> None:
        out.write(text.replace("\r", "\\r").replace("\n", "\\n") if one_line else text)
        out.flush()

    write(f"{side.label}> ")
    ids: list[int] = []
    shown, pending = "", 0
    for token in stream(side.model, prompt, sampling, eot_id=tok.eot_id, pad_id=tok.pad_id):
        ids.append(token)
        pending += 1
        text = tok.decode(ids, skip_special=True)
        # Wait for the rest of a multi-byte character (a few tokens at most; after that it is garbage).
        if "\ufffd" in text[len(shown):] and pending < 4:
            continue
        write(text[len(shown):])
        shown, pending = text, 0
    text = tok.decode(ids, skip_special=True)
    write(text[len(shown):])
    out.write("\n")
    out.flush()
    side.longest_reply = max(side.longest_reply, min(len(ids) + 1, sampling.max_new_tokens))
    return text


def _read_line(interactive: bool) -> str | None:
    """The next line of input without its newline; None at the end of input."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")




def _tools(names: str) -> dict:
    from plutao.tools import ToolError, tools_named
    from plutao.train.config.errors import UserError

    try:
        return tools_named(names) if names else {}
    except ToolError as e:
        raise UserError(f"--tools: {e}") from None


def cmd_chat(args) -> int:
    if args.url:
        from plutao.experiments.serve.client import remote_chat

        return remote_chat(args)
    if not args.run_dir:
        from plutao.train.config.errors import UserError

        raise UserError("give a run directory to chat with, or --url http://HOST:PORT of a `plutao serve`")
    from plutao.experiments.commands.evaluation import calls_tools
    from plutao.model.sampling import SamplingConfig
    from plutao.tokenizer import TokenizerError, chat
    from plutao.train.config.errors import UserError
    from plutao.train.run.lineage import load_run

    # Arguments first, then the runs' configs: nothing is loaded for a chat that cannot start.
    asked = args.max_new_tokens  # (None: the default, made to fit each run's context)
    settings = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=DEFAULT_MAX_NEW_TOKENS if asked is None else asked, seed=args.seed)
    run_dirs = [args.run_dir, *(args.compare or [])]
    tasks = _check_runs(run_dirs, asked)
    tools = _tools(args.tools)
    for d, task in zip(run_dirs, tasks):  # (before any run loads)
        if tools and not calls_tools(d, task):
            raise UserError(f"--tools: {d} has no tool tokens; give chat runs trained to call tools")
    labels = _labels(run_dirs)
    system = [{"role": "system", "content": args.system}] if args.system else []

    sides = []
    for i, (d, task, label) in enumerate(zip(run_dirs, tasks, labels)):
        run = load_run(Path(d), args.step if i == 0 else None)
        context = run.cfg.model.context_length
        fitting = min(DEFAULT_MAX_NEW_TOKENS, max(context // 2, 1))  # (the default, in this run's context)
        side = Side(label, run, run.model, max_new_tokens=fitting if asked is None else asked)
        chat.reply_stop_ids(side.tokenizer)  # (a tokenizer without the template's tokens is refused here)
        if tools:
            side.answer = chat.tool_answerer(side.tokenizer, tools, max_calls=chat.MAX_CALLS, max_result_tokens=chat.result_tokens(
                context, side.max_new_tokens, chat.MAX_CALLS))
        _check_system(side, system)
        if not task.chat:
            print(f"plutao: {d} was not trained on the chat template (a base run); it continues the conversation's "
                  "text as best it can", file=sys.stderr)
        sides.append(side)

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        steps = ", ".join(f"{s.label} (step {s.run.step})" for s in sides)
        print(f"chatting with {steps}; {COMMANDS}", file=sys.stderr)

    temperature, turn = settings.temperature, 0
    while True:
        line = _read_line(interactive)
        if line is None:
            return 0
        line = line.strip()
        if not line:
            continue
        if not interactive:  # (a terminal shows what was typed; a transcript needs it written)
            print(f"you> {line}", flush=True)
        if line.startswith("/") and not line.startswith("//"):
            word, _, rest = line.partition(" ")
            if word == "/quit":
                return 0
            if word == "/reset":
                for side in sides:
                    side.history.clear()
                    side.longest_reply = 0
                turn = 0
                print("plutao: history cleared" + (" (the system message stays)" if system else ""), file=sys.stderr)
            elif word == "/temp":
                try:
                    value = float(rest)
                except ValueError:
                    value = math.nan
                if not (math.isfinite(value) and value >= 0):
                    print(f"plutao: /temp needs a number ≥ 0 (0 = greedy), got {rest.strip()!r}; the temperature "
                          f"stays {temperature:g}", file=sys.stderr)
                else:
                    temperature = value
                    print(f"plutao: temperature {temperature:g}", file=sys.stderr)
            else:
                print(f"plutao: unknown command {word}; {COMMANDS} (start a message with // to send one that "
                      "begins with /)", file=sys.stderr)
            continue
        if line.startswith("//"):
            line = line[1:]
        try:  # one rule with `plutao sample`: what a tokenizer cannot write is refused, not made <unk>
            for side in sides:
                side.tokenizer.encode(line)
        except TokenizerError as e:
            print(f"plutao: error: {e}", file=sys.stderr, flush=True)
            continue
        for side in sides:
            side.history.append({"role": "user", "content": line})
            prompt = _fit(side, system, f"{side.label}: " if len(sides) > 1 else "")
            stops = chat.reply_stop_ids(side.tokenizer)
            # Special tokens that are not text are never sampled; those that end a reply are.
            sampling = dataclasses.replace(settings, temperature=temperature, seed=args.seed + turn,
                                           max_new_tokens=side.max_new_tokens, stop_ids=stops,
                                           banned_ids=side.tokenizer.unsampled_ids(stops, side.run.cfg.model.vocab_size))
            if side.answer is not None:
                side.history += _reply_with_tools(side, prompt, sampling, one_line=not interactive)
            else:
                side.history.append({"role": "assistant", "content": _reply(side, prompt, sampling,
                                                                            one_line=not interactive)})
        turn += 1


def register(sub) -> None:
    """Add this module's subcommands to the `plutao` parser."""
    ch = sub.add_parser("chat", help="chat with a run in the terminal (reads one message per line when piped)")
    ch.add_argument("run_dir", nargs="?", help="the run to chat with (or --url)")
    ch.add_argument("--url", help="chat with a model of a running `plutao serve` at http://HOST:PORT instead")
    ch.add_argument("--model", help="with --url: the served model (default: the first chat model it lists)")
    ch.add_argument("--api-key", help="with --url: the server's key (default: PLUTAO_API_KEY)")
    ch.add_argument("--system", help="a system message at the start of the conversation")
    ch.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s); /temp X changes it")
    ch.add_argument("--top-k", type=int, default=0)
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--max-new-tokens", type=int, help="longest reply, in tokens; below the model's context (default: "
                    f"{DEFAULT_MAX_NEW_TOKENS}, or half the context when that is less)")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--compare", nargs="+", metavar="RUN", help="also answer every message with these runs")
    ch.add_argument("--tools", default="", metavar="NAMES", help="let the replies call these tools (e.g. calculator; "
                    "runs trained to call tools), each call shown as [NAME: ARGUMENT → RESULT]")
    ch.add_argument("--step", type=int)
    ch.set_defaults(fn=cmd_chat)
