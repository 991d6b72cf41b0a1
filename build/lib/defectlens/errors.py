"""Errors a user can act on.

Every failure caused by input (a file, a folder, a model bundle, a setting) is raised as a
:class:`DefectLensError` whose message is one line naming the input. The CLI prints exactly
that line and exits with status 2, so a quality engineer never has to read a traceback.
"""

from __future__ import annotations


class DefectLensError(Exception):
    """A problem with the user's input, explained in one line."""


class ImageError(DefectLensError):
    """An image file that cannot be used (missing, corrupt, truncated, unsupported, too large)."""


class ImageTooLargeError(ImageError):
    """An image over a byte or pixel limit: a service answers 413, not 422."""


class ImageFormatError(ImageError):
    """An image in a format this caller does not accept: a service answers 415."""


class DatasetError(DefectLensError):
    """A data set folder whose layout or content cannot be used."""


class BundleError(DefectLensError):
    """A model bundle that is not a DefectLens bundle, is damaged, or is of another version."""


class WeightsError(DefectLensError):
    """Pretrained weights that are missing or are not the file we expect."""
