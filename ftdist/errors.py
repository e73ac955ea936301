"""User-facing errors: the CLI turns these into one message and exit code 2."""


EXIT_USER_ERROR = 2  # what a UserError ends the command with


class UserError(Exception):
    """A problem the user can fix (config, data, paths). Its message says how."""
