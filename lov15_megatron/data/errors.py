"""Bad-input errors: every rejected sample carries a reason (for skip reports) and a location."""

from __future__ import annotations

#: Skip/failure reasons used in ``pack_report.json`` (``samples_skipped``: reason -> count).
MALFORMED_RECORD = "malformed_record"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
SPECIAL_TOKEN_IN_TEXT = "special_token_in_text"
NO_LOSS_TOKENS = "no_loss_tokens"
TOO_LONG = "too_long"
#: A video sample (mix ``media: "video"``, a ``video`` field, video members) when the packer
#: runs with ``--videos skip`` (the default): valid data it does not pack.
VIDEO_NOT_SUPPORTED = "video_not_supported"
#: ``--videos pack``: a video file or frame image that is not there / cannot be decoded.
MISSING_VIDEO = "missing_video"
CORRUPT_VIDEO = "corrupt_video"

REASONS = (
    MALFORMED_RECORD,
    MISSING_IMAGE,
    CORRUPT_IMAGE,
    IMAGE_COUNT_MISMATCH,
    SPECIAL_TOKEN_IN_TEXT,
    NO_LOSS_TOKENS,
    TOO_LONG,
    VIDEO_NOT_SUPPORTED,
    MISSING_VIDEO,
    CORRUPT_VIDEO,
)
#: Reasons that are not bad input (valid data we do not train on): counted as skips even when
#: the packer runs with ``--on-error fail``.
ALWAYS_SKIPPED = (VIDEO_NOT_SUPPORTED,)


class BadSample(ValueError):
    """A sample that cannot be used, with a machine-readable ``reason``.

    ``where`` names the file and record (e.g. ``data/train.jsonl:17``) once known.
    """

    def __init__(self, reason: str, message: str, where: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}")
        self.reason = reason
        self.message = message
        self.where = where
        super().__init__(self.describe())

    def describe(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.reason}: {self.message}"

    def at(self, where: str) -> BadSample:
        """The same error located at ``where`` (keeps an inner location as a suffix)."""
        inner = f" [{self.where}]" if self.where and self.where != where else ""
        return BadSample(self.reason, self.message + inner, where)
