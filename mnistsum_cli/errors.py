"""The exceptions the CLI turns into a clear one-line message and an exit code."""


class MnistsumError(Exception):
    """A problem the user can fix: bad input, a missing or stale artifact (exit code 1)."""

    exit_code = 1


class BadOption(MnistsumError):
    """An option that cannot work here, found before any work starts (exit code 2)."""

    exit_code = 2


class Interrupted(MnistsumError):
    """Ctrl-C, after the work done so far was saved (exit code 130)."""

    exit_code = 130


class OutputClosed(Exception):
    """The reader of stdout went away (`mnistsum evaluate | head`): exit quietly with
    128 + SIGPIPE, as Unix tools do."""

    exit_code = 141


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty), for
    one-line reports of errors raised by libraries."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class OutputFailed(Exception):
    """Writing stdout failed for another reason than a closed pipe (`> /dev/full`, a full disk
    under `> file`): one line on stderr, exit code 1."""

    exit_code = 1

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
