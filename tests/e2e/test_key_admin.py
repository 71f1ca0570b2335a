"""The key broker's non-release surface under a certified caller: policy documents, lifecycle
answers and the re-wrap metric, over real mTLS to a broker on a real SoftHSM2 token."""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.cli.main import main
from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.keybroker import lifecycle, refusals
from strongroom.keybroker.policies import PolicyStore
from strongroom.reasons import METADATA_KEY as REASON_TRAILER


def outcome(error: grpc.RpcError) -> tuple[str, str | None]:
    """(status code name, strongroom-reason) of a failed call."""
    assert isinstance(error, grpc.Call)
    metadata: Any = error.trailing_metadata() or ()
    return error.code().name, dict(metadata).get(REASON_TRAILER)


def admin(stack: DevStack) -> kb_grpc.KeyAdminServiceStub:
    return kb_grpc.KeyAdminServiceStub(stack.channel(stack.identity("admin"), "keybroker"))


@pytest.mark.parametrize(
    "document",
    [
        "version: 2026-02-30\n",  # an unquoted date that is no date: ValueError
        "version: " + "1" * 5000 + "\n",  # beyond Python's integer digit limit: ValueError
        "version: !!int abc\n",
        "version: !!bool abc\n",  # KeyError
        "version: !!timestamp abc\n",  # AttributeError
        "version: !!map [1]\n",  # TypeError
        "? [a]\n: b\n",  # a list as a mapping key: TypeError (unhashable)
        "sev_snp: {? {a: 1}: b}\n",
    ],
    ids=[
        "date",
        "long-int",
        "int-tag",
        "bool-tag",
        "timestamp-tag",
        "map-tag",
        "list-key",
        "map-key",
    ],
)
def test_a_policy_yaml_cannot_construct_is_invalid_argument_and_the_old_one_stays(
    stack: DevStack, caplog: pytest.LogCaptureFixture, document: str
) -> None:
    """PyYAML's constructors raise ValueError, TypeError, KeyError or AttributeError, not
    YAMLError, for such nodes: SetReleasePolicy answered INTERNAL (no reason, a generic message)
    and logged a traceback."""
    stub = admin(stack)
    key_id = "odd-policy"
    if not any(k.key_id == key_id for k in stub.ListKeys(kb.ListKeysRequest(), timeout=30).keys):
        stack.create_release_key(stack.identity("admin"), key_id, policy_version="kept")
    caplog.set_level(logging.INFO)
    with pytest.raises(grpc.RpcError) as raised:
        stub.SetReleasePolicy(
            kb.SetReleasePolicyRequest(key_id=key_id, policy_document=document), timeout=30
        )
    assert outcome(raised.value) == ("INVALID_ARGUMENT", "POLICY_SYNTAX")
    assert "quote it" in (raised.value.details() or "") or "mapping key" in (
        raised.value.details() or ""
    )
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    kept = stub.GetReleasePolicy(kb.GetReleasePolicyRequest(key_id=key_id), timeout=30)
    assert kept.policy_version == "kept"


@pytest.mark.parametrize(
    "version", ["v" * 257, "1\\n# approved by security"], ids=["long", "newline"]
)
def test_a_policy_version_the_audit_log_cannot_take_is_refused_as_the_policys_fault(
    stack: DevStack, version: str
) -> None:
    """The version goes into every audit record under the policy, which takes at most 256
    characters: a longer one was refused as AUDIT_RECORD_INVALID ("audit event: policy_version
    must be a short string"), and one in a policy directory managed by deployment configuration
    made every release under it fail so. A version with a line break was stored, and printed as
    it is by `strongroom keys get-policy` (its first line is a comment naming the version)."""
    stub = admin(stack)
    key_id = "policy-version"
    if not any(k.key_id == key_id for k in stub.ListKeys(kb.ListKeysRequest(), timeout=30).keys):
        stack.create_release_key(stack.identity("admin"), key_id, policy_version="kept")
    document = stack.simulated_policy("kept").replace('"kept"', f'"{version}"')
    with pytest.raises(grpc.RpcError) as raised:
        stub.SetReleasePolicy(
            kb.SetReleasePolicyRequest(key_id=key_id, policy_document=document), timeout=30
        )
    assert outcome(raised.value) == ("INVALID_ARGUMENT", "POLICY_BAD_VALUE")
    assert "policy version: must be at most 256 printable characters" in (
        raised.value.details() or ""
    )
    kept = stub.GetReleasePolicy(kb.GetReleasePolicyRequest(key_id=key_id), timeout=30)
    assert kept.policy_version == "kept"


