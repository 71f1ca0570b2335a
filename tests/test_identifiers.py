"""One model name/version grammar: what the artifact format and the store accept, inference can
load and unload, and the reverse (the example names of ARTIFACT_FORMAT.md included)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strongroom.artifact.errors import InvalidArtifact
from strongroom.artifact.format import build_header
from strongroom.errors import InvalidArgument
from strongroom.identifiers import (
    MAX_NAME_LENGTH,
    MAX_VERSION_LENGTH,
    validate_name,
    validate_version,
)
from strongroom.inference.models import ModelRepository

# Characters near the grammar's edges: its own alphabet, separators, whitespace, non-ASCII digits.
ALPHABET = st.sampled_from([*"aZ09._-+/ \n\t:@~é٣", "\x00"])
NAMES = st.one_of(
    st.text(ALPHABET, max_size=12),
    st.sampled_from(["acme/iris", "acme/classifier", "a" * MAX_NAME_LENGTH, "a" * 129, "abc\n"]),
)
VERSIONS = st.one_of(
    st.text(ALPHABET, max_size=10),
    st.sampled_from(["1.0+cpu", "1.4.0+build.7", "1" * MAX_VERSION_LENGTH, "1" * 65, "1\n"]),
)


def _accepts(check, value: str) -> bool:
    try:
        check(value)
    except (InvalidArgument, InvalidArtifact):
        return False
    return True


def _artifact_accepts(name: str, version: str) -> bool:
    try:
        build_header(
            model_name=name,
            model_version=version,
            content_type="application/onnx",
            key_id="k",
            key_version=1,
            wrapped_dek=b"\x00" * 40,
            plaintext_size=1,
        )
    except InvalidArtifact as exc:
        assert exc.reason in {"INVALID_MODEL_NAME", "INVALID_MODEL_VERSION"}, exc
        return False
    return True


def _inference_accepts(name: str, version: str) -> bool:
    repository = ModelRepository()
    try:
        repository.expect(name)
        repository.begin_load(name, version)
    except InvalidArgument:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(NAMES, VERSIONS)
def test_store_artifact_and_inference_agree(name: str, version: str) -> None:
    store = _accepts(validate_name, name) and _accepts(validate_version, version)
    assert _artifact_accepts(name, version) == store
    assert _inference_accepts(name, version) == store


@pytest.mark.parametrize(
    ("name", "version", "ok"),
    [
        ("acme/iris", "1.0+cpu", True),
        ("abc\n", "1", False),
        ("abc", "1\n", False),
        ("/abc", "1", False),
        ("abc/", "1", False),
        ("a" * MAX_NAME_LENGTH, "1" * MAX_VERSION_LENGTH, True),
        ("a" * (MAX_NAME_LENGTH + 1), "1", False),
        ("abc", "1" * (MAX_VERSION_LENGTH + 1), False),
        ("ab٣", "1", False),
    ],
)
def test_grammar_edges(name: str, version: str, ok: bool) -> None:
    assert (_accepts(validate_name, name) and _accepts(validate_version, version)) == ok
    assert _inference_accepts(name, version) == ok
