"""The base of every error a user can fix by changing input, files or configuration.

The CLI prints these as one line with exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message tells the user what was wrong and what to do."""
