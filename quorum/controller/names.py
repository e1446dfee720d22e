"""Topic names, by Kafka's rules (``org.apache.kafka.common.internals.Topic``)."""

from __future__ import annotations

import re

from quorum.image import MetadataImage
from quorum.replay import unify_name as unify_collision_chars

__all__ = ["collides", "unify_collision_chars", "validate_topic_name"]

MAX_TOPIC_NAME_LENGTH = 249
_LEGAL = re.compile(r"[a-zA-Z0-9._-]+")


def validate_topic_name(name: str) -> str | None:
    """The reason ``name`` is not a legal topic name, or None when it is."""
    if not name:
        return "Topic name is illegal, it can't be empty"
    if name in (".", ".."):
        return 'Topic name cannot be "." or ".."'
    if len(name) > MAX_TOPIC_NAME_LENGTH:
        return (
            f"Topic name is illegal, it can't be longer than {MAX_TOPIC_NAME_LENGTH} characters,"
            f" topic name: {name}"
        )
    if not _LEGAL.fullmatch(name):
        return (
            f"Topic name {name} is illegal, it contains a character other than"
            " ASCII alphanumerics, '.', '_' and '-'"
        )
    return None


def collides(image: MetadataImage, name: str) -> str | None:
    """The existing topic ``name`` collides with ('.' versus '_'), or None.

    A topic of exactly that name is not a collision; it already exists.
    """
    existing = image.unified_names.get(unify_collision_chars(name))
    if existing is None or existing == name:
        return None
    return existing
