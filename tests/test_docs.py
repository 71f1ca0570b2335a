"""The operator docs name only what exists: every `strongroom` command and flag they show parses
with the real command line, and every reason code they name in backticks is in the catalogue.

Operators copy these commands and alert on these codes; a renamed flag or a code that no service
sends fails silently in their hands, so it fails here instead.
"""

from __future__ import annotations

import argparse
import ast
import re
import textwrap
from collections.abc import Iterator

import pytest
import yaml

from strongroom.cli.main import build_parser
from strongroom.inference.config import InferenceConfig
from strongroom.keybroker.config import KeybrokerConfig
from strongroom.modelstore.config import ModelstoreConfig
from strongroom.reasons import Reason
from strongroom.runtime.config import build
from tests.conftest import REPO

DOCS = (
    "README.md",
    "deploy/README.md",
    "services/keybroker/POLICY.md",
    "pki/README.md",
    "strongroom/artifact/ARTIFACT_FORMAT.md",
)

# UPPER_SNAKE names the docs put in backticks that are not reason codes: gRPC status codes and
# audit outcomes (the status names are also catalogue members where services send them), PKCS#11,
# kernel, glibc and gRPC names, environment variables, protobuf enum values and TEE names.
NOT_REASONS = frozenset(
    {
        "AEAD_AES_256_GCM",
        "ALLOWED",
        "BODY_ENCRYPTION_C2SP_CHUNKED_AES_256_GCM_HKDF_SHA512",
        "BOOL",
        "BYTES",
        "CKA_ALWAYS_SENSITIVE",
        "CKA_LOCAL",
        "CKA_NEVER_EXTRACTABLE",
        "CKA_PRIVATE",
        "CKA_UNWRAP",
        "CKA_WRAP",
        "CKR_DEVICE_ERROR",
        "CKR_GENERAL_ERROR",
        "DEADLINE_EXCEEDED",
        "DENIED",
        "EACCES",
        "EFBIG",
        "EINVAL",
        "EIO",
        "ENOLCK",
        "ENOSPC",
        "ESTALE",
        "FAILED",
        "FILES",
        "F_OFD_SETLK",
        "F_SETLEASE",
        "GLIBC_TUNABLES",
        "GOAWAY",
        "GRPC_EXPERIMENTS",
        "GRPC_SSL_CIPHER_SUITES",
        "GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE",
        "GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY",
        "HEALTHCHECK",
        "HOME",
        "HTTPS_PROXY",
        "MADV_DONTNEED",
        "MADV_POPULATE_WRITE",
        "MAX_SPARES_PER_PART",
        "MIGRATABLE",
        "MR_SERVICETD",
        "NET_BIND_SERVICE",
        "NOT_SERVING",
        "OK",
        "ONNX_EXTERNAL_DATA",
        "ORT_LOAD_CONFIG_FROM_MODEL",
        "PIPE_BUF",
        "PYTHONUNBUFFERED",
        "RLIMIT_CORE",
        "RLIMIT_FSIZE",
        "SERVICE_ENV",
        "SERVING",
        "SEV_SNP",
        "SIGHUP",
        "SPARE_WRITERS",
        "STEPPATH",
        "STORE_CHANNEL_OPTIONS",
        "STRONGROOM_BENCH_BROKERSOAK_RELEASES",
        "STRONGROOM_INFERENCE_BIND",
        "STRONGROOM_INFERENCE_PORT",
        "STRONGROOM_RELEASE_SIGNING_CERT_DAYS",
        "STRONGROOM_TOKEN_LIFETIME",
        "TDX",
        "TLS_AES_256_GCM_SHA384",
        "VCEK",
        "VLEK",
        "WRAP_MECHANISM_AES_KEY_WRAP_PAD",
        "WRONG_VERSION_NUMBER",
    }
)

# Where a `strongroom` invocation starts in a shell line: the line's start, after a pipe, `;`,
# `&&`, `(` or kubectl's `--`, with an optional path (`.venv/bin/strongroom`).
_INVOCATION = re.compile(r"(?:^|[|;(]|&&|\s--)\s*(?:[\w./-]*/)?strongroom\s+(?P<rest>.*)")
# The compose stack's tool containers run `strongroom` as their entrypoint.
_COMPOSE_TOOL = re.compile(
    r"docker-compose run --rm (?:-T )?(?:admin|publisher|client)\s+(?P<rest>[a-z].*)"
)
_SHELL_END = {"|", ";", "&&", ">", "<", "#", ")", "2>&1"}


def _doc(name: str) -> str:
    return (REPO / name).read_text(encoding="utf-8")


