"""One exception hierarchy for every failure the user can cause or meet.

Each error carries the exit code the CLI returns and a one-line message that names the file or key at
fault, so the CLI renders them all the same way.
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_VALIDATION = 3


# A write's failures that are the disk's doing, not the input's: no space, over quota, file too large, read-only.
DISK_REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (PyYAML's and OmegaConf's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class CanaryConvertError(Exception):
    """Base class: a failure with a user-facing message and an exit code."""

    exit_code: int = EXIT_ERROR


class UsageError(CanaryConvertError):
    """The command line asks for something impossible (an unknown dtype, a missing OUT)."""

    exit_code = EXIT_USAGE


class MissingExtraError(CanaryConvertError):
    """A command needs an optional part of canary-convert that is not installed (the `convert` extra)."""


class SourceError(CanaryConvertError):
    """The SOURCE argument does not resolve to a readable checkpoint."""


class HubFileMissingError(SourceError):
    """The Hub repo exists but lacks the file asked for (a repo of another layout may still convert)."""


class HubUnreachableError(SourceError):
    """The Hugging Face Hub could not be reached and the file is not in the local cache."""


class ArchiveError(CanaryConvertError):
    """The `.nemo` archive is corrupt, incomplete or unsafe to read."""


class UnsafeArchiveError(ArchiveError):
    """A member would escape the archive (absolute path, `..`, link, device) or needs unsafe unpickling."""


class UnsupportedModelError(CanaryConvertError):
    """The checkpoint is not a model family this converter knows how to convert."""


class MappingError(CanaryConvertError):
    """The mapping rules and the checkpoint disagree: an unknown key, a missing parameter, a wrong shape."""


class RulesFileError(MappingError):
    """A mapping or preset YAML file is malformed."""


class OutputError(CanaryConvertError):
    """The output folder cannot be written (it exists, or the disk refused)."""


class ModelFolderError(CanaryConvertError):
    """A converted MLX folder is missing files or does not fit the bundled model."""


class AudioError(CanaryConvertError):
    """An audio file cannot be read or decoded."""


class ValidationError(CanaryConvertError):
    """The converted folder does not load strictly or does not reproduce the source."""

    exit_code = EXIT_VALIDATION


class UploadError(CanaryConvertError):
    """Publishing to the Hugging Face Hub failed; the message says what reached the Hub and what did not."""


class UploadRefusedError(UploadError):
    """The folder is not fit to publish (no conversion.json, failed validation, changed files, unknown licence);
    nothing was sent."""


class TranscriptWarning(UserWarning):
    """A transcript is known to be incomplete or altered (cut by the length budget, longer than the model's
    window, ids outside the tokenizer); the same facts are flags on the `Transcript`."""


class SlowBlasWarning(UserWarning):
    """MLX's CPU backend multiplies with its reference BLAS in this process by accident (mlx imported before
    canary_convert, or no OpenBLAS), some 20 times slower; the message says how to get OpenBLAS."""
