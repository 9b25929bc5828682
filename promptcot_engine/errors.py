"""The one exception type for bad user input.

Everything a user can get wrong (a path, a file's contents, an option, a sampling value) raises
InputError with a message that names the file, line, field or index at fault. The CLI turns it into
one `error: ...` line and exit code 2; anything else escaping is an internal error (exit 1).
It subclasses ValueError so callers that already catch ValueError keep working.
"""


class InputError(ValueError):
    pass
