"""Errors raised by the clinical domain functions for values they cannot interpret."""

from __future__ import annotations


class ClinicalValueError(ValueError):
    """A clinical value is missing, malformed or outside what the function accepts."""


class UnitError(ClinicalValueError):
    """A unit has no conversion to the canonical unit of the requested dimension."""
