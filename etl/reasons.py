"""Reason codes for rejected messages."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Reason code of a Kafka message that did not become a row of ``liste-patients``.

    Every drained message ends as exactly one row or one reject with one of
    these codes, so the two lists account for every offset.
    """

    TOMBSTONE = "tombstone"
    """The record has a key but a null value (a delete marker on compacted topics)."""
    TOO_LARGE = "too_large"
    """The value is larger than ``VITALS_MAX_MESSAGE_BYTES``."""
    NOT_UTF8 = "not_utf8"
    """The value bytes are not valid UTF-8 (RFC 8259 requires UTF-8)."""
    INVALID_JSON = "invalid_json"
    """The value is empty, truncated or otherwise not JSON, or a string in it has a lone surrogate escape."""
    NOT_AN_OBJECT = "not_an_object"
    """The value is valid JSON but not an object (an array, a string, null...)."""
    MISSING_FIELD = "missing_field"
    """A required field is absent, null or blank."""
    WRONG_TYPE = "wrong_type"
    """A field has a JSON type or a text form that the message format does not allow."""
    OUT_OF_RANGE = "out_of_range"
    """A value is outside its plausible physiological range or allowed set."""
    DIASTOLIC_NOT_BELOW_SYSTOLIC = "diastolic_not_below_systolic"
    """The diastolic pressure is not lower than the systolic pressure."""
    TIMESTAMP_INVALID = "timestamp_invalid"
    """The timestamp cannot be read, has no UTC offset, or is too far in the past or future."""
    INVALID_NAME = "invalid_name"
    """The name contains no letter (only digits or punctuation), or a character of
    :data:`etl.parse.NAME_CONTROL_CHARACTER` (a control, byte order mark or
    explicit bidirectional formatting character)."""
    OUTPUT_CONTRACT = "output_contract"
    """The derived row broke the output contract; this points at a bug, not at the producer."""
