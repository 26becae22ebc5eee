"""Exceptions for input a user can fix.

Messages name the file, the field and the fix; the CLI prints them without a traceback.
"""


class AbcPipelineError(Exception):
    """Base class: bad input, bad configuration or a failed transfer, explained for the user."""


class InputError(AbcPipelineError, ValueError):
    """A file, table, column or option is missing or malformed."""


class DownloadError(AbcPipelineError):
    """A transfer failed for good (after retries) or a file failed its checksum."""
