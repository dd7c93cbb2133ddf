"""User data for the assistant stages, one JSON object per line:

- conversations (SFT): {"messages": [{"role", "content"}, ...]} or {"prompt": ..., "response": ...};
- rankings (reward model): {"prompt", "chosen", "rejected"} pairs, or {"prompt", "responses": [best, …,
  worst]} ranked lists (optionally "ranks": [0, 0, 1, …] when some responses tie); a prompt is text
  (a user message) or a list of messages; a response is text, or — a reply that called tools — the
  list of messages it made (assistant with "tool_calls", "tool" results, the final assistant message);
- problems (report card): {"messages": [...], "answer": "799"}.

A line that is not what its file should hold is a one-line UserError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from plutao.tokenizer.chat import ChatError, check_messages, conversation
from plutao.train.config.errors import UserError


@dataclasses.dataclass(frozen=True)
class Ranking:
    prompt: list[dict]  # messages ending with a user turn
    responses: list[str | list[dict]]  # text, or a reply with tool turns as its messages (reply_turns)
    ranks: list[int]  # 0 = best; equal ranks tie (no pair between them)
    meta: dict = dataclasses.field(default_factory=dict)  # e.g. the built-in world's gold facts


def _lines(path: Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; give a .jsonl file with one JSON object per line")
    n = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            n += 1
            yield lineno, obj
    if not n:
        raise UserError(f"{what} file {path} has no lines; add one JSON object per line")


def _prompt(obj: dict, where: str) -> list[dict]:
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        return conversation(prompt)
    if isinstance(prompt, list):
        try:
            return check_messages(prompt, generation=True)
        except ChatError as e:
            raise UserError(f"{where}: \"prompt\": {e}") from None
    raise UserError(f"{where}: \"prompt\" must be text or a list of messages")


def reply_turns(response: str | list[dict]) -> list[dict]:
    """A ranked response as the messages that follow the prompt."""
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def final_text(response: str | list[dict]) -> str:
    """The text of a response's last assistant message (a tool's output never counts as the answer)."""
    return response if isinstance(response, str) else response[-1]["content"]


def _response(response, where: str) -> str | list[dict]:
    if isinstance(response, str):
        return response
    if isinstance(response, list) and response and all(isinstance(m, dict) for m in response):
        if any(m.get("role") not in ("assistant", "tool") for m in response) or response[-1].get("role") != "assistant" \
                or response[-1].get("tool_calls"):
            raise UserError(f"{where}: a response given as messages holds assistant and tool messages only and ends "
                            "with the assistant's final message")
        try:
            return check_messages([{"role": "user", "content": "?"}, *response], needs_reply=True)[1:]
        except ChatError as e:
            raise UserError(f"{where}: a response with tool turns: {e}") from None
    raise UserError(f"{where}: each response must be text, or the list of assistant and tool messages of a reply "
                    "that called tools")


def read_conversations(path) -> list[list[dict]]:
    """SFT conversations (each with at least one assistant turn)."""
    out = []
    for lineno, obj in _lines(path, "conversations"):
        where = f"{path}:{lineno}"
        try:
            if "messages" in obj:
                out.append(check_messages(obj["messages"], needs_reply=True))
            elif "prompt" in obj and "response" in obj:
                if not isinstance(obj["response"], str):
                    raise UserError(f"{where}: \"response\" must be text")
                out.append(_prompt(obj, where) + [{"role": "assistant", "content": obj["response"]}])
            else:
                raise UserError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"response\": ...}}, "
                                f"got keys {sorted(obj)}")
        except ChatError as e:
            raise UserError(f"{where}: {e}") from None
    return out


def read_rankings(path) -> list[Ranking]:
    """Reward-model data: pairs and ranked lists (a pair is a ranked list of two)."""
    out = []
    for lineno, obj in _lines(path, "rankings"):
        where = f"{path}:{lineno}"
        prompt = _prompt(obj, where)
        if "chosen" in obj or "rejected" in obj:
            if obj.get("chosen") is None or obj.get("rejected") is None:
                raise UserError(f"{where}: a pair needs both \"chosen\" and \"rejected\"")
            responses = [_response(obj["chosen"], where), _response(obj["rejected"], where)]
            ranks = [0, 1]
        elif "responses" in obj:
            responses = obj["responses"]
            if not isinstance(responses, list):
                raise UserError(f"{where}: \"responses\" must be a list of replies, best first")
            responses = [_response(r, where) for r in responses]
            if len(responses) < 2:
                raise UserError(f"{where}: a ranked list needs at least 2 responses (got {len(responses)}); "
                                "a ranking of one response has no pair to learn from")
            ranks = obj.get("ranks", list(range(len(responses))))
            if (not isinstance(ranks, list) or len(ranks) != len(responses)
                    or not all(isinstance(r, int) and r >= 0 for r in ranks) or ranks != sorted(ranks)):
                raise UserError(f"{where}: \"ranks\" must be one non-negative integer per response, best first "
                                "(non-decreasing)")
            if len(set(ranks)) < 2:
                raise UserError(f"{where}: every response has the same rank; a ranking needs at least two levels")
        else:
            raise UserError(f"{where}: expected {{\"prompt\", \"chosen\", \"rejected\"}} or {{\"prompt\", "
                            f"\"responses\": [best, ..., worst]}}, got keys {sorted(obj)}")
        out.append(Ranking(prompt, list(responses), list(ranks), obj.get("meta", {})))
    return out


def read_problems(path) -> list[tuple[list[dict], str]]:
    """Verifiable problems: (messages ending with a user turn, the expected answer as text)."""
    out = []
    for lineno, obj in _lines(path, "problems"):
        where = f"{path}:{lineno}"
        if "messages" not in obj or "answer" not in obj:
            raise UserError(f"{where}: expected {{\"messages\": [...], \"answer\": \"...\"}}, got keys {sorted(obj)}")
        try:
            messages = check_messages(obj["messages"], generation=True)
        except ChatError as e:
            raise UserError(f"{where}: {e}") from None
        out.append((messages, str(obj["answer"]).strip()))
    return out


def single_path(data) -> str | None:
    """data.path when it names one source (a stage reads one file or built-in set), else None."""
    return data.path if isinstance(data.path, str) else (data.path[0] if len(data.path) == 1 else None)


def with_held_out(items: list, read, path: str, data, what: str) -> tuple[list, list, str]:
    """(training items, held-out items, path): data.val_path's items when given, otherwise the last
    data.val_fraction of the file (at least one)."""
    if data.val_path:
        return items, read(data.val_path), path
    if len(items) < 2:
        raise UserError(f"{path} has {len(items)} {what}; give at least 2 (one is held out) or data.val_path")
    n_val = max(1, round(len(items) * data.val_fraction))
    return items[:-n_val], items[-n_val:], path


def write_jsonl(path: Path, rows) -> None:
    """All rows, written aside and renamed into place (a crash leaves no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
