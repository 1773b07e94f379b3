"""The base of every error a user's mistake raises. It imports nothing, so the CLI can catch it
before (or without) loading torch."""


class UserError(ValueError):
    """A mistake in what the user gave (a config, a file, a name): the CLI prints its one line and
    exits 2, with no traceback."""
