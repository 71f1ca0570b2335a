"""What the command line takes from a server it cannot trust: text it prints, bytes it reads."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as pb_grpc
from strongroom.artifact import InvalidArtifact
from strongroom.cli import keys as keys_cli
from strongroom.cli import main as cli_main
from strongroom.cli._text import printable, printable_document
from strongroom.client.rewrap import MAX_HEAD_SIZE, _read_head
from tests.conftest import REPO
from tests.runtime.test_stopping import written_to_a_pipe


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("acme/model", "acme/model"),
        ("été", "été"),
        ("a\x1b]0;owned\x07b", "a\\x1b]0;owned\\x07b"),  # an OSC title sequence
        ("x\x1b[2J", "x\\x1b[2J"),  # clear screen
        ("col\tcol\nrow", "col\\tcol\\nrow"),  # forged columns and lines
        ("\u202eevil", "\\u202eevil"),  # right-to-left override
    ],
)
def test_printable_escapes_what_would_drive_a_terminal(text: str, shown: str) -> None:
    assert printable(text) == shown


class _Generous(pb_grpc.ModelStoreServiceServicer):
    """A model store that answers a range read with far more than was asked."""

    def GetModel(
        self, request: pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetModelResponse]:
        for _ in range(64):
            yield pb.GetModelResponse(data=bytes(request.length))


def test_a_rewrap_stops_reading_a_store_that_sends_more_than_asked() -> None:
    """The artifact head was joined from everything the store streamed: a store could grow the
    operator's memory without bound."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ModelStoreServiceServicer_to_server(_Generous(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            model = pb.ModelInfo(name="m", version="1", artifact_size=10 * MAX_HEAD_SIZE)
            with pytest.raises(InvalidArtifact, match="more than the"):
                _read_head(pb_grpc.ModelStoreServiceStub(channel), model, timeout=10)
    finally:
        server.stop(None)