_BROKEN = itertools.count(1)


@pytest.fixture
def broken_policy(stack: DevStack) -> Iterator[tuple[str, Path]]:
    """A key whose stored policy no longer loads (edited by hand in the policy directory); a new
    key for each test (keys outlive it in the session's broker)."""
    key_id = f"broken-policy-{next(_BROKEN)}"
    stack.create_release_key(stack.identity("admin"), key_id, policy_version="1")
    path = stack.root / "state" / "keybroker" / "policies" / f"{key_id}.yaml"
    path.write_text('version: ""\n')  # no longer a valid policy
    yield key_id, path
    path.unlink()


def test_a_stored_policy_that_no_longer_loads_does_not_fail_lifecycle_answers(
    stack: DevStack, broken_policy: tuple[str, Path]
) -> None:
    """KeyInfo carries the key's policy version, read after the change was made and audited: a
    policy that did not load made RotateKey and DisableKey answer INVALID_ARGUMENT for a change
    that had happened (an admin retrying rotated again), and ListKeys fail for every key."""
    key_id, _ = broken_policy
    stub = admin(stack)
    rotated = stub.RotateKey(kb.RotateKeyRequest(key_id=key_id), timeout=30).key
    assert (rotated.current_version, rotated.policy_version) == (2, "")
    disabled = stub.DisableKey(kb.DisableKeyRequest(key_id=key_id, version=1), timeout=30).key
    assert [v.state for v in disabled.versions] == [kb.KEY_STATE_DISABLED, kb.KEY_STATE_ENABLED]
    listed = {k.key_id: k for k in stub.ListKeys(kb.ListKeysRequest(), timeout=30).keys}
    assert listed[key_id].current_version == 2
    assert listed[key_id].policy_version == ""


def test_a_stored_policy_that_no_longer_loads_is_the_brokers_failed_precondition(
    stack: DevStack, broken_policy: tuple[str, Path]
) -> None:
    """GetReleasePolicy of a stored policy that no longer loads answered INVALID_ARGUMENT, as if
    the admin's request were wrong: it is the broker's configuration, with the loader's reason."""
    key_id, _ = broken_policy
    with pytest.raises(grpc.RpcError) as raised:
        admin(stack).GetReleasePolicy(kb.GetReleasePolicyRequest(key_id=key_id), timeout=30)
    assert outcome(raised.value) == (
        "FAILED_PRECONDITION",
        "POLICY_BAD_TYPE",
    )  # the loader's reason


