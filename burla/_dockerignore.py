"""A ``.dockerignore`` file's patterns, matched with Docker's semantics (see `IgnoreMatcher`).

Each pattern is cleaned like Go's ``filepath.Clean`` (`clean_path`), globs follow Go's
``filepath.Match`` plus ``**``, and the last pattern matching a path or one of its parents
decides. Pure logic, no file system access: the build context (`_build_context`) walks the
files and asks the matcher which to leave out.

Standard library only: it runs in the user's process.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable


def clean_path(path: str) -> str:
    """Lexically clean a "/"-separated path, as Go's filepath.Clean does.

    Repeated and trailing separators and "." elements go, and "x/.." pairs
    cancel; ".." above a rooted path is dropped. "" becomes ".".
    """
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


class BadPatternError(ValueError):
    pass


def _char(c: str) -> str:
    """`c` as a regular expression atom that is safe inside a class."""
    return f"\\U{ord(c):08x}"


def _glob_segment(seg: str) -> str:
    """The regular expression of one glob segment (no "/" in it).

    `*` is any run of characters but "/", `?` one character but "/",
    `[...]`/`[^...]` a class of characters and ranges (never "/"), `\\x` the
    character x. A `**` inside a segment (as in `foo**`) is any run of
    characters, "/" included, as in Docker.
    """
    out: list[str] = []
    i, n = 0, len(seg)
    while i < n:
        c = seg[i]
        if c == "*":
            j = i
            while j < n and seg[j] == "*":
                j += 1
            out.append(".*" if j - i > 1 else "[^/]*")
            i = j
            continue
        if c == "?":
            out.append("[^/]")
        elif c == "\\":
            if i + 1 >= n:
                raise BadPatternError("a trailing backslash escapes nothing")
            i += 1
            out.append(re.escape(seg[i]))
        elif c == "[":
            regex, i = _glob_class(seg, i + 1)
            out.append(regex)
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _glob_class(seg: str, i: int) -> tuple[str, int]:
    """Parse a class whose "[" ends just before `i`: its regex, and the index after its "]".

    Go's syntax: an optional "^" negates; then one or more characters or
    ranges lo-hi, each maybe escaped with "\\"; an unescaped "-" or "]" where
    a character is expected is an error (so "[]" and "[a-]" are).
    """
    n = len(seg)

    def char_at(k: int) -> tuple[str, int]:
        if k >= n:
            raise BadPatternError("a [ class is not closed")
        c = seg[k]
        if c in "-]":
            raise BadPatternError(f"unexpected {c!r} in a [ class (escape it with a backslash)")
        if c == "\\":
            k += 1
            if k >= n:
                raise BadPatternError("a [ class is not closed")
            c = seg[k]
        return c, k + 1

    negated = i < n and seg[i] == "^"
    if negated:
        i += 1
    ranges: list[str] = []
    count = 0
    while True:
        if i < n and seg[i] == "]" and count:
            i += 1
            break
        lo, i = char_at(i)
        hi = lo
        if i < n and seg[i] == "-":
            hi, i = char_at(i + 1)
        count += 1
        if lo <= hi:  # a reversed range is allowed and matches nothing, as in Go
            ranges.append(f"{_char(lo)}-{_char(hi)}")
    body = "".join(ranges)
    if negated:
        return f"[^/{body}]", i
    return (f"(?!/)[{body}]" if body else "(?!)"), i


@dataclasses.dataclass(frozen=True)
class _Pattern:
    text: str  # cleaned, without its "!"
    negated: bool
    regex: re.Pattern[str]  # matches a whole "/"-separated relative path
    segments: tuple[re.Pattern[str] | None, ...]  # per segment; None for one holding "**"


def _compile(text: str, negated: bool) -> _Pattern:
    segs = text.split("/")
    parts: list[str] = []
    last = len(segs) - 1
    for i, seg in enumerate(segs):
        if i and segs[i - 1] != "**":  # a "**/" before brings its own "/"
            parts.append("/")
        if seg == "**":
            # "**/" is zero or more directories; a final "**" is anything (so "a/**" is all under a, not a)
            parts.append(".*" if i == last else "(?:.*/)?")
        else:
            parts.append(_glob_segment(seg))
    seg_regexes = tuple(None if "**" in s else re.compile(_glob_segment(s), re.DOTALL) for s in segs)
    return _Pattern(text, negated, re.compile("".join(parts), re.DOTALL), seg_regexes)


class IgnoreMatcher:
    """The patterns of a ``.dockerignore`` file, with Docker's semantics.

    One pattern a line. A line whose first character is "#" is a comment;
    surrounding whitespace is trimmed and blank lines are skipped. "!" in
    front re-includes. Each pattern is cleaned like Go's filepath.Clean (so a
    trailing "/" goes, and "build/" matches a file or directory named build)
    and a leading "/" is dropped: patterns are relative to the context root.
    Globs follow Go's filepath.Match (`*`, `?`, `[...]`, `\\`), plus `**`,
    which as a whole segment matches any number of directories, zero
    included. A pattern that matches a directory matches everything under it.
    Patterns apply in order and the last that matches a path or one of its
    parent directories decides, so ``docs`` then ``!docs/keep.md`` sends
    only docs/keep.md from docs.
    """

    def __init__(self, lines: Iterable[str] = ()) -> None:
        """Parse `lines`, those of a .dockerignore; raises BadPatternError naming the bad line."""
        self.patterns: list[_Pattern] = []
        for number, line in enumerate(lines, 1):
            try:
                pattern = self._parse_line(line.removesuffix("\r"))
            except BadPatternError as e:
                raise BadPatternError(f"line {number}, {line.strip()!r}: {e}") from None
            if pattern is not None:
                self.patterns.append(pattern)
        self.reincludes = [p for p in self.patterns if p.negated]

    @classmethod
    def from_text(cls, text: str) -> IgnoreMatcher:
        """Parse the text of a whole .dockerignore file."""
        return cls(text.removeprefix("\ufeff").split("\n"))

    @staticmethod
    def _parse_line(line: str) -> _Pattern | None:
        if line.startswith("#"):
            return None
        text = line.strip()
        if not text:
            return None
        negated = text.startswith("!")
        if negated:
            text = text[1:].strip()
            if not text:
                raise BadPatternError('"!" alone re-includes nothing')
        text = clean_path(text)
        if len(text) > 1 and text.startswith("/"):
            text = text[1:]
        return _compile(text, negated)

    def excluded(self, path: str) -> bool:
        """Whether the relative "/"-separated `path` is left out of the context."""
        if not self.patterns:
            return False
        parts = path.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # its parents, then itself
        matched = False
        for pattern in self.patterns:
            if pattern.negated != matched:
                continue  # cannot change the outcome
            if any(pattern.regex.fullmatch(c) for c in candidates):
                matched = not pattern.negated
        return matched

    def may_reinclude_under(self, directory: str) -> bool:
        """Whether some "!" pattern might re-include a path under `directory`.

        Never false when one could: an excluded directory for which this is
        false is not walked at all.
        """
        parts = directory.split("/")
        for pattern in self.reincludes:
            for i, name in enumerate(parts):
                if i >= len(pattern.segments):
                    return True  # it matches a parent of the directory
                seg = pattern.segments[i]
                if seg is None:
                    return True  # a "**" can reach anywhere below
                if not seg.fullmatch(name):
                    break
            else:
                return True
        return False