def _get_policy_output(
    servicer: kb_grpc.KeyAdminServiceServicer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> str:
    """What `keys get-policy` prints from ``servicer``'s answer."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    kb_grpc.add_KeyAdminServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = kb_grpc.KeyAdminServiceStub(channel)
            monkeypatch.setattr(keys_cli, "_admin", lambda args: (contextlib.nullcontext(), stub))
            assert keys_cli._get_policy(argparse.Namespace(key_id="k1")) == 0
    finally:
        server.stop(None)
    return capsys.readouterr().out


class _Forging(kb_grpc.KeyAdminServiceServicer):
    """A broker whose policy answer carries terminal control sequences and forged lines."""

    def GetReleasePolicy(
        self, request: kb.GetReleasePolicyRequest, context: grpc.ServicerContext
    ) -> kb.GetReleasePolicyResponse:
        return kb.GetReleasePolicyResponse(
            policy_version="7\x1b[2K\r\n# approved by security",
            policy_document='version: "7"\r\nx: "\x1b]0;owned\x07\x9b2J"\n',
        )


def test_get_policy_prints_the_brokers_version_and_document_without_control_sequences(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys get-policy` printed the version a broker sent as it came: a broker that is not what
    it should be could drive the operator's terminal or forge the line that names the version the
    next `set-policy --if-version` is given. The document keeps every character a policy can hold
    (its CRLF line ends included), so that what is printed can be edited and set again."""
    out = _get_policy_output(_Forging(), monkeypatch, capsys)  # type: ignore[abstract]
    assert out.splitlines(keepends=True)[0] == (
        "# policy version 7\\x1b[2K\\r\\n# approved by security\n"
    )
    assert out.split("\n", 1)[1] == 'version: "7"\r\nx: "\\x1b]0;owned\\x07\\x9b2J"\n\n'


class _Stored(kb_grpc.KeyAdminServiceServicer):
    """A broker answering one stored policy document as it is."""

    def __init__(self, document: str) -> None:
        self.document = document

    def GetReleasePolicy(
        self, request: kb.GetReleasePolicyRequest, context: grpc.ServicerContext
    ) -> kb.GetReleasePolicyResponse:
        return kb.GetReleasePolicyResponse(policy_version="7", policy_document=self.document)


def test_get_policy_of_a_document_opening_with_a_byte_order_mark_prints_one_that_sets_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A policy saved with a UTF-8 byte order mark (Windows editors) is stored with it, which
    YAML allows only where a stream opens: printed after the version line, the output (what
    an admin saves, edits and sets again) was no YAML at all, refused POLICY_SYNTAX ("did not
    find expected <document start>"). The mark opens the output, before the version line, and
    the document follows byte for byte."""
    document = '\ufeffversion: "7"\r\ntee_types: [SEV_SNP]\n'
    out = _get_policy_output(_Stored(document), monkeypatch, capsys)  # type: ignore[abstract]
    assert out == f"\ufeff# policy version 7\n{document[1:]}\n"
    assert yaml.safe_load(out) == yaml.safe_load(document)


def test_printable_document_keeps_exactly_what_a_yaml_stream_may_hold() -> None:
    """Every code point: kept as it is when PyYAML's reader (the broker's loader) takes it in a
    document, so any stored policy prints byte for byte (tab, CR, LF, NEL, U+2028, BOM, astral
    characters), and otherwise shown as its escape (ESC, BEL, DEL, the C1 controls CSI, OSC and
    the rest, surrogates), so no escape sequence reaches the terminal."""
    reader = yaml.reader.Reader.NON_PRINTABLE
    kept = [cp for cp in range(0x110000) if printable_document(chr(cp)) == chr(cp)]
    assert kept == [cp for cp in range(0x110000) if not reader.match(chr(cp))]
    assert [cp for cp in range(0x80, 0xA0) if cp in set(kept)] == [0x85]  # NEL: a YAML line break
    assert printable_document("\x1b]8;;https://evil.example\x1b\\x\x1b]8;;\x1b\\") == (
        "\\x1b]8;;https://evil.example\\x1b\\x\\x1b]8;;\\x1b\\"
    )


class _OddHealth(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # grpc_health: untyped
    """Whatever answers a health port: refuses with a message of its choosing (``refuse``) or
    answers ``status``, a number the enum may not name."""

    def __init__(self, *, refuse: str | None = None, status: int = 0) -> None:
        self._refuse = refuse
        self._status = status

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if self._refuse is not None:
            context.abort(grpc.StatusCode.UNAVAILABLE, self._refuse)
        return health_pb2.HealthCheckResponse(status=self._status)  # type: ignore[arg-type]


@contextlib.contextmanager
def _health_port(servicer: health_pb2_grpc.HealthServicer) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize(
    ("servicer", "code", "out", "err"),
    [
        (
            # NOT_SERVING's own answer carries no text: the message comes with a refusal.
            _OddHealth(refuse="draining\x1b]0;owned\x07\x1b[2J\nSERVING"),
            1,
            "",
            "unhealthy: UNAVAILABLE: draining\\x1b]0;owned\\x07\\x1b[2J\\nSERVING\n",
        ),
        (
            _OddHealth(status=health_pb2.HealthCheckResponse.NOT_SERVING),
            1,
            "NOT_SERVING\n",
            "",
        ),
        (_OddHealth(status=health_pb2.HealthCheckResponse.SERVING), 0, "SERVING\n", ""),
        (
            _OddHealth(status=99),
            1,
            "",
            "unhealthy: the serving status 99 is none this command knows\n",
        ),
    ],
    ids=["refused-with-escapes", "not-serving", "serving", "unnamed-status"],
)
def test_health_prints_what_the_port_answered_without_control_sequences(
    capsys: pytest.CaptureFixture[str],
    servicer: _OddHealth,
    code: int,
    out: str,
    err: str,
) -> None:
    """``strongroom health`` printed the message of a refusal from whatever answered the health
    port as it came: an escape sequence in it drove the operator's terminal (here it sets the
    window title, clears the screen and forges a SERVING line). It is escaped now (printable),
    the exit status unchanged. A status number the enum does not name ended the command with a
    ValueError traceback: it is unhealthy, exit 1."""
    with _health_port(servicer) as address:
        assert cli_main.main(["health", "--address", address, "--timeout", "10"]) == code
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == (out, err)


# verdict: (what answers the port, the stream the verdict goes to, the exit status, its line).
_VERDICTS: dict[str, tuple[_OddHealth, str, int, str]] = {
    "refused": (_OddHealth(refuse="draining"), "stderr", 1, "unhealthy: UNAVAILABLE: draining"),
    "not-serving": (
        _OddHealth(status=health_pb2.HealthCheckResponse.NOT_SERVING),
        "stdout",
        1,
        "NOT_SERVING",
    ),
    "serving": (_OddHealth(status=health_pb2.HealthCheckResponse.SERVING), "stdout", 0, "SERVING"),
}


@pytest.mark.parametrize("full", [True, False], ids=["full", "read"])
@pytest.mark.parametrize("verdict", list(_VERDICTS))
def test_health_gives_its_verdict_with_a_full_output_pipe(verdict: str, full: bool) -> None:
    """``strongroom health`` printed its ``unhealthy:`` line (stderr) and the serving status
    (stdout, NOT_SERVING being the usual unhealthy verdict) with a blocking print: a health check
    whose output is a full pipe nobody reads (a collector that stopped) waited there for good
    and never gave its verdict. Each is written as the command line's error line is, at once or
    not at all: the exit status the same either way, the line written when the pipe is read."""
    servicer, stream, code, line = _VERDICTS[verdict]
    with _health_port(servicer) as address:

        def health(write_end: int) -> subprocess.Popen[bytes]:
            outputs = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
            outputs[stream] = write_end
            return subprocess.Popen(
                [sys.executable, "-m", "strongroom.cli.main", "health", "--address", address],
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                **outputs,
            )

        status, written = written_to_a_pipe(health, full=full)
    assert status == code
    assert written == ([] if full else [line])
