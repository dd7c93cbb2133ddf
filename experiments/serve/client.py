"""`plutao chat --url http://HOST:PORT [--model M]`: the terminal chat against a running `plutao serve`
(standard library only: no serve extra needed on the client's machine). Replies stream as they are
written; a tool turn shows as [NAME: ARGUMENT → RESULT]; /reset, /temp X and /quit as in the local chat."""

from __future__ import annotations

import json
import math
import os
import sys
import urllib.error
import urllib.request

from plutao.train.config.errors import UserError


class Server:
    def __init__(self, url: str, key: str | None):
        self.url, self.key = url.rstrip("/"), key

    def _open(self, path: str, body: dict | None = None, timeout: float = 600):
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = str(e)
            raise UserError(f"{self.url}{path}: {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot reach {self.url} ({getattr(e, 'reason', e)}); is `plutao serve` running there?") \
                from None

    def models(self) -> list[dict]:
        with self._open("/v1/models", timeout=30) as r:
            return json.loads(r.read())["data"]

    def stream_chat(self, body: dict):
        """Yield each streamed chunk's choice delta."""
        with self._open("/v1/chat/completions", body | {"stream": True}) as r:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise UserError(f"{self.url}: {event['error']['message']}")
                for choice in event.get("choices", []):
                    yield choice.get("delta", {})


def shown_turns(turns: list[dict]) -> str:
    calls = {}
    out = []
    for m in turns:
        for c in m.get("tool_calls") or []:
            args = json.loads(c["function"]["arguments"] or "{}")
            calls[c["id"]] = f"{c['function']['name']}: {next(iter(args.values()), '') if isinstance(args, dict) else args}"
        if m["role"] == "tool":
            out.append(f"[{calls.get(m['tool_call_id'], '?')} → {m['content']}] ")
    return "".join(out)


def remote_chat(args) -> int:
    server = Server(args.url, args.api_key or os.environ.get("PLUTAO_API_KEY"))
    chat_models = [m for m in server.models() if m.get("chat")]
    names = [m["id"] for m in chat_models]
    model = args.model or (names[0] if names else None)
    if model not in names:
        raise UserError(f"--model {model!r}: {args.url} serves the chat models {', '.join(names) or 'none'}; pick one")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        print(f"chatting with {model} at {args.url}; /reset, /temp X, /quit", file=sys.stderr)
    history = [{"role": "system", "content": args.system}] if args.system else []
    temperature = args.temperature
    while True:
        line = input("you> ") if interactive else sys.stdin.readline()
        if not line and not interactive:
            return 0
        line = line.strip()
        if not line:
            continue
        if not interactive:
            print(f"you> {line}", flush=True)
        if line in ("/quit",):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        if line.startswith("/temp"):
            try:
                value = float(line.split(maxsplit=1)[1])
            except (IndexError, ValueError):
                value = math.nan
            if math.isfinite(value) and value >= 0:
                temperature = value
            else:
                print("plutao: /temp needs a number ≥ 0", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        body = {"model": model, "messages": history, "temperature": temperature, "seed": args.seed}
        if args.max_new_tokens:
            body["max_tokens"] = args.max_new_tokens
        sys.stdout.write(f"{model}> ")
        text = []
        for delta in server.stream_chat(body):
            shown = shown_turns(delta.get("tool_turns", [])) + (delta.get("content") or "")
            text.append(delta.get("content") or "")
            sys.stdout.write(shown.replace("\n", "\\n") if not interactive else shown)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(text)})
