"""The one exception type the command line turns into a one-line message.

Library code raises `GptlabError` for anything the *user* got wrong (a missing file, an empty corpus,
a checkpoint that does not match its config). Programming errors stay ordinary exceptions, so a bug
still shows its traceback while a typo in a path never does.
"""


class GptlabError(Exception):
    """A user-facing error: the message alone must say what went wrong and what to do."""
