"""The one exception type the kit raises for problems the user can fix."""


class LLMKitError(Exception):
    """A problem with the user's input, said in one line with what to do about it.

    The command line prints it on stderr and exits with status 2, without a traceback.
    """


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of a library's exception message (its type's name if it has none), to quote in one line."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
