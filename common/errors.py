"""The one exception tree of fedrad.

Command-line entry points catch :class:`FedradError` and turn it into a message and an exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FedradError(Exception):
    """Base class of every error fedrad raises on purpose."""

    exit_code: int = 1


class ConfigError(FedradError):
    """A configuration file is missing, unreadable or invalid.

    ``problems`` lists every problem found, each naming file, dotted field and bad value.
    """

    exit_code = 2

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration {source}:\n{lines}")


class DataError(FedradError):
    """Site data is missing, unreadable or inconsistent (names the file)."""

    exit_code = 3


class PrivacyError(FedradError):
    """Misuse of a privacy primitive (bad arguments, corrupt ledger)."""

    exit_code = 4


class BudgetExceededError(PrivacyError):
    """The requested work would take a site past its privacy budget."""

    exit_code = 5


class LedgerError(PrivacyError):
    """The privacy ledger on disk is unreadable or inconsistent."""


class ModelError(FedradError):
    """Unknown model name or options a model does not accept."""

    exit_code = 2


class StrategyError(FedradError):
    """Unknown aggregation strategy or options it does not accept."""

    exit_code = 2


class ProtocolError(FedradError):
    """A federation message is malformed or carries something it must not."""

    exit_code = 6


class FederationError(FedradError):
    """The federation could not complete (too few hospitals, all refused, ...)."""

    exit_code = 7


class PolicyViolation(FedradError):
    """A request breaks the hospital's own node policy (``rule`` names which)."""

    exit_code = 8

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"rule {rule}: {message}")


class AuditError(FedradError):
    """The node's audit log is unreadable or fails verification."""

    exit_code = 9
