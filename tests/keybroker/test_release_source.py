"""The release library's source pinned to its version: ``_p11release.c`` cannot change its
behaviour without a bump of ``SR_P11RELEASE_VERSION`` (and ``RELEASE_CALLS_VERSION`` with it).

The version check at load (``p11direct.load_release_calls``) refuses a stale build only if the
number moved; nothing made anyone move it. Each version's source is recorded here by its SHA-256,
comments and whitespace aside (the rule in the C file: a change of comments or formatting alone
keeps the version), so an edit of the code that keeps the number fails this test and says what to
do.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from strongroom.keybroker import p11direct

#: ``SR_P11RELEASE_VERSION`` -> SHA-256 of that version's ``_p11release.c`` (see :func:`digest`).
#: A new version adds its line; the older ones stay, as the record of what each number meant.
SOURCE_SHA256 = {
    1: "a116b1f7f03081c0b891c38e6b90011267690aee2b7cc56f6a5c999c82e143e5",
    2: "b1e07a0e988cbd842b25784233a5a86df363be32c8c5386c87adb3169831c3f2",
}

SOURCE = Path(p11direct.__file__).with_name("_p11release.c")
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", flags=re.DOTALL)
_VERSION = re.compile(r"^#define SR_P11RELEASE_VERSION (\d+)$", flags=re.MULTILINE)


def digest(source: str) -> str:
    """SHA-256 of ``source`` without its comments, each run of whitespace one space.

    Lines are spliced first, as the compiler does before it sees comments: a ``//`` comment
    ending in a backslash goes on over the next line, which the compiler drops with it (only a
    warning), so a digest that kept that line would miss the edit that commented it out. Raises
    ``ValueError`` for a string or character literal left outside comments, which a comment
    marker in it would have cut: the file has none, and this digest does not parse them."""
    code = _COMMENT.sub(" ", source.replace("\\\n", ""))
    if '"' in code or "'" in code:
        raise ValueError(
            "_p11release.c has a string or character literal: digest() strips comments without "
            "parsing literals; teach it to before recording a hash"
        )
    return hashlib.sha256(" ".join(code.split()).encode()).hexdigest()


def drift(path: Path) -> str | None:
    """Why the C source at ``path`` does not match the hash recorded for its version (None when
    it does): the message tells the developer what to bump and what to record."""
    source = path.read_text()
    (number,) = (int(n) for n in _VERSION.findall(source))
    found = digest(source)
    recorded = SOURCE_SHA256.get(number)
    if recorded == found:
        return None
    here = "tests/keybroker/test_release_source.py"
    if recorded is None:
        return (
            f"{path.name} is version {number}, which has no recorded hash: record "
            f'`{number}: "{found}"` in SOURCE_SHA256 ({here})'
        )
    bumped = max(SOURCE_SHA256) + 1
    return (
        f"{path.name} changed (sha256 of its code, comments and whitespace aside, is {found}; "
        f"version {number} was {recorded}) but SR_P11RELEASE_VERSION did not: a library built "
        f"from the old source would load as if it were this one. Bump SR_P11RELEASE_VERSION in "
        f"services/keybroker/_p11release.c and RELEASE_CALLS_VERSION in "
        f'services/keybroker/p11direct.py to {bumped}, and record `{bumped}: "{found}"` in '
        f"SOURCE_SHA256 ({here})"
    )


def test_the_release_librarys_source_is_the_one_recorded_for_its_version() -> None:
    problem = drift(SOURCE)
    assert problem is None, problem


def test_the_recorded_versions_end_at_the_one_the_code_expects() -> None:
    # A bump recorded here but not made in p11direct (or the reverse) is caught by
    # test_p11direct's check of the two constants; this one keeps the record's history whole.
    assert max(SOURCE_SHA256) == p11direct.RELEASE_CALLS_VERSION
    assert sorted(SOURCE_SHA256) == list(range(1, max(SOURCE_SHA256) + 1))


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A copy of the real source to edit (the real file is never touched)."""
    copy = tmp_path / "_p11release.c"
    shutil.copyfile(SOURCE, copy)
    return copy


def test_a_change_of_the_code_without_a_bump_fails_and_says_what_to_do(scratch: Path) -> None:
    source = scratch.read_text()
    # A behaviour change a caller could tell apart: the step a wrong length reports.
    edited = source.replace("SR_WRONG_LENGTH = 2,", "SR_WRONG_LENGTH = 9,")
    assert edited != source
    scratch.write_text(edited)
    problem = drift(scratch)
    assert problem is not None
    bumped = max(SOURCE_SHA256) + 1
    assert "SR_P11RELEASE_VERSION did not" in problem
    assert f"RELEASE_CALLS_VERSION in services/keybroker/p11direct.py to {bumped}" in problem
    assert f'`{bumped}: "{digest(edited)}"`' in problem


def test_a_bump_without_a_recorded_hash_says_what_to_record(scratch: Path) -> None:
    source = scratch.read_text()
    number = p11direct.RELEASE_CALLS_VERSION
    edited = source.replace(
        f"#define SR_P11RELEASE_VERSION {number}\n", f"#define SR_P11RELEASE_VERSION {number + 1}\n"
    ).replace("SR_WRONG_LENGTH = 2,", "SR_WRONG_LENGTH = 9,")
    scratch.write_text(edited)
    assert drift(scratch) == (
        f"_p11release.c is version {number + 1}, which has no recorded hash: record "
        f'`{number + 1}: "{digest(edited)}"` in SOURCE_SHA256 '
        "(tests/keybroker/test_release_source.py)"
    )


def test_comments_and_formatting_alone_keep_the_version(scratch: Path) -> None:
    source = scratch.read_text()
    edited = source.replace("/* SR_P11RELEASE_VERSION;", "/* The library's version;").replace(
        "    ck_ulong key = 0,", "    ck_ulong  key = 0,\n       "
    )
    assert edited != source
    scratch.write_text(edited)
    assert drift(scratch) is None


def test_a_line_a_comment_swallows_is_a_change_of_the_code(scratch: Path) -> None:
    # A `//` comment ending in a backslash goes on over the next line (the compiler splices lines
    # before it removes comments, and only warns): the assignment below is gone from the build.
    # The digest kept that line as code and saw no change.
    source = scratch.read_text()
    edited = source.replace(
        "            *step = SR_STATE_CHANGED;\n",
        "            // the caller judges what was read \\\n            *step = SR_STATE_CHANGED;\n",
    )
    assert edited != source
    scratch.write_text(edited)
    problem = drift(scratch)
    assert problem is not None and "SR_P11RELEASE_VERSION did not" in problem


@pytest.mark.parametrize("literal", ['"a // b"', "'/'"])
def test_a_literal_the_digest_cannot_read_is_refused(scratch: Path, literal: str) -> None:
    # A comment marker inside a literal would cut it short: the rest of the literal, changed,
    # would go unseen. The file has no literal; one added must first be parsed by digest().
    source = scratch.read_text()
    edited = source.replace("    ck_ulong i;\n", f"    ck_ulong i;\n    (void){literal};\n")
    assert edited != source
    scratch.write_text(edited)
    with pytest.raises(ValueError, match="string or character literal"):
        drift(scratch)
