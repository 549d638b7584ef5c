"""Exceptions that the CLI turns into exit codes and one-line messages."""


def one_line(text: str) -> str:
    """Escape control characters (a hostile tensor name may hold a newline)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))


def reason(e: BaseException, limit: int | None = None) -> str:
    """Another library's exception as a short phrase: whitespace folded, cut at ``limit``."""
    text = " ".join(str(e).split())
    return text if limit is None else text[:limit]


class WiscaError(Exception):
    """Bad usage or bad input: the CLI prints one line and exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, *args, details: list[str] | None = None, fields: tuple[str, ...] = ()):
        super().__init__(one_line(message), *args)
        self.details = [one_line(d) for d in details or []]   # for --json and WISCA_DEBUG=1
        self.fields = fields      # options named in the message as `field`: the CLI shows their flags


class VerificationFailed(WiscaError):
    """The transformed model does not compute the same function: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}
