"""Exception types raised by medinfer.

Every error caused by user input (files, headers, archives, configs, model files,
CLI arguments, HTTP requests) is a subclass of :class:`MedinferError`, which itself
subclasses :class:`ValueError`. Front doors map them to CLI exit code 2 and HTTP 4xx.
Messages name the input, the offending value and what would be accepted.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar


class MedinferError(ValueError):
    """Base class of all input errors raised by medinfer (a ``ValueError``)."""


class InvalidImageError(MedinferError):
    """An image file or folder cannot be read: wrong format, truncated, corrupt, empty."""


class GeometryError(MedinferError):
    """Image geometry is invalid or unsupported (singular affine, tilt, gaps between slices)."""


class SeriesSelectionError(MedinferError):
    """A DICOM folder holds several series and none was chosen, or the chosen UID is absent."""


class ResourceLimitError(MedinferError):
    """The input would need more memory or disk than allowed (e.g. a 10^12-voxel header)."""


class ModelError(MedinferError):
    """A model file, model folder or model card cannot be loaded or is invalid."""


class ConfigError(MedinferError):
    """A configuration file or option is invalid; the message names the key."""


class UnsafeArchiveError(MedinferError):
    """An archive member would escape the target folder, is a link, or is too large."""


E = TypeVar("E", bound=Enum)


def parse_enum(enum_type: type[E], value: E | str, name: str) -> E:
    """Convert ``value`` to ``enum_type`` or raise :class:`ConfigError` listing allowed values.

    Parameters
    ----------
    enum_type : the Enum class (members with string values).
    value : an enum member or its string value (case-insensitive).
    name : the option name used in the error message.
    """
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str):
        for member in enum_type:
            if str(member.value).lower() == value.lower():
                return member
    allowed = ", ".join(repr(m.value) for m in enum_type)
    raise ConfigError(f"{name}: {value!r} is not allowed; choose one of {allowed}")
