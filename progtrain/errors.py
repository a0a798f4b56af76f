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


def config_error_text(e: BaseException) -> str:
    """One line from a transformers config validation error.

    transformers 5 validates configs with huggingface_hub's strict dataclasses, whose errors
    (``StrictDataclassFieldValidationError`` / ``StrictDataclassClassValidationError``, not
    ``ValueError`` subclasses) span several lines and carry the real reason as ``__cause__``.
    Returns e.g. ``"validate_architecture: The hidden size (80) is not a multiple of the number of
    attention heads (6)"`` or ``"field num_key_value_heads: Field 'num_key_value_heads' expected int ..."``.
    """
    import re

    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    m = re.match(r"(Validation error for field|Class validation error for validator) '([^']+)'", lines[0] if lines else "")
    cause = e.__cause__ if m and e.__cause__ is not None else None
    detail = (" ".join(str(cause).split()) if cause is not None else " ".join(lines)).rstrip(".")
    if m is None:
        return detail or type(e).__name__
    return f"{'field ' if m.group(1).startswith('Validation error for field') else ''}{m.group(2)}: {detail}"


def config_errors() -> tuple[type[BaseException], ...]:
    """The exception types a transformers config raises when it is invalid (for ``except``)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # huggingface_hub without strict dataclasses
        return (ValueError, TypeError)
    return (ValueError, TypeError, StrictDataclassError)
