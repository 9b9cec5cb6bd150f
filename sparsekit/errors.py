"""Errors a user can act on. The CLI prints their message as one paragraph and exits non-zero."""


class SparsekitError(Exception):
    """A problem with the user's input or environment, explained in words, never a traceback."""

    exit_code = 1


class RecipeError(SparsekitError):
    """The recipe (file or override) is not valid; exit code 2 like any usage error."""

    exit_code = 2
