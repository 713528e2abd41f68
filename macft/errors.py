"""The one exception type a user sees: a single sentence saying what is wrong and what to do."""


class MacftError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
