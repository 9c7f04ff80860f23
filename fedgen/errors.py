"""Errors fedgen raises on bad input and on privacy-budget exhaustion.

Every configuration error names the field at fault and how to fix it, so a wrong YAML fails before any
training starts and before anything already saved is touched.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid.

    The message reads ``<field>: <problem>. Fix: <fix>``.
    """

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing and cannot be downloaded."""


class PrivacyBudgetExceeded(RuntimeError):
    """A release was refused because it would spend more than the mechanism's epsilon budget."""