def test_rewraps_refused_before_the_key_lookup_are_not_labelled_with_made_up_key_ids(
    stack: DevStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only KEY_NOT_FOUND dropped the caller's key id from the counter's labels, but a ReWrap
    with version 0 (the proto default) or a blob of the wrong length is refused before the HSM
    says whether the key exists: a publisher's made-up ids each became a label set, enough of
    them push the real keys' series into the SDK's overflow bucket."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    counter = provider.get_meter("test").create_counter("strongroom.keybroker.rewraps")
    monkeypatch.setattr(lifecycle, "DATA_KEYS_REWRAPPED", counter)
    stub = admin(stack)
    real = "rewrap-labels"
    stub.CreateKey(kb.CreateKeyRequest(key_id=real), timeout=30)
    publisher = kb_grpc.KeyBrokerServiceStub(
        stack.channel(stack.identity("publisher"), "keybroker")
    )
    requests = [
        kb.ReWrapRequest(key_id=f"made-up-{i}", key_version=0, wrapped_data_key=b"\x01" * 40)
        for i in range(3)
    ] + [
        kb.ReWrapRequest(key_id=f"made-up-short-{i}", key_version=1, wrapped_data_key=b"\x01")
        for i in range(3)
    ]
    requests.append(kb.ReWrapRequest(key_id=real, key_version=0, wrapped_data_key=b"\x01" * 40))
    for request in requests:
        with pytest.raises(grpc.RpcError) as raised:
            publisher.ReWrap(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    data = reader.get_metrics_data()
    labels = {
        str(dict(point.attributes or {}).get("key_id"))
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        for point in metric.data.data_points
    }
    assert not [label for label in labels if label.startswith("made-up")], labels
    assert labels == {"", real}  # counted, without the made-up ids; a real key keeps its label


def test_keys_set_policy_names_a_file_that_is_not_utf8_in_one_line(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``read_text`` raised UnicodeDecodeError, which the command line does not catch: a policy
    saved as UTF-16 (an editor's or a shell redirection's default) ended in a traceback."""
    policy = tmp_path / "policy.yaml"
    policy.write_bytes(stack.simulated_policy("1").encode("utf-16"))
    config = str(stack.write_client_config("admin"))
    code = main(["keys", "set-policy", "odd-policy", str(policy), "--client-config", config])
    err = capsys.readouterr().err
    assert code == 1
    assert "POLICY_SYNTAX" in err and "is not UTF-8 text" in err and str(policy) in err
    assert "Traceback" not in err


def test_keys_disable_names_the_versions_it_retires(
    stack: DevStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """``keys disable KEY`` with no ``--version`` disabled every version of the key — for good,
    since a disabled version cannot be enabled again — and with ``--force`` without even the
    store's check. Which versions must be said: ``--version N`` or ``--all-versions``; without
    either the command is refused before it connects, and the key stays enabled."""
    stack.create_release_key(stack.identity("admin"), "named-versions", policy_version="named-1")
    config = str(stack.write_client_config("admin"))
    argv = ["keys", "disable", "named-versions", "--force", "--client-config", config]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "--version" in err and "--all-versions" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main([*argv, "--version", "1", "--all-versions"])
    capsys.readouterr()
    stub = admin(stack)

    def states() -> list[int]:
        keys = stub.ListKeys(kb.ListKeysRequest(), timeout=30).keys
        (key,) = [k for k in keys if k.key_id == "named-versions"]
        return [v.state for v in key.versions]

    assert states() == [kb.KEY_STATE_ENABLED]
    assert main([*argv, "--all-versions"]) == 0
    assert states() == [kb.KEY_STATE_DISABLED]


@pytest.mark.parametrize("version", ["-1", str(2**32), "one"])
def test_keys_disable_refuses_a_version_outside_the_range_as_a_usage_error(
    stack: DevStack, capsys: pytest.CaptureFixture[str], version: str
) -> None:
    """``--version -1`` (or 2**32) parsed as an int, and building the request raised ValueError:
    a traceback, after the model store had been listed."""
    config = str(stack.write_client_config("admin"))
    argv = ["keys", "disable", "some-key", "--force", "--client-config", config]
    with pytest.raises(SystemExit) as exited:
        main([*argv, f"--version={version}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "--version" in err and "Traceback" not in err


def _pages(stub: kb_grpc.KeyAdminServiceStub, page_size: int) -> list[list[str]]:
    pages, token = [], ""
    while True:
        page = stub.ListKeys(kb.ListKeysRequest(page_size=page_size, page_token=token), timeout=30)
        pages.append([k.key_id for k in page.keys])
        token = page.next_page_token
        if not token:
            return pages


def test_keys_are_listed_in_pages(stack: DevStack) -> None:
    """ListKeys answered every key in one message, which the broker's 256 KiB send limit refused
    from about 4,000 keys on: no admin could list any key any more."""
    stub = admin(stack)
    made = [f"paged-{i}" for i in range(5)]
    for key_id in made:
        stub.CreateKey(kb.CreateKeyRequest(key_id=key_id), timeout=30)
    pages = _pages(stub, 2)
    listed = [key_id for page in pages for key_id in page]
    assert all(len(page) <= 2 for page in pages) and len(pages) >= 3
    assert listed == sorted(listed) and len(set(listed)) == len(listed)
    assert set(made) <= set(listed)
    assert listed == [k.key_id for k in stub.ListKeys(kb.ListKeysRequest(), timeout=30).keys]


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (kb.ListKeysRequest(page_size=-1), "INVALID_PAGE_SIZE"),
        (kb.ListKeysRequest(page_size=1001), "INVALID_PAGE_SIZE"),
        (kb.ListKeysRequest(page_token="Not A Key/../x"), "INVALID_PAGE_TOKEN"),
    ],
    ids=["negative", "too-large", "token"],
)
def test_a_bad_key_page_request_is_invalid_argument(
    stack: DevStack, request_: kb.ListKeysRequest, reason: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        admin(stack).ListKeys(request_, timeout=30)
    assert outcome(info.value) == ("INVALID_ARGUMENT", reason)


def test_a_publisher_flooding_refused_rewraps_is_rate_limited(stack: DevStack) -> None:
    """Last in this module: it spends the publisher's refusal budget on this stack's broker."""
    publisher = kb_grpc.KeyBrokerServiceStub(
        stack.channel(stack.identity("publisher"), "keybroker")
    )
    request = kb.ReWrapRequest(key_id="flood", key_version=1, wrapped_data_key=b"\x01")
    seen = []
    for _ in range(refusals.REFUSAL_BURST + 2):
        with pytest.raises(grpc.RpcError) as raised:
            publisher.ReWrap(request, timeout=30)
        seen.append(outcome(raised.value))
    assert seen[0] == ("INVALID_ARGUMENT", "WRAPPED_KEY_INVALID")
    assert seen[-1] == ("RESOURCE_EXHAUSTED", "REWRAP_REFUSALS_RATE_LIMITED")


def _audit(stack: DevStack) -> list[dict[str, Any]]:
    """The broker's audit records (read between two of its writes: tests poll the log while the
    broker writes it)."""
    return read_audit_records(stack.root / "state" / "keybroker" / "audit.log")


def test_a_policy_change_expecting_a_version_replaces_only_that_version(stack: DevStack) -> None:
    """Two admins both read version 1 and set their change: the second used to silently replace
    the first's. With expected_policy_version the second is refused POLICY_CHANGED, naming the
    live version, nothing is stored, and the refusal is in the audit log."""
    stub = admin(stack)
    stack.create_release_key(stack.identity("admin"), "cas-key", policy_version="1")
    read = stub.GetReleasePolicy(kb.GetReleasePolicyRequest(key_id="cas-key"), timeout=30)
    first = stack.simulated_policy("2-first")
    stub.SetReleasePolicy(
        kb.SetReleasePolicyRequest(
            key_id="cas-key",
            policy_document=first,
            expected_policy_version=read.policy_version,
        ),
        timeout=30,
    )
    second = stack.simulated_policy("2-second")
    with pytest.raises(grpc.RpcError) as raised:
        stub.SetReleasePolicy(
            kb.SetReleasePolicyRequest(
                key_id="cas-key",
                policy_document=second,
                expected_policy_version=read.policy_version,
            ),
            timeout=30,
        )
    assert outcome(raised.value) == ("FAILED_PRECONDITION", "POLICY_CHANGED")
    assert "is at version '2-first' now" in (raised.value.details() or "")
    live = stub.GetReleasePolicy(kb.GetReleasePolicyRequest(key_id="cas-key"), timeout=30)
    assert (live.policy_version, live.policy_document) == ("2-first", first)
    refused = _audit(stack)[-1]
    assert (refused["action"], refused["decision"], refused["reason"]) == (
        "set_release_policy",
        "denied",
        "POLICY_CHANGED",
    )
    assert refused["caller"]["spiffe_id"] == stack.spiffe_id("admin")
    assert (refused["key"]["id"], refused["policy_version"]) == ("cas-key", "2-second")
    assert refused["claims"] == {"expected_policy_version": "1", "live_policy_version": "2-first"}
    # Present but empty: the key must have no policy yet.
    with pytest.raises(grpc.RpcError) as raised:
        stub.SetReleasePolicy(
            kb.SetReleasePolicyRequest(
                key_id="cas-key", policy_document=second, expected_policy_version=""
            ),
            timeout=30,
        )
    assert outcome(raised.value) == ("FAILED_PRECONDITION", "POLICY_CHANGED")
    stub.CreateKey(kb.CreateKeyRequest(key_id="cas-new"), timeout=30)
    stub.SetReleasePolicy(
        kb.SetReleasePolicyRequest(
            key_id="cas-new", policy_document=first, expected_policy_version=""
        ),
        timeout=30,
    )
    # Unset: replaced whatever the live version (as before the field).
    stub.SetReleasePolicy(
        kb.SetReleasePolicyRequest(key_id="cas-key", policy_document=second), timeout=30
    )
    live = stub.GetReleasePolicy(kb.GetReleasePolicyRequest(key_id="cas-key"), timeout=30)
    assert live.policy_version == "2-second"


def test_keys_set_policy_if_version_refuses_a_policy_changed_meanwhile(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The workflow: get-policy, edit, set-policy --if-version (--if-no-policy for a new key)."""
    config = str(stack.write_client_config("admin"))
    assert main(["keys", "create", "cas-cli", "--client-config", config]) == 0
    policy = tmp_path / "policy.yaml"
    policy.write_text(stack.simulated_policy("1"))
    set_policy = ["keys", "set-policy", "cas-cli", str(policy), "--client-config", config]
    assert main([*set_policy, "--if-no-policy"]) == 0
    capsys.readouterr()
    assert main(["keys", "get-policy", "cas-cli", "--client-config", config]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# policy version 1\n")
    policy.write_text(shown.replace('"1"', '"2"'))  # the edit, on what get-policy printed
    assert main([*set_policy, "--if-version", "1"]) == 0
    capsys.readouterr()
    policy.write_text(stack.simulated_policy("3"))
    assert main([*set_policy, "--if-version", "1"]) == 1  # someone else's change is live
    err = capsys.readouterr().err
    assert "POLICY_CHANGED" in err and "is at version '2' now" in err
    assert "Traceback" not in err
    assert main([*set_policy, "--if-no-policy"]) == 1
    assert "POLICY_CHANGED" in capsys.readouterr().err
    assert main([*set_policy, "--if-version", "2"]) == 0


@pytest.mark.parametrize("gave_up", ["DEADLINE_EXCEEDED", "CANCELLED"])
def test_a_policy_change_whose_caller_gave_up_while_it_waited_for_the_lock_is_not_made(
    stack: DevStack, gave_up: str
) -> None:
    """SetReleasePolicy waited for the policy directory's lock (another replica's change, a
    holder stuck on NFS) past its caller's deadline and then wrote the policy anyway: the admin
    saw DEADLINE_EXCEEDED, concluded nothing changed, and a change nobody was waiting for went
    live. The broker now looks at the call while it waits for the lock and, once it holds it,
    just before its write: the caller is gone (its deadline passed, or it cancelled the call), so
    nothing is stored and the change's ALLOWED record is followed by a DENIED one, with that
    reason, under the same decision id."""
    stub = admin(stack)
    policies = stack.root / "state" / "keybroker" / "policies"
    holder = PolicyStore(policies, production=False)
    # The channel's TLS handshake, made outside the deadline below.
    stub.ListKeys(kb.ListKeysRequest(), timeout=30)

    def changes(key_id: str) -> list[dict[str, Any]]:
        return [
            r
            for r in _audit(stack)
            if r["action"] == "set_release_policy"
            and r["key"]["id"] == key_id
            and r["policy_version"] == "2"
        ]

    # The deadline must pass while the change waits for the lock, after the broker recorded it.
    # On a loaded machine (a 2-core CI runner at load 4, an fsync behind other writers) the
    # broker may take more than 5 s to get there, and the call end unrecorded: then the same
    # again, on a key of its own (the first call's change may still be recorded late), with
    # twice the deadline. What is proven of the change that was recorded is the same.
    # A cancellation comes at once, long before its call's deadline (one that came within
    # DEADLINE_TRANSIT of it would be taken as the deadline's).
    deadlines = (5, 10, 20, 40, 80) if gave_up == "DEADLINE_EXCEEDED" else (600,)
    for attempt, deadline in enumerate(deadlines):
        key_id = f"gave-up-{gave_up.lower().replace('_', '-')}-{attempt}"
        stack.create_release_key(stack.identity("admin"), key_id, policy_version="1")
        request = kb.SetReleasePolicyRequest(
            key_id=key_id, policy_document=stack.simulated_policy("2"), expected_policy_version="1"
        )
        with holder._changing(key_id, 30.0):  # another change holds the directory's lock
            call = stub.SetReleasePolicy.future(request, timeout=deadline)
            while not changes(key_id) and not call.done():  # recorded: it now waits for it
                time.sleep(0.02)
            if not changes(key_id):
                assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED, call.exception()
                continue
            if gave_up == "CANCELLED":
                assert call.cancel()
            else:
                assert isinstance(call.exception(), grpc.RpcError)  # its deadline passed
            assert call.code() == grpc.StatusCode[gave_up]
            break
    else:
        pytest.fail("the broker never recorded the change before the call's deadline")
    for _ in range(1500):  # the broker takes the lock now: until its change's outcome is in
        if len(changes(key_id)) > 1 or holder.get(key_id, judge=False).policy.version != "1":
            break
        time.sleep(0.02)
    live = stub.GetReleasePolicy(kb.GetReleasePolicyRequest(key_id=key_id), timeout=30)
    assert live.policy_version == "1"
    allowed, refused = changes(key_id)
    assert (allowed["decision"], refused["decision"], refused["reason"]) == (
        "allowed",
        "denied",
        gave_up,
    )
    assert refused["decision_id"] == allowed["decision_id"]


def test_keys_set_policy_sends_the_files_line_ends_as_they_are(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`keys set-policy` read the file with universal newlines: a CRLF policy (a Windows editor's,
    a Git checkout with autocrlf, what `get-policy` prints of a CRLF policy) was sent in its LF
    form, so the document stored, shown and hashed in the audit records (``policy_sha256``) was
    not the file the admin set, and the very file deployment tooling had put in the policy
    directory, set again through the command, was refused POLICY_VERSION_REUSED. The file's
    text is sent as it is."""
    key_id = "crlf-policy"
    stack.create_release_key(stack.identity("admin"), key_id, policy_version="1")
    config = str(stack.write_client_config("admin"))
    policies = stack.root / "state" / "keybroker" / "policies"
    policy = tmp_path / "policy.yaml"
    for version in ("2", "3"):
        text = stack.simulated_policy(version).replace("\n", "\r\n")
        policy.write_bytes(text.encode())
        if version == "2":  # deployment tooling put this very file there first
            (policies / f"{key_id}.yaml").write_bytes(text.encode())
        code = main(["keys", "set-policy", key_id, str(policy), "--client-config", config])
        assert code == 0, capsys.readouterr().err
        live = admin(stack).GetReleasePolicy(kb.GetReleasePolicyRequest(key_id=key_id), timeout=30)
        assert live.policy_document == text
        assert (policies / f"{key_id}.yaml").read_bytes() == text.encode()


_TERMINALS = {
    "ascii": {"PYTHONIOENCODING": "ascii"},
    "latin-1": {"PYTHONIOENCODING": "latin-1"},
    # LANG=C without the coercion to C.UTF-8 (PEP 538) or UTF-8 mode (PEP 540): ASCII.
    "C-locale": {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"},
    # A UTF-8 terminal (a container's usual C.UTF-8): the escaping must change nothing there.
    "UTF-8": {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"},
}


@pytest.mark.parametrize("terminal", sorted(_TERMINALS))
def test_the_cli_prints_what_the_terminal_cannot_encode_escaped(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str], terminal: str
) -> None:
    """On a terminal that is not UTF-8 (LANG=C, PYTHONIOENCODING=latin-1) a command printing a
    character its encoding lacks (a policy's description, a model name, a server's message)
    ended in a UnicodeEncodeError traceback, the rest of its output lost. Every command prints
    such characters as their Python escapes (``\\xe9``, ``\\u2713``), and the rest as it is."""
    key_id = f"terminal-{terminal.lower()}"
    config = str(stack.write_client_config("admin"))
    assert main(["keys", "create", key_id, "--client-config", config]) == 0
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        stack.simulated_policy("1") + 'description: "caf\u00e9 \u2713 \u6a21\u578b"\n',
        encoding="utf-8",
    )
    set_policy = ["keys", "set-policy", key_id, str(policy), "--client-config", config]
    assert main(set_policy) == 0, capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LC_ALL")}
    env.update(_TERMINALS[terminal])
    shown = subprocess.run(
        [sys.executable, "-m", "strongroom.cli.main", "keys", "get-policy", key_id,
         "--client-config", config],
        capture_output=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr.decode("ascii", "backslashreplace")
    assert b"Traceback" not in shown.stderr
    if terminal == "UTF-8":  # the broker's document byte for byte
        assert shown.stdout == b"# policy version 1\n" + policy.read_bytes() + b"\n"
        return
    escaped = "\\u2713 \\u6a21\\u578b"
    cafe = "caf\u00e9" if terminal == "latin-1" else "caf\\xe9"
    out = shown.stdout.decode("latin-1")
    assert out.startswith("# policy version 1\n")
    assert f'description: "{cafe} {escaped}"' in out
