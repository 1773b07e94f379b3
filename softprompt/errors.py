"""The base of every error a user's mistake raises, and the one way to word one. It imports nothing,
so the CLI can catch it before (or without) loading torch."""


class UserError(ValueError):
    """A mistake in what the user gave (a config, a file, a name): the CLI prints one line and exits 2, no traceback."""


class ConfigError(UserError):
    """`field = value is not allowed: what is`, after the file at fault if any."""

    def __init__(self, field: str, value, allowed: str, source: str | None = None):
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field} = {value!r} is not allowed: {allowed}")
        self.field, self.value, self.allowed = field, value, allowed


def one_line(error: BaseException | str, limit: int | None = 300) -> str:
    """An error's text on one line, cut to `limit` characters: a library's message quoted inside ours
    (some run to pages) keeps ours one line."""
    return " ".join(str(error).split())[:limit]
