"""AMQP topic binding keys as PostgreSQL regular expressions.

A routing key is matched as ``'.' || routing_key ~ pattern``: with the dot
prepended, every word is introduced by a dot, which makes ``#`` (zero or
more words) easy to express.
"""

from __future__ import annotations

import re


def topic_pattern(binding_key: str) -> str:
    parts = []
    for word in binding_key.split("."):
        if word == "#":
            parts.append(r"(\.[^.]*)*")
        elif word == "*":
            parts.append(r"\.[^.]*")
        else:
            # re.escape puts a backslash before every non-alphanumeric
            # character, which PostgreSQL's regex flavour also reads as a literal.
            parts.append(r"\." + re.escape(word))
    return "^" + "".join(parts) + "$"
