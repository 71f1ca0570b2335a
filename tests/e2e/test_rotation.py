"""KEK rotation reaches stored models: rotate, re-wrap every model, disable the old version, load all.

Real step-ca, mTLS, SoftHSM2 and model store; the loads go through the attested release path (a
simulated SEV-SNP VM) and ONNX Runtime, as the inference service does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest
import yaml

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.artifact import ArtifactReader, parse_header, wipe
from strongroom.artifact.keybinding import body_key
from strongroom.cli.main import main
from strongroom.client.keyrelease import ReleasedDataKey
from strongroom.dev.devstack import DevStack, read_audit_records
from strongroom.dev.devstack.model import train
from strongroom.errors import StrongroomError
from tests.e2e.publishing import data_key, put_encrypted

KEY = "rotation-kek"
MODELS = ["rot/a", "rot/b", "rot/c"]
LEGACY = "rot/legacy"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, object]]]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.startswith('{"')]


def run_err(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The command's exit code and what it wrote to standard error."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def release(stack: DevStack, key_id: str, key_version: int, wrapped: bytes) -> ReleasedDataKey:
    """The data key in ``wrapped``, released to a simulated VM with the demo guest's
    measurement, which the stack's policies allow (the caller wipes it)."""
    return stack.release_client().release(key_id, key_version, wrapped)


def load(stack: DevStack, name: str, key_id: str = KEY) -> bytes:
    """Fetches, gets the key released to a simulated VM, decrypts and loads into ONNX Runtime
    (version 1 of ``name``; a format-1 artifact is accepted, as while migrating)."""
    inference = stack.identity("inference")
    store = store_grpc.ModelStoreServiceStub(stack.channel(inference, "modelstore"))
    data = b"".join(
        r.data for r in store.GetModel(store_pb.GetModelRequest(name=name, version="1"), timeout=30)
    )
    header = parse_header(data)
    released = release(stack, key_id, header.key_version, header.wrapped_dek)
    try:
        dek = body_key(header, released.dek, name, "1", accept_unbound=True)
    finally:
        wipe(released.dek)
    try:
        plaintext = bytes(ArtifactReader(data).decrypt_all(dek))
    finally:
        wipe(dek)
    ort.InferenceSession(plaintext, providers=["CPUExecutionProvider"])
    return plaintext


def publish_format_1(stack: DevStack, path: Path) -> None:
    """A legacy (format 1) artifact, as published before format 2 existed: its body is encrypted
    under the wrapped key itself (which publishers were given then; here released to a VM)."""
    key = data_key(stack, KEY, LEGACY)
    slot_key = release(stack, KEY, key.key_version, key.wrapped_data_key).dek
    put_encrypted(stack, path, LEGACY, KEY, key, format_version=1, dek=slot_key)


