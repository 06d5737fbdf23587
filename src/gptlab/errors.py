"""The exceptions the command line turns into a one-line message and an exit status.

Library code raises `GptlabError` for anything the *user* got wrong (a missing file, an empty corpus,
a checkpoint that does not match its config, a value out of range): exit status 2, like a usage
error. `EnvironmentProblem` is for what the machine refuses (a full disk, a directory without write
permission, a device torch does not have): exit status 3. Programming errors stay ordinary
exceptions, so a bug still shows its traceback while a typo in a path never does.
"""


class GptlabError(Exception):
    """A user-facing error: the message alone must say what went wrong and what to do."""

    exit_code = 2


class EnvironmentProblem(GptlabError):
    """The machine cannot do what was asked: no space, no permission, no such device."""

    exit_code = 3


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): library messages can
    run to many lines, and a user-facing error stays one."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def failure_cause(exc: BaseException) -> str:
    """What a failure was, in one line for a log or a record: the exception's type and its first line."""
    return f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
