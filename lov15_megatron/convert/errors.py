"""The conversion's error: a checkpoint, or a name given for one, that cannot be converted.

It lives apart from the mapping engine (``convert/mapping.py``, which imports torch and re-exports
it) so that a command can name it, and end in its one-line error, without importing torch:
the converter CLI's unknown ``--model`` (``models/catalog.py``).
"""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the tensor or field."""