def test_rotate_rewrap_disable_and_every_model_loads(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = str(stack.write_client_config("admin"))
    publisher = str(stack.write_client_config("publisher"))
    stack.create_release_key(stack.identity("admin"), KEY, policy_version="rot-1")
    model = train(tmp_path / "model.onnx")
    expected = model.path.read_bytes()
    for name in MODELS:
        code = main(
            ["model", "publish", str(model.path), "--name", name, "--version", "1",
             "--key-id", KEY, "--no-progress", "--client-config", publisher]
        )  # fmt: skip
        assert code == 0
    publish_format_1(stack, model.path)
    capsys.readouterr()

    # Rotate and re-wrap: one progress line per model, then a summary.
    code, lines = run(capsys, "keys", "rotate", KEY, "--rewrap-models", "--client-config", admin)
    assert code == 0, lines
    by_name = {line["name"]: line for line in lines if "name" in line}
    for name in MODELS:
        assert by_name[name] == {
            "name": name,
            "version": "1",
            "outcome": "rewrapped",
            "from_version": 1,
            "to_version": 2,
            "reason": "",
        }
    assert by_name[LEGACY]["outcome"] == "format_1"
    assert lines[-1] == {"key_id": KEY, "current_version": 2, "rewrapped": 3, "format_1": 1}

    # A second run finds nothing left to do.
    code, lines = run(capsys, "keys", "rewrap-models", KEY, "--client-config", admin)
    assert code == 0
    assert lines[-1] == {"key_id": KEY, "current_version": 2, "current": 3, "format_1": 1}

    # Every re-wrap is in the broker's audit log, from version 1 to version 2.
    audit = stack.root / "state" / "keybroker" / "audit.log"
    rewraps = [
        r
        for r in read_audit_records(audit)
        if r.get("action") == "rewrap" and r["key"]["id"] == KEY
    ]
    assert len(rewraps) == 3
    assert all(
        r["decision"] == "allowed"
        and r["key"]["version"] == 2
        and r["claims"]["from_key_version"] == 1
        for r in rewraps
    )

    # Disabling version 1 is refused while the format-1 model needs it (a disabled version cannot
    # be enabled again); the refusal names that model only, and version 1 still serves it.
    code, err = run_err(capsys, "keys", "disable", KEY, "--version", "1", "--client-config", admin)
    assert code == 1
    assert "KEY_VERSION_IN_USE" in err and f"{LEGACY} 1 (version 1)" in err
    assert not any(f"{name} 1" in err for name in MODELS)
    assert load(stack, LEGACY) == expected

    # --force disables it: every re-wrapped model still loads; the format-1 one cannot.
    code, _ = run(
        capsys, "keys", "disable", KEY, "--version", "1", "--force", "--client-config", admin
    )
    assert code == 0
    for name in MODELS:
        assert load(stack, name) == expected
    with pytest.raises((grpc.RpcError, StrongroomError)) as info:
        load(stack, LEGACY)
    assert "KEY_VERSION_DISABLED" in str(info.value) or "DISABLED" in str(info.value)


def test_a_model_deleted_during_a_rewrap_run_is_gone_not_failed(stack: DevStack) -> None:
    """A model deleted between the listing and its re-wrap counted as failed, so a rotation run
    that raced an ordinary ``model rm`` exited 1."""
    from strongroom.client.rewrap import _rewrap_one

    admin = stack.identity("admin")
    listed = store_pb.ModelInfo(name="rot/deleted", version="1", key_id=KEY, key_version=1)
    result = _rewrap_one(
        store_grpc.ModelStoreServiceStub(stack.channel(admin, "modelstore")),
        kb_grpc.KeyBrokerServiceStub(stack.channel(admin, "keybroker")),
        listed,
        2,
        30,
    )
    assert (result.outcome, result.reason) == ("gone", "MODEL_NOT_FOUND")


def test_a_model_published_across_a_rotation_blocks_disable_until_it_is_rewrapped(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A publisher that got its data key before a rotation and uploads after the re-wrap run has
    listed the store leaves a model under the old version; ``keys disable`` of that version used
    to go through and make the model unloadable for good."""
    key_id, name = "span-kek", "span/model"
    admin = str(stack.write_client_config("admin"))
    stack.create_release_key(stack.identity("admin"), key_id, policy_version="span-1")
    model = train(tmp_path / "model.onnx")
    early = data_key(stack, key_id, name)
    assert early.key_version == 1

    code, lines = run(capsys, "keys", "rotate", key_id, "--rewrap-models", "--client-config", admin)
    assert (code, lines[-1]) == (0, {"key_id": key_id, "current_version": 2})

    assert put_encrypted(stack, model.path, name, key_id, early).key_version == 1

    code, err = run_err(
        capsys, "keys", "disable", key_id, "--version", "1", "--client-config", admin
    )
    assert code == 1
    assert "KEY_VERSION_IN_USE" in err and f"{name} 1 (version 1)" in err
    assert f"strongroom keys rewrap-models {key_id}" in err
    assert load(stack, name, key_id) == model.path.read_bytes()

    # Disabling every version is refused too, naming the same model.
    code, err = run_err(
        capsys, "keys", "disable", key_id, "--all-versions", "--client-config", admin
    )
    assert code == 1
    assert "KEY_VERSION_IN_USE" in err and f"{name} 1 (version 1)" in err

    # Re-wrapped, the model no longer needs version 1, and the disable goes through unforced.
    code, lines = run(capsys, "keys", "rewrap-models", key_id, "--client-config", admin)
    assert (code, lines[-1]) == (0, {"key_id": key_id, "current_version": 2, "rewrapped": 1})
    code, _ = run(capsys, "keys", "disable", key_id, "--version", "1", "--client-config", admin)
    assert code == 0
    assert load(stack, name, key_id) == model.path.read_bytes()


def test_disable_without_a_reachable_store_is_refused_unless_forced(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check fails closed: a store that cannot be listed stops the disable, saying how to
    proceed without the check."""
    key_id = "unchecked-kek"
    stack.create_release_key(stack.identity("admin"), key_id, policy_version="unchecked-1")
    config = yaml.safe_load(stack.write_client_config("admin").read_text())
    config["modelstore"] = "127.0.0.1:1"  # nothing listens there
    no_store = tmp_path / "client-admin-no-store.yaml"
    no_store.write_text(yaml.safe_dump(config))

    code, err = run_err(
        capsys, "keys", "disable", key_id, "--all-versions", "--client-config", str(no_store)
    )
    assert code == 1
    assert "cannot list the model store" in err and "--force" in err and "UNAVAILABLE" in err
    # A configuration without the store's address stops it the same way.
    del config["modelstore"]
    no_address = tmp_path / "client-admin-no-store-address.yaml"
    no_address.write_text(yaml.safe_dump(config))
    code, err = run_err(
        capsys, "keys", "disable", key_id, "--all-versions", "--client-config", str(no_address)
    )
    assert code == 1
    assert "cannot list the model store" in err and "no address for modelstore" in err
    admin = kb_grpc.KeyAdminServiceStub(stack.channel(stack.identity("admin"), "keybroker"))

    def states() -> list[int]:
        keys = admin.ListKeys(kb_pb.ListKeysRequest(), timeout=30).keys
        (key,) = [k for k in keys if k.key_id == key_id]
        return [v.state for v in key.versions]

    assert states() == [kb_pb.KEY_STATE_ENABLED]
    code, _ = run(
        capsys,
        "keys",
        "disable",
        key_id,
        "--all-versions",
        "--force",
        "--client-config",
        str(no_store),
    )
    assert code == 0
    assert states() == [kb_pb.KEY_STATE_DISABLED]


class _ReWrapThen:
    """The broker as the rotation client sees it, with ``then`` run right after each ReWrap
    answer: something happening to the store between the re-wrap and the slot replacement."""

    def __init__(self, broker: kb_grpc.KeyBrokerServiceStub, then: Callable[[], None]) -> None:
        self._broker = broker
        self._then = then

    def ReWrap(self, request: kb_pb.ReWrapRequest, timeout: float) -> kb_pb.ReWrapResponse:
        answer = self._broker.ReWrap(request, timeout=timeout)
        self._then()
        return answer


def test_a_model_replaced_during_its_rewrap_keeps_its_own_data_key(
    stack: DevStack, tmp_path: Path
) -> None:
    """The slot replacement was a compare-and-swap on the KEK version only. A model deleted and
    published again (same name and version, a fresh data key under the same old KEK version)
    between the rotation client's re-wrap and its ReplaceKeySlot received the *previous*
    artifact's data key: reported ``rewrapped``, it could never be loaded again (its own wrapped
    data key was gone with the replaced slot). The replacement is now conditional on the slot
    still holding the wrapped key that was re-wrapped: KEY_SLOT_CHANGED, the model untouched,
    and the next run re-wraps its own key."""
    from strongroom.client.rewrap import _rewrap_one, rewrap_models

    key_id, name = "race-kek", "race/model"
    stack.create_release_key(stack.identity("admin"), key_id, policy_version="race-1")
    model = train(tmp_path / "model.onnx")
    admin = stack.identity("admin")
    store = store_grpc.ModelStoreServiceStub(stack.channel(admin, "modelstore"))

    # Two data keys obtained before the rotation: one published now, one held by a publisher
    # that publishes after the rotation (both under KEK version 1).
    first, held = data_key(stack, key_id, name), data_key(stack, key_id, name)
    listed = put_encrypted(stack, model.path, name, key_id, first)
    admin_keys = kb_grpc.KeyAdminServiceStub(stack.channel(admin, "keybroker"))
    admin_keys.RotateKey(kb_pb.RotateKeyRequest(key_id=key_id), timeout=30)

    def republish() -> None:
        store.DeleteModel(store_pb.DeleteModelRequest(name=name, version="1"), timeout=30)
        assert put_encrypted(stack, model.path, name, key_id, held).key_version == 1

    racing = _ReWrapThen(kb_grpc.KeyBrokerServiceStub(stack.channel(admin, "keybroker")), republish)
    result = _rewrap_one(store, racing, listed, 2, 30)  # type: ignore[arg-type]
    assert (result.outcome, result.reason) == ("failed", "KEY_SLOT_CHANGED")
    assert load(stack, name, key_id) == model.path.read_bytes()
    results = list(
        rewrap_models(
            key_id,
            current_version=2,
            broker=stack.channel(admin, "keybroker"),
            store=stack.channel(admin, "modelstore"),
        )
    )
    assert [(r.name, r.outcome) for r in results] == [(name, "rewrapped")]
    assert load(stack, name, key_id) == model.path.read_bytes()


def test_only_an_admin_may_replace_a_key_slot(stack: DevStack, tmp_path: Path) -> None:
    """Over real mTLS: a publisher (who may ReWrap, and read every model) or an inference server
    cannot swap a stored model's key slot -- not even to a correct re-wrap of its own data key;
    the model is unchanged."""
    key_id, name = "slot-acl-kek", "acl/model"
    stack.create_release_key(stack.identity("admin"), key_id, policy_version="acl-1")
    model = train(tmp_path / "model.onnx")
    publisher = stack.identity("publisher")
    broker = kb_grpc.KeyBrokerServiceStub(stack.channel(publisher, "keybroker"))
    key = data_key(stack, key_id, name)
    stored = put_encrypted(stack, model.path, name, key_id, key)
    admin_keys = kb_grpc.KeyAdminServiceStub(stack.channel(stack.identity("admin"), "keybroker"))
    admin_keys.RotateKey(kb_pb.RotateKeyRequest(key_id=key_id), timeout=30)
    moved = broker.ReWrap(
        kb_pb.ReWrapRequest(key_id=key_id, key_version=1, wrapped_data_key=key.wrapped_data_key),
        timeout=30,
    )
    request = store_pb.ReplaceKeySlotRequest(
        name=name,
        version="1",
        expected_key_version=1,
        key_version=moved.key_version,
        wrapped_data_key=moved.wrapped_data_key,
    )
    for role in ("publisher", "inference"):
        store = store_grpc.ModelStoreServiceStub(stack.channel(stack.identity(role), "modelstore"))
        with pytest.raises(grpc.RpcError) as info:
            store.ReplaceKeySlot(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    admin_store = store_grpc.ModelStoreServiceStub(
        stack.channel(stack.identity("admin"), "modelstore")
    )
    after = admin_store.StatModel(store_pb.StatModelRequest(name=name, version="1"), timeout=30)
    assert after.model == stored


def test_a_model_published_while_its_version_is_disabled_is_reported(
    stack: DevStack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``keys disable``'s check lists the store, then disables: a model under that version whose
    upload completed in between (a publisher holding a data key from before the rotation) was
    missed, and the command said nothing -- the model was found unloadable only when an
    inference server tried. The check cannot be made atomic from the command line (the store
    accepts such uploads; a disabled version cannot be enabled again), so the command lists the
    store again once the version is disabled and fails naming every model that now needs it."""
    import strongroom.cli.keys as cli_keys

    key_id, name = "late-kek", "late/model"
    admin = str(stack.write_client_config("admin"))
    stack.create_release_key(stack.identity("admin"), key_id, policy_version="late-1")
    model = train(tmp_path / "model.onnx")
    held = data_key(stack, key_id, name)
    code, _ = run(capsys, "keys", "rotate", key_id, "--rewrap-models", "--client-config", admin)
    assert code == 0
    real = cli_keys.models_needing
    checks: list[int] = []

    def check_then_upload_lands(*args: object, **kwargs: object) -> object:
        found = real(*args, **kwargs)  # type: ignore[arg-type]
        if not checks:  # the upload completes right after the check listed the store
            assert put_encrypted(stack, model.path, name, key_id, held).key_version == 1
        checks.append(len(found.models))
        return found

    monkeypatch.setattr(cli_keys, "models_needing", check_then_upload_lands)
    code, err = run_err(
        capsys, "keys", "disable", key_id, "--version", "1", "--client-config", admin
    )
    assert code == 1
    assert "KEY_VERSION_IN_USE" in err and f"{name} 1 (version 1)" in err
    assert "disabled" in err and "re-publish" in err
    assert checks[0] == 0
