"""The one base class of the errors a user fixes: a bad config, unusable inputs, outputs of an
earlier run that are missing, changed or made with other settings. `submit.py` prints them as one
`error:` line and exits 2; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """The message names the file or config key at fault and what to do about it."""
