"""Exceptions raised by progtrain.

Every error caused by user input derives from :class:`ProgtrainConfigError`, so a caller (or the CLI,
which turns it into exit code 2 and one line) can tell bad input from a bug.
"""


class ProgtrainConfigError(ValueError):
    """Bad user input: a growth spec, run config or checkpoint that progtrain cannot use.

    The message names the problem and the fix.
    """


class UnsupportedArchitectureError(ProgtrainConfigError):
    """The model's class or ``model_type`` has no progtrain architecture adapter."""
