"""Tools a model may call while it replies: a registry of name → `Tool`, and the one way to run a call.

A model writes a call as `NAME: ARGUMENT` between the chat template's call tokens (characters a
character vocabulary trained on ordinary text already has, unlike brackets); the runtime (the
sampler's agent loop, `plutao chat`, the report card, the server) runs it with `run_call` and inserts
the returned text as the tool's turn. `run_call` never raises: an unknown tool, a malformed call or
a failing tool is answered with a line starting "error:", which the model reads like any result.
Each tool also describes itself as the OpenAI `tools` list does (a JSON schema of one string
parameter), so the server can list it and map a call onto OpenAI's `tool_calls` shape.

Imports nothing from the rest of plutao (tools are plain host-side functions).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType

from plutao.tools.calculator import MAX_INPUT, calculate

MAX_RESULT = 200  # characters of a result inserted into a reply (longer ones are cut, and say so)
_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s?(.*?)\s*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameter: str  # the name of its one string argument (OpenAI `arguments` = {parameter: text})
    run: Callable[[str], str]
    max_input: int = MAX_INPUT

    def schema(self) -> dict:
        """The tool as an entry of OpenAI's `tools` list."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": {self.parameter: {"type": "string"}},
                           "required": [self.parameter]}}}


CALCULATOR = Tool("calculator", "Exact arithmetic: + - * / and parentheses over integers and decimals, "
                  "e.g. calculator: 347+589 → 936.", "expression", calculate)
TOOLS: Mapping[str, Tool] = MappingProxyType({CALCULATOR.name: CALCULATOR})


class ToolError(ValueError):
    """A user asked for a tool that does not exist (one line)."""


def tools_named(names: str | list[str] | tuple[str, ...]) -> dict[str, Tool]:
    """The tools a command's `--tools a,b` names, or a ToolError listing the ones there are."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ToolError(f"unknown tool {unknown[0]!r}; the tools are {', '.join(TOOLS)}")
    return {n: TOOLS[n] for n in names}


def format_call(name: str, argument: str) -> str:
    """The text of a call; with no name (a call the runtime could not read), the argument as written."""
    return f"{name}: {argument}" if name else argument


def parse_call(text: str) -> tuple[str, str] | None:
    """`NAME: ARGUMENT` → (name, argument); None when the text is not a call."""
    m = _CALL.match(text)
    return (m.group(1), m.group(2)) if m else None


def run_call(tools: Mapping[str, Tool], text: str) -> str:
    """The result of the call the model wrote (`text`), as the text of the tool's turn; never raises."""
    call = parse_call(text)
    if call is None:
        return "error: a call is written NAME: ARGUMENT, e.g. calculator: 347+589"
    name, argument = call
    tool = tools.get(name)
    if tool is None:
        return f"error: unknown tool {name!r}; available: {', '.join(tools) or 'none'}"
    if len(argument) > tool.max_input:
        return f"error: the argument is {len(argument)} characters; {name} takes at most {tool.max_input}"
    try:
        result = str(tool.run(argument))
    except Exception as e:  # noqa: BLE001 (a tool's own failure is the model's answer, never the runtime's crash)
        result = f"error: {name} failed ({type(e).__name__}: {' '.join(str(e).splitlines())})"
    if len(result) > MAX_RESULT:
        result = result[:MAX_RESULT - 20] + " … (result cut)"
    return result
