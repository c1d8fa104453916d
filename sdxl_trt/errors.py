"""Errors users see. Each message names the bad value and says what to do about it."""

from __future__ import annotations


class SdxlTrtError(Exception):
    """Base class: an error the CLI prints as one clear line (no traceback) and exits non-zero on."""


class ModelLoadError(SdxlTrtError):
    """A model path or preset is missing, incomplete or malformed."""


class ExportError(SdxlTrtError):
    """Exporting or verifying an ONNX file failed."""


class BuildError(SdxlTrtError):
    """An engine could not be built (missing backend, bad profile, ...)."""


class ProfileError(BuildError):
    """Optimization-profile shapes disagree or are out of range."""


class BackendUnavailableError(BuildError):
    """The requested backend's library is not installed or cannot run on this machine."""


class ManifestError(SdxlTrtError):
    """An engine directory does not match this machine, library versions or its own files."""


class InvalidRequestError(SdxlTrtError, ValueError):
    """A generation request has a bad value; the message names the field and the allowed values."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class NonFiniteOutputError(SdxlTrtError):
    """NaN or inf appeared in latents or images; no image is written."""
