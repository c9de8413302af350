"""Pub/Sub's filter language as the layer parses it (https://cloud.google.com/pubsub/docs/subscription-message-filter)."""

from __future__ import annotations

import pytest

from dagster_gcf_pipes.local.production_semantics.filters import FilterError, compile_filter

ATTRIBUTES = {"domain": "com", "session": "group-1-shard-7", "iana.org/language_tag": "en", "empty": ""}


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("attributes:domain", True),
        ("attributes:missing", False),
        ("attributes:empty", True),
        ('attributes.domain = "com"', True),
        ('attributes.domain = "org"', False),
        ('attributes.domain != "org"', True),
        ('attributes.missing != "org"', True),  # != is true of a missing key
        ('hasPrefix(attributes.session, "group-1-")', True),
        ('hasPrefix(attributes.session, "group-2-")', False),
        ('hasPrefix(attributes.missing, "")', False),
        ('attributes:"iana.org/language_tag"', True),
        ('attributes."iana.org/language_tag" = "en"', True),
        ("NOT attributes:domain", False),
        ("NOT NOT attributes:domain", True),
        ('attributes:domain AND attributes.domain = "org"', False),
        ('attributes:missing OR attributes.domain = "com" OR attributes:other', True),
        ('attributes:domain AND (attributes.domain = "org" OR hasPrefix(attributes.session, "group"))', True),
        ('NOT (attributes:missing OR attributes:other)', True),
        ('attributes.domain = "\\x63om"', True),  # escapes in string literals
        ('  attributes.domain="com"  ', True),
        ("", True),  # no filter
    ],
)
def test_the_filter_language(text: str, matches: bool) -> None:
    predicate = compile_filter(text)
    assert (predicate is None or predicate(ATTRIBUTES)) is matches


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('attributes:a AND attributes:b OR attributes:c', "AND and OR mixed without parentheses"),
        ("-attributes:domain", "unary '-' is not supported"),
        ("attributes.domain = com", "string literal"),
        ("attributes.domain", "'=' or '!='"),
        ("data:domain", "expected attributes"),
        ("attributes:a attributes:b", "join conditions with AND or OR"),
        ('hasPrefix(attributes.a, "x"', "')' closing hasPrefix"),
        ("(attributes:a", "')'"),
        ('attributes.a = "x', "unexpected"),
        ("attributes:" + "k" * 250, "at most 256"),
    ],
)
def test_what_pubsub_refuses(text: str, problem: str) -> None:
    with pytest.raises(FilterError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        compile_filter(text)
