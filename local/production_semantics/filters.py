"""Pub/Sub's subscription filter language, parsed and applied as the service does.

"Filter messages from a subscription" (https://cloud.google.com/pubsub/docs/subscription-message-filter,
formerly https://cloud.google.com/pubsub/docs/filtering): a filter operates on a message's attributes only:

- ``attributes:KEY`` (the key is there), ``attributes.KEY = "v"``, ``attributes.KEY != "v"`` (also true when
  the key is missing), ``hasPrefix(attributes.KEY, "p")``;
- a key that is not made of letters, digits, ``-`` and ``_`` is written as a string literal
  (``attributes:"iana.org/language_tag"``); values are always string literals, with backslash escapes;
- ``NOT`` (binds tightest), ``AND``, ``OR`` in capitals, and parentheses; AND and OR are not mixed at one level
  ("to combine the AND and OR operators, use parentheses and complete expressions"); the unary ``-`` is not
  supported;
- at most 256 bytes; the filter cannot be changed after the subscription is created.

A filter that breaks these rules is refused at CreateSubscription with INVALID_ARGUMENT, as Pub/Sub does
(the emulator accepts anything). Google's own Go fake (``pstest/filtering.go``) evaluates the same forms.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

Predicate = Callable[[Mapping[str, str]], bool]

MAX_FILTER_BYTES = 256

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op>!=|[=:(),.])
      | (?P<word>[A-Za-z0-9_-]+)
    )""",
    re.VERBOSE | re.DOTALL,
)
_ESCAPE = re.compile(r"""\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|[0-7]{1,3}|.)""", re.DOTALL)
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


class FilterError(ValueError):
    """The filter is not in Pub/Sub's filter language (the message says where and why)."""


def _unescape(literal: str) -> str:
    def one(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape[0] in "xuU":
            return chr(int(escape[1:], 16))
        if escape[0].isdigit():
            return chr(int(escape, 8))
        return _SIMPLE_ESCAPES.get(escape, escape)

    return _ESCAPE.sub(one, literal[1:-1])


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, position) for each token: kind is ``string``, ``op`` or ``word``."""
    tokens, position = [], 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None:
            start = len(text) - len(text[position:].lstrip())
            raise FilterError(f"unexpected {text[start]!r} at position {start}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind), match.start(kind)))
        position = match.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokens(text)
        self.index = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _where(self) -> str:
        token = self._peek()
        return f"at position {token[2]} ({token[1]!r})" if token else "at the end of the filter"

    def _take(self, kind: str, text: str | None = None, expected: str = "") -> str:
        token = self._peek()
        if token is None or token[0] != kind or (text is not None and token[1] != text):
            raise FilterError(f"expected {expected or text or kind} {self._where()}")
        self.index += 1
        return token[1]

    def _at(self, kind: str, text: str) -> bool:
        token = self._peek()
        return token is not None and token[0] == kind and token[1] == text

    def parse(self) -> Predicate:
        predicate = self._expression()
        token = self._peek()
        if token is not None:
            raise FilterError(f"unexpected {token[1]!r} at position {token[2]}; join conditions with AND or OR")
        return predicate

    def _expression(self) -> Predicate:
        terms = [self._term()]
        joiner = None
        while self._at("word", "AND") or self._at("word", "OR"):
            word = self._take("word")
            if joiner is not None and word != joiner:
                raise FilterError(
                    f"AND and OR mixed without parentheses {self._where()}: Pub/Sub needs parentheses to combine them"
                )
            joiner = word
            terms.append(self._term())
        if joiner is None:
            return terms[0]
        if joiner == "AND":
            return lambda attributes: all(term(attributes) for term in terms)
        return lambda attributes: any(term(attributes) for term in terms)

    def _term(self) -> Predicate:
        if self._at("word", "NOT"):
            self._take("word")
            inner = self._term()
            return lambda attributes: not inner(attributes)
        if self._at("op", "("):
            self._take("op", "(")
            inner = self._expression()
            self._take("op", ")", "')'")
            return inner
        if self._at("word", "hasPrefix"):
            self._take("word")
            self._take("op", "(", "'(' after hasPrefix")
            key = self._member()
            self._take("op", ",", "',' between hasPrefix's arguments")
            prefix = _unescape(self._take("string", expected="a string literal (the prefix)"))
            self._take("op", ")", "')' closing hasPrefix")
            return lambda attributes: key in attributes and attributes[key].startswith(prefix)
        token = self._peek()
        if token is not None and token[0] == "word" and token[1].startswith("-"):
            raise FilterError(f"the unary '-' is not supported {self._where()}: use NOT")
        self._take("word", "attributes", "attributes, NOT, hasPrefix or '('")
        if self._at("op", ":"):
            self._take("op", ":")
            key = self._key()
            return lambda attributes: key in attributes
        self._take("op", ".", "'.' or ':' after attributes")
        key = self._key()
        if self._at("op", "="):
            negate = False
        elif self._at("op", "!="):
            negate = True
        else:
            raise FilterError(f"expected '=' or '!=' after attributes.{key} {self._where()}")
        self.index += 1
        value = _unescape(self._take("string", expected="a string literal (values are quoted)"))
        if negate:
            return lambda attributes: attributes.get(key) != value
        return lambda attributes: attributes.get(key) == value

    def _member(self) -> str:
        self._take("word", "attributes", "attributes.KEY")
        self._take("op", ".", "'.' after attributes")
        return self._key()

    def _key(self) -> str:
        token = self._peek()
        if token is not None and token[0] == "string":
            self.index += 1
            return _unescape(token[1])
        return self._take("word", expected="an attribute key")


def compile_filter(text: str) -> Predicate | None:
    """The predicate of a subscription filter over a message's attributes; None for no filter (everything).

    Raises ``FilterError`` for a filter Pub/Sub would refuse."""
    if not text.strip():
        return None
    if len(text.encode()) > MAX_FILTER_BYTES:
        raise FilterError(f"the filter is {len(text.encode())} bytes; Pub/Sub allows at most {MAX_FILTER_BYTES}")
    return _Parser(text).parse()
