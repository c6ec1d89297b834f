"""Errors of the FHIR zone. Messages name the step and the HTTP status, never resource content."""


class ExportError(Exception):
    """A Bulk Data export failed at a named step (kick-off, status, download, search)."""
