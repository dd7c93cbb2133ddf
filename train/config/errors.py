"""The exceptions a run ends with in one line; the CLI prints them and exits with their code.

- `UserError` (exit 2): a mistake the user can fix (config, arguments, data, a run directory in use).
- `NonFiniteError` (exit 3): the loss or gradient norm became NaN/inf and `train.on_nonfinite=stop`.
- `SaveError` (exit 1): a checkpoint could not be written (disk full, permissions, I/O).
"""


class UserError(Exception):
    """What was wrong and how to fix it, in one line."""

    exit_code = 2


class NonFiniteError(UserError):
    """Training produced a non-finite loss or gradient norm; nothing of that state was saved."""

    exit_code = 3


class SaveError(UserError):
    """Writing a checkpoint failed; the earlier checkpoints are untouched."""

    exit_code = 1
