"""The one exception type the kit raises for problems the user can fix."""


class LLMKitError(Exception):
    """A problem with the user's input, said in one line with what to do about it.

    The command line prints it on stderr and exits with status 2, without a traceback.
    """
