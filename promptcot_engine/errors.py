"""The one exception type for bad user input.

Everything a user can get wrong (a path, a file's contents, an option, a sampling value) raises
InputError with a message that names the file, line, field or index at fault. The CLI turns it into
one `error: ...` line and exit code 2; anything else escaping is an internal error (exit 1).
It subclasses ValueError so callers that already catch ValueError keep working.
"""


class InputError(ValueError):
    def __init__(self, message: str, item: int | None = None):
        super().__init__(message)
        # the index of the prompt or pair at fault in a batched call (LLM.generate, LLM.score), so that a
        # caller that read them from a file can name the line
        self.item = item
