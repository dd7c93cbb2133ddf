"""The `plutao` subcommands, one module per concern. Each module defines its commands (`cmd_*`) and a
`register(sub)` that adds their parsers; `plutao.experiments.cli` only wires the modules together.

Command modules import the library (JAX, the model, training) inside the command functions, not at the
top: `plutao --help`, a mistyped command and the light commands (tokenize, launch, sweep, report) then
start in about half a second instead of the several seconds an import of JAX takes.
"""

from __future__ import annotations


def stage_parser(sub, name, help, parent, parent_help, data_help, fn,
                 overrides_help="(after the stage's defaults)"):
    """A stage's parser: its parent run, key=value overrides, --workdir, --data, --step, --quiet, --json."""
    sp = sub.add_parser(name, help=help)
    sp.add_argument(parent, help=parent_help)
    sp.add_argument("overrides", nargs="*", help=f"section.key=value overrides {overrides_help}")
    sp.add_argument("--workdir", required=True, help="the new run's directory (re-running resumes it)")
    sp.add_argument("--data", default="builtin:arith", help=data_help)
    which = "base" if parent == "base_run" else "SFT"
    sp.add_argument("--step", type=int, help=f"the {which} run's checkpoint (default: its latest)")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=fn)
    return sp
