"""Errors a user can act on. The CLI prints their message as one paragraph and exits non-zero."""


class SparsekitError(Exception):
    """A problem with the user's input or environment, explained in words, never a traceback."""

    exit_code = 1


class UsageError(SparsekitError):
    """A command-line value that can never work (`--device foo`, a wrong combination of
    options); exit code 2 like click's own usage errors."""

    exit_code = 2


class RecipeError(UsageError):
    """The recipe (file or override) is not valid; exit code 2 like any usage error."""


class DataError(SparsekitError):
    """The training data cannot be read (an image file); raised where the file is read, often
    in a DataLoader worker. The trainer adds whether the run can continue with --resume."""


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def user_message(err: SparsekitError) -> str:
    """The error's own paragraph. A DataLoader worker's error reaches the main process
    rebuilt as the same class around the worker's whole traceback ("Caught SparsekitError in
    DataLoader worker process 0. Original Traceback ..."): keep only the paragraph it was
    raised with, so it reads the same as in the main process."""
    text = str(err)
    if _WORKER_TRACEBACK not in text:
        return text
    for cls in type(err).__mro__:
        marker = f"\n{cls.__module__}.{cls.__qualname__}: "
        if marker in text:
            return text.rsplit(marker, 1)[1].strip()
    return text.strip().splitlines()[-1]
