"""Errors about what the user gave (recipe, data, paths, checkpoints).

Each is raised with a one-line message that names the file or key and the fix; the command line prints it and
exits 2 (``label_efficient.cli``). Any other exception is a bug of ours and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of every error about the user's input: its message is the whole report."""


class RecipeError(UserError, ValueError):
    """A recipe (or a command-line override of it) that does not validate; names the dotted key."""


class DataError(UserError, ValueError):
    """Bad input data: the message names the file and what is wrong."""


class CorruptFileError(DataError):
    """A file that cannot be read (``data.on_corrupt: skip`` drops such cases)."""


class CheckpointError(UserError, ValueError):
    """A model or checkpoint file that is missing, unreadable or does not fit the run."""


class OutputError(UserError, ValueError):
    """An output path that cannot be written, or whose writing would overwrite an input or another run."""


class OutputExistsError(OutputError, FileExistsError):
    """The output folder already holds another run (or this one, without ``--resume``)."""
