"""The one exception family the CLI reports as a message instead of a traceback."""


class ModelZooError(Exception):
    """A problem the user can fix (bad data folder, unusable checkpoint, failed export).

    The text says what is wrong and what to do about it.
    """
