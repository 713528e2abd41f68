"""The one exception type a user sees: a single sentence saying what is wrong and what to do."""


class MacftError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class DiskFullError(MacftError):
    """A write failed for lack of space; what was there before is intact."""
