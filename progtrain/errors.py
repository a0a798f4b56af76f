"""Exceptions raised by progtrain, and the exit code the command line gives each.

``ProgtrainError`` is the base of every error progtrain raises on purpose. Its subclasses say whose
fault it is, and :data:`ProgtrainError.exit_code` is what ``progtrain`` (and the ``recipes/``
scripts) exit with after printing the one-line message:

=================================  ====  ==================================================
class                              exit  meaning
=================================  ====  ==================================================
:class:`ProgtrainConfigError`      2     bad input: a growth spec, run config, checkpoint or
                                         option progtrain cannot use; the message names the fix
:class:`UnsupportedArchitectureError` 2  a model family or config option without an adapter
:class:`HubError`                  1     the Hub or the network failed (HTTP 5xx, dropped
                                         connection); retrying may work
:class:`HubInputError`             2     a push refused before or by the Hub for a reason the
                                         user fixes (no token, 401/403/404, bad repo id, card)
:class:`TrainingDivergedError`     1     training stopped on non-finite losses
=================================  ====  ==================================================

Internal invariants (a bug in progtrain, not the user's input) raise ``RuntimeError`` and keep their
traceback.
"""

from __future__ import annotations

import re

from huggingface_hub.errors import StrictDataclassError


class ProgtrainError(Exception):
    """Base class of the errors progtrain raises on purpose; ``exit_code`` is the CLI's exit status."""

    exit_code: int = 1


class ProgtrainConfigError(ProgtrainError, ValueError):
    """Bad user input: a growth spec, run config or checkpoint that progtrain cannot use.

    The message names the problem and the fix.
    """

    exit_code = 2


class UnsupportedArchitectureError(ProgtrainConfigError):
    """The model's class or ``model_type`` (or one of its config options) has no progtrain adapter."""


class HubError(ProgtrainError):
    """A push to the Hub failed on the network or the server side (HTTP 5xx, dropped connection).

    The message is one line naming the problem and the fix, and never contains the token."""


class HubInputError(HubError, ProgtrainConfigError):
    """A push refused for a reason the user fixes: the directory, the repo id, the token (HTTP
    401/403), a missing repo or revision (HTTP 404), a model card the Hub rejects."""

    exit_code = 2


class TrainingDivergedError(ProgtrainError):
    """A non-finite loss beyond ``train.max_bad_batches``; the message names the step, the stage and
    the last good checkpoint."""


def config_error_text(e: BaseException) -> str:
    """One line from a transformers config validation error.

    transformers 5 validates configs with huggingface_hub's strict dataclasses, whose errors
    (``StrictDataclassFieldValidationError`` / ``StrictDataclassClassValidationError``, not
    ``ValueError`` subclasses) span several lines and carry the real reason as ``__cause__``.
    Returns e.g. ``"validate_architecture: The hidden size (80) is not a multiple of the number of
    attention heads (6)"`` or ``"field num_key_value_heads: Field 'num_key_value_heads' expected int ..."``.
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    m = re.match(r"(Validation error for field|Class validation error for validator) '([^']+)'", lines[0] if lines else "")
    cause = e.__cause__ if m and e.__cause__ is not None else None
    detail = (" ".join(str(cause).split()) if cause is not None else " ".join(lines)).rstrip(".")
    if m is None:
        return detail or type(e).__name__
    return f"{'field ' if m.group(1).startswith('Validation error for field') else ''}{m.group(2)}: {detail}"


def config_errors() -> tuple[type[BaseException], ...]:
    """The exception types a transformers config raises when it is invalid (for ``except``)."""
    return (ValueError, TypeError, StrictDataclassError)
