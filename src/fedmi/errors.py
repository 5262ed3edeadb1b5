"""The one error type for problems a user can cause (bad path, column, config, update)."""


class FedmiError(Exception):
    """A user-facing error: the message says what is wrong and where.

    The CLI prints it in one or two lines and exits with status 2, without a traceback.
    """
