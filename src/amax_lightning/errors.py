"""The one exception type for user mistakes."""


class UserError(ValueError):
    """A mistake in the user's input: the CLI prints its message on one line and exits with code 2."""
