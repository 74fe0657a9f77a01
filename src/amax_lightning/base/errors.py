"""The exception types for user mistakes, and how an exception is shown in one line."""


class UserError(ValueError):
    """A mistake in the user's input: the CLI prints its message on one line and exits with code 2."""


class NonFiniteError(UserError):
    """The loss or an activation became NaN or infinite: the run stops, naming the seeds and the step."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
