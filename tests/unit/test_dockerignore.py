"""burla._dockerignore: a .dockerignore file's patterns, with Docker's semantics."""

from __future__ import annotations

import pytest

from burla._dockerignore import BadPatternError, IgnoreMatcher, clean_path

IGNORE_CASES = [
    # (.dockerignore lines, path, excluded?)
    (["*.pyc"], "a.pyc", True),
    (["*.pyc"], "pkg/a.pyc", False),  # "*" never crosses "/": a root-level pattern
    (["**/*.pyc"], "a.pyc", True),  # "**/" is zero or more directories
    (["**/*.pyc"], "pkg/sub/a.pyc", True),
    (["**/*.pyc"], "pkg/a.py", False),
    (["build/"], "build", True),
    (["build/"], "build/lib/x.so", True),  # everything under a matched directory
    (["build/"], "src/build", False),
    (["build"], "build", True),
    (["/build"], "build/x", True),  # a leading "/" is the context root
    (["/build"], "src/build", False),
    (["# build"], "build", False),  # a comment
    (["# build"], "# build", False),
    (["  # x"], "# x", True),  # only a "#" in column 1 starts a comment
    (["", "   ", "\ta.txt  "], "a.txt", True),  # blank lines skipped, whitespace trimmed
    (["a.txt\r", "b.txt\r"], "b.txt", True),  # CRLF line ends
    (["foo/**/bar"], "foo/bar", True),
    (["foo/**/bar"], "foo/a/b/bar", True),
    (["foo/**/bar"], "foo/a/bar/baz", True),
    (["foo/**/bar"], "foo/barn", False),
    (["foo/**"], "foo/x/y", True),
    (["foo/**"], "foo", False),  # the contents, not the directory
    (["**"], "any/path/at/all", True),
    (["**/node_modules"], "node_modules/x", True),
    (["**/node_modules"], "a/b/node_modules/c/d.js", True),
    (["*/temp*"], "somedir/temporary.txt", True),
    (["*/temp*"], "temp", False),
    (["*/temp*"], "a/b/temp", False),
    (["*/*/temp*"], "a/b/temp", True),
    (["temp?"], "tempa", True),
    (["temp?"], "temp", False),
    (["temp?"], "tempab", False),
    (["[a-c].txt"], "b.txt", True),
    (["[a-c].txt"], "d.txt", False),
    (["[^a-c].txt"], "d.txt", True),
    (["[^a-c].txt"], "a.txt", False),
    (["\\*.txt"], "*.txt", True),  # an escaped "*" is a "*"
    (["\\*.txt"], "a.txt", False),
    (["a/../b"], "b", True),  # patterns are cleaned like filepath.Clean
    (["./c//d/"], "c/d/e", True),
    (["*.md", "!README.md"], "README.md", False),  # "!" re-includes
    (["*.md", "!README.md"], "CHANGES.md", True),
    (["!README.md", "*.md"], "README.md", True),  # the last matching line wins
    (["docs", "!docs/keep.md"], "docs/keep.md", False),  # re-included from an excluded directory
    (["docs", "!docs/keep.md"], "docs/other.md", True),
    (["docs", "!docs/keep.md"], "docs", True),
    (["docs/", "!docs/keep/", "docs/keep/secret*"], "docs/keep/a.md", False),  # nested "!"
    (["docs/", "!docs/keep/", "docs/keep/secret*"], "docs/keep/secret.txt", True),
    (["docs/", "!docs/keep/", "docs/keep/secret*"], "docs/x.md", True),
    (["*", "!src"], "src/app/main.py", False),
    (["*", "!src"], "setup.py", True),
    (["**", "!**/*.py"], "a/b/c.py", False),
    (["**", "!**/*.py"], "a/b/c.txt", True),
    (["!a"], "a", False),
    ([".git"], ".git/objects/ab/cdef", True),
    (["*.log"], "logs", False),
]


@pytest.mark.parametrize(("lines", "path", "excluded"), IGNORE_CASES)
def test_dockerignore_patterns(lines: list[str], path: str, excluded: bool) -> None:
    assert IgnoreMatcher.from_text("\n".join(lines)).excluded(path) is excluded


def test_no_patterns_exclude_nothing() -> None:
    assert not IgnoreMatcher.from_text("").excluded("a/b")
    assert not IgnoreMatcher.from_text("\ufeff# only a comment\n\n").excluded("a")


@pytest.mark.parametrize("line", ["[", "[]", "[a-]", "[^]", "a\\", "!", "!  "])
def test_bad_patterns(line: str) -> None:
    with pytest.raises(BadPatternError, match="line 2"):
        IgnoreMatcher.from_text(f"ok\n{line}\n")


@pytest.mark.parametrize(
    ("lines", "directory", "expected"),
    [
        (["build", "!build/keep"], "build", True),
        (["build", "!src/keep"], "build", False),
        (["build"], "build", False),
        (["**", "!**/*.py"], "x/y", True),
        (["*", "!a/b/c"], "a/b", True),
        (["*", "!a/b/c"], "a/x", False),
    ],
)
def test_may_reinclude_under(lines: list[str], directory: str, expected: bool) -> None:
    assert IgnoreMatcher.from_text("\n".join(lines)).may_reinclude_under(directory) is expected


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [("", "."), ("a//b/", "a/b"), ("./a/./b", "a/b"), ("a/../..", ".."), ("/../a", "/a"), ("//a", "/a"), ("/", "/")],
)
def test_clean_path(path: str, cleaned: str) -> None:
    assert clean_path(path) == cleaned
