"""The one exception type users see: a single line that says what is wrong, where, and how to fix it."""


class StimulusError(Exception):
    """User-facing error. The CLI prints ``error: <message>`` and exits with status 2."""
