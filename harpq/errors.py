"""The one exception type users see: a one-line message that names the problem."""


class HarpqError(ValueError):
    """Bad input or an unusable file. The CLI prints it as a single line and exits with status 2."""