def _snippets(text: str) -> Iterator[str]:
    """Shell lines of the code blocks (continuations joined) and inline code spans."""
    blocks = re.findall(r"```[\w-]*\n(.*?)```", text, flags=re.S)
    for block in blocks:
        yield from re.sub(r"\\\n\s*", " ", block).splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        yield " ".join(span.split())


def _invocations(text: str) -> Iterator[tuple[str, list[str]]]:
    """(the snippet, the words after `strongroom` up to the end of its command)."""
    for snippet in _snippets(text):
        for pattern in (_INVOCATION, _COMPOSE_TOOL):
            for match in pattern.finditer(snippet):
                words = []
                for word in match.group("rest").split():
                    if word in _SHELL_END or word.startswith(("#", ">", "2>")):
                        break
                    words.append(word)
                yield snippet, words


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _check(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """What in ``words`` the parser does not know: subcommands (`a|b` alternatives each), then
    the options of the command they reach."""
    if not words:
        return ["no command: `strongroom` alone"]
    problems: list[str] = []
    path: list[str] = []
    for index, word in enumerate(words):
        choices = _subcommands(parser)
        if not choices:
            break
        alternatives = word.split("|")
        unknown = [a for a in alternatives if a not in choices]
        if unknown:
            problems.append(f"no command `strongroom {' '.join([*path, unknown[0]])}`")
            return problems
        if len(alternatives) > 1:
            return problems  # a list of commands: nothing after it belongs to one of them
        parser = choices[word]
        path.append(word)
        if index == len(words) - 1:
            return problems
    for word in words:
        flag = re.match(r"\[?(--[a-z][a-z0-9-]*)", word)
        if flag and flag.group(1) not in _flags(parser):
            problems.append(f"`strongroom {' '.join(path)}` has no option {flag.group(1)}")
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_every_strongroom_command_and_option_in_the_docs_exists(doc: str) -> None:
    parser = build_parser()
    checked = 0
    problems = []
    for snippet, words in _invocations(_doc(doc)):
        checked += 1
        problems += [f"{problem}: {snippet}" for problem in _check(parser, words)]
    assert problems == []
    if doc != "strongroom/artifact/ARTIFACT_FORMAT.md":
        assert checked >= 3, f"{doc}: the command scan found {checked} commands"


def test_the_command_check_sees_a_wrong_command_and_option() -> None:
    parser = build_parser()
    assert _check(parser, ["keys", "disable", "KEY", "--version", "2"]) == []
    assert _check(parser, ["keys", "retire", "KEY"]) == ["no command `strongroom keys retire`"]
    assert _check(parser, []) == ["no command: `strongroom` alone"]
    assert _check(parser, ["keys", "disable", "KEY", "--versions", "2"]) == [
        "`strongroom keys disable` has no option --versions"
    ]
    assert list(_invocations("```sh\nkubectl exec P -- strongroom attest verify E --at T\n```"))


def _audit_verify_findings() -> set[str]:
    """The findings `strongroom audit verify` reports (a vocabulary of its own, not reasons)."""
    tree = ast.parse((REPO / "services/keybroker/audit_verify.py").read_text(encoding="utf-8"))
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and re.fullmatch(r"[A-Z]+(?:_[A-Z]+)+", node.args[0].value)
    }


@pytest.mark.parametrize("doc", DOCS)
def test_every_reason_code_the_docs_name_is_catalogued(doc: str) -> None:
    """A code span made only of UPPER_SNAKE words (`PERMISSION_DENIED CALLER_NOT_ALLOWED`) names
    reasons; each must be in strongroom/reasons.py unless it is a known name of something else."""
    known = set(Reason.__members__) | NOT_REASONS | _audit_verify_findings()
    prose = re.sub(r"```.*?```", "", _doc(doc), flags=re.S)
    unknown = set()
    for span in re.findall(r"`([^`]+)`", prose):
        words = span.split()
        if words and all(
            re.fullmatch(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|[A-Z]{2,}", w) for w in words
        ):
            unknown |= {w for w in words if w not in known}
    assert sorted(unknown) == []


def test_the_service_configuration_examples_load() -> None:
    """A ```yaml block of the docs with a service's section (README's S3 store, say) builds with
    that service's real configuration class: an unknown or mistyped key is an error there.
    Blocks fenced ```yaml helm-values are the chart's values, not a service's configuration."""
    sections: dict[str, type] = {
        "keybroker": KeybrokerConfig,
        "modelstore": ModelstoreConfig,
        "inference": InferenceConfig,
    }
    loaded = 0
    for doc in DOCS:
        for block in re.findall(r"```ya?ml\n(.*?)```", _doc(doc), flags=re.S):
            data = yaml.safe_load(textwrap.dedent(block))
            for name, section in data.items() if isinstance(data, dict) else ():
                if name in sections:
                    build(sections[name], section, f"{doc}: {name}")
                    loaded += 1
    assert loaded >= 1
