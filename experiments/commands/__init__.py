"""The `plutao` subcommands, one module per concern; `plutao.experiments.cli` parses and dispatches."""
