"""Key lifecycle: creation, rotation, disabling, metadata in the HSM, KEK sensitivity, replicas."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pkcs11.exceptions as p11x
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11._pkcs11 import UnwrapMixin  # type: ignore[attr-defined]

from strongroom.dev.softhsm import SoftHsmToken
from strongroom.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from strongroom.keybroker import _kek
from strongroom.keybroker.hsm import Hsm, HsmSession
from strongroom.keybroker.keys import ALL_VERSIONS, KeyManager, KeyState
from strongroom.oaep import OaepHash
from tests.keybroker.helpers import MODEL, make_config, spki

OAEP_SHA1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class Clock:
    """A settable clock for creation times."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _kek_objects(hsm: Hsm, key_id: str) -> list[Any]:
    def op(hs: HsmSession) -> list[Any]:
        return list(
            hs.session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,  # KEKs, not their enablers or claims
                    Attribute.ID: _kek.object_id(key_id),
                }
            )
        )

    return hsm.call(op)


def test_create_list_describe(hsm: Hsm) -> None:
    clock = Clock()
    km = KeyManager(hsm, clock=clock)
    info = km.create_key("model-a")
    assert info.key_id == "model-a"
    assert info.current_version == 1
    assert info.current.state is KeyState.ENABLED
    assert info.current.created_at == datetime(2026, 1, 1, tzinfo=UTC)
    clock.now += 60
    km.create_key("model-b.v2_x")
    assert [k.key_id for k in km.list_keys()] == ["model-a", "model-b.v2_x"]
    assert km.describe_key("model-a") == info


def test_create_existing_key(km: KeyManager) -> None:
    km.create_key("dup")
    with pytest.raises(AlreadyExists) as info:
        km.create_key("dup")
    assert info.value.reason == "KEY_ALREADY_EXISTS"


@pytest.mark.parametrize(
    "key_id",
    ["", "Upper", "-lead", ".lead", "x" * 64, "has space", "slash/inside", "ünï", 42, None],
)
def test_invalid_key_ids(km: KeyManager, key_id: Any) -> None:
    with pytest.raises(InvalidArgument) as info:
        km.create_key(key_id)
    assert info.value.reason == "KEY_ID_INVALID"


def test_longest_key_id(km: KeyManager) -> None:
    key_id = "a" + "b" * 62
    assert km.create_key(key_id).key_id == key_id


def test_unknown_key(km: KeyManager) -> None:
    for call in (
        lambda: km.describe_key("missing"),
        lambda: km.rotate_key("missing"),
        lambda: km.generate_data_key("missing", *MODEL),
        lambda: km.disable_key("missing", 1),
    ):
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.reason == "KEY_NOT_FOUND"


def test_kek_attributes_in_the_token(hsm: Hsm, km: KeyManager) -> None:
    km.create_key("attrs")
    (obj,) = _kek_objects(hsm, "attrs")

    def op(_hs: HsmSession) -> dict[Attribute, Any]:
        return obj.get_attributes(  # type: ignore[no-any-return]
            [
                Attribute.KEY_TYPE,
                Attribute.VALUE_LEN,
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SENSITIVE,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.NEVER_EXTRACTABLE,
                Attribute.WRAP,
                Attribute.UNWRAP,
                Attribute.ENCRYPT,
                Attribute.DECRYPT,
                Attribute.SIGN,
                Attribute.DERIVE,
                Attribute.ALLOWED_MECHANISMS,
            ]
        )

    attrs = hsm.call(op)
    assert attrs[Attribute.KEY_TYPE] == KeyType.AES
    assert attrs[Attribute.VALUE_LEN] == 32
    assert attrs[Attribute.TOKEN] and attrs[Attribute.PRIVATE]
    assert attrs[Attribute.SENSITIVE] and attrs[Attribute.ALWAYS_SENSITIVE]
    assert not attrs[Attribute.EXTRACTABLE] and attrs[Attribute.NEVER_EXTRACTABLE]
    assert attrs[Attribute.WRAP] and attrs[Attribute.UNWRAP]
    assert not (
        attrs[Attribute.ENCRYPT]
        or attrs[Attribute.DECRYPT]
        or attrs[Attribute.SIGN]
        or attrs[Attribute.DERIVE]
    )
    assert attrs[Attribute.ALLOWED_MECHANISMS] == [Mechanism.AES_KEY_WRAP_PAD]


def test_kek_value_cannot_be_read_or_extracted(hsm: Hsm, km: KeyManager) -> None:
    km.create_key("secret")
    (kek,) = _kek_objects(hsm, "secret")

    def attempts(hs: HsmSession) -> dict[str, type[BaseException] | None]:
        outcome: dict[str, type[BaseException] | None] = {}

        def attempt(name: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except p11x.PKCS11Error as exc:
                outcome[name] = type(exc)
            else:
                outcome[name] = None

        attempt("read value", lambda: kek[Attribute.VALUE])
        other = hs.session.generate_key(
            KeyType.AES, 256, store=False, template={Attribute.WRAP: True, Attribute.TOKEN: False}
        )
        try:
            attempt(
                "wrap with another key",
                lambda: other.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP_PAD),
            )
        finally:
            other.destroy()
        attempt("make extractable", lambda: kek.__setitem__(Attribute.EXTRACTABLE, True))
        attempt("make non-sensitive", lambda: kek.__setitem__(Attribute.SENSITIVE, False))
        attempt("copy as extractable", lambda: kek.copy({Attribute.EXTRACTABLE: True}))
        attempt("copy", lambda: kek.copy({Attribute.TOKEN: False}))
        return outcome

    outcome = hsm.call(attempts)
    assert outcome["read value"] is p11x.AttributeSensitive
    assert outcome["wrap with another key"] is p11x.KeyUnextractable
    # An immutable KEK: SoftHSM2 answers CKR_ACTION_PROHIBITED (0x1b, which python-pkcs11 does not
    # name) where a modifiable one answered CKR_ATTRIBUTE_READ_ONLY.
    assert outcome["make extractable"] in (p11x.AttributeReadOnly, p11x.PKCS11Error)
    assert outcome["make non-sensitive"] in (p11x.AttributeReadOnly, p11x.PKCS11Error)
    assert outcome["copy as extractable"] is not None
    assert outcome["copy"] is not None  # CKA_COPYABLE is false


def test_rotation_keeps_old_versions_usable(km: KeyManager) -> None:
    km.create_key("rot")
    dek1, wrapped1, v1 = km.generate_data_key("rot", *MODEL)
    info = km.rotate_key("rot")
    assert [v.version for v in info.versions] == [1, 2]
    assert info.current_version == 2
    dek2, _, v2 = km.generate_data_key("rot", *MODEL)
    assert (v1, v2) == (1, 2)
    assert dek1 != dek2
    moved, version = km.rewrap("rot", 1, wrapped1)
    assert version == 2 and moved != wrapped1
    # The moved blob is the same key: re-wrapping it again under v2 is deterministic (RFC 5649).
    assert km.rewrap("rot", 2, moved) == (moved, 2)
    assert km.rotate_key("rot").current_version == 3


def test_disable_one_version(km: KeyManager) -> None:
    km.create_key("dis")
    _, wrapped1, _ = km.generate_data_key("dis", *MODEL)
    km.rotate_key("dis")
    info = km.disable_key("dis", 1)
    assert [v.state for v in info.versions] == [KeyState.DISABLED, KeyState.ENABLED]
    with pytest.raises(FailedPrecondition) as failure:
        km.rewrap("dis", 1, wrapped1)
    assert failure.value.reason == "KEY_DISABLED"
    _, _, version = km.generate_data_key("dis", *MODEL)  # the current version still works
    assert version == 2
    assert km.disable_key("dis", 1) == info  # idempotent
    km.enable_key("dis", 1)
    assert km.rewrap("dis", 1, wrapped1).version == 2


def test_disable_current_version_refuses_new_data_keys(km: KeyManager) -> None:
    km.create_key("cur")
    _, wrapped1, _ = km.generate_data_key("cur", *MODEL)
    km.rotate_key("cur")
    km.disable_key("cur", 2)
    for call in (
        lambda: km.generate_data_key("cur", *MODEL),
        lambda: km.rewrap("cur", 1, wrapped1),
    ):
        with pytest.raises(FailedPrecondition) as failure:
            call()
        assert failure.value.reason == "KEY_DISABLED"  # never a silent fall-back to version 1
    assert km.rotate_key("cur").current_version == 3
    assert km.generate_data_key("cur", *MODEL).version == 3


def test_disable_all_versions(km: KeyManager) -> None:
    km.create_key("all")
    km.rotate_key("all")
    info = km.disable_key("all", ALL_VERSIONS)
    assert {v.state for v in info.versions} == {KeyState.DISABLED}
    with pytest.raises(FailedPrecondition):
        km.generate_data_key("all", *MODEL)


@pytest.mark.parametrize("version", [0, -1, 2**31, True, "1", 1.0])
def test_invalid_versions(km: KeyManager, version: Any) -> None:
    km.create_key("ver")
    with pytest.raises(InvalidArgument) as info:
        km.disable_key("ver", version)
    assert info.value.reason == "KEY_VERSION_INVALID"


def test_unknown_version(km: KeyManager) -> None:
    km.create_key("ver")
    with pytest.raises(NotFound) as info:
        km.disable_key("ver", 2)
    assert info.value.reason == "KEY_VERSION_NOT_FOUND"


def test_disabled_legacy_version_is_refused_by_the_hsm_itself(hsm: Hsm, km: KeyManager) -> None:
    """A KEK made modifiable (by a broker before KEKs were immutable) is still disabled through its
    flags too: even a caller that skips the broker's state check cannot use it."""
    km.create_key("hard")
    _raw_version(hsm, "hard", 2, int(T0 * 1000) + 1, "ab" * 8, pending=False, modifiable=True)
    _, wrapped, version = km.generate_data_key("hard", *MODEL)
    assert version == 2
    km.disable_key("hard", 2)
    kek = next(o for o in _kek_objects(hsm, "hard") if o.label.endswith("/" + "ab" * 8))

    def raw_unwrap(_hs: HsmSession) -> str:
        # python-pkcs11 gives an object without CKA_UNWRAP no unwrap_key(); call C_UnwrapKey anyway.
        try:
            UnwrapMixin.unwrap_key(
                kek,
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                wrapped,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                template=_kek.SESSION_DEK_TEMPLATE,
            )
        except p11x.PKCS11Error as exc:
            return str(exc)
        return "unwrapped"

    assert "0x68" in hsm.call(raw_unwrap)  # CKR_KEY_FUNCTION_NOT_PERMITTED
    km.enable_key("hard", 2)
    assert _flags(hsm, kek) == (True, True)
    assert km.rewrap("hard", 2, wrapped).version == 2


def test_metadata_lives_in_the_hsm(
    softhsm_token: SoftHsmToken, hsm: Hsm, open_hsm: Callable[..., Hsm]
) -> None:
    km = KeyManager(hsm, clock=Clock())
    km.create_key("persist")
    km.rotate_key("persist")
    km.disable_key("persist", 1)
    before = km.list_keys()
    hsm.close()
    again = KeyManager(open_hsm(make_config(softhsm_token)))  # nothing kept outside the token
    assert again.list_keys() == before


def test_replicas_sharing_one_hsm_agree(
    softhsm_token: SoftHsmToken, hsm: Hsm, open_hsm: Callable[..., Hsm]
) -> None:
    a = KeyManager(hsm)
    b = KeyManager(open_hsm(make_config(softhsm_token, softhsm_token.replica_module("b"))))
    a.create_key("shared")
    _, wrapped, _ = b.generate_data_key("shared", *MODEL)
    b.disable_key("shared", 1)
    with pytest.raises(FailedPrecondition):
        a.rewrap("shared", 1, wrapped)
    a.enable_key("shared", 1)
    assert b.rotate_key("shared").current_version == 2
    assert a.rewrap("shared", 1, wrapped).version == 2
    with pytest.raises(AlreadyExists):
        b.create_key("shared")


def test_concurrent_rotations_on_one_replica(km: KeyManager) -> None:
    km.create_key("race")
    with ThreadPoolExecutor(8) as pool:
        versions = sorted(
            info.current_version for info in pool.map(lambda _: km.rotate_key("race"), range(8))
        )
    assert versions == list(range(2, 10))


def _raw_version(
    hsm: Hsm,
    key_id: str,
    version: int,
    created_ms: int,
    nonce: str,
    *,
    pending: bool,
    modifiable: bool = False,
) -> Any:
    """Creates a KEK object directly, as another replica would (``modifiable``: as a broker did
    before KEKs were made immutable, which is also how its pending objects were made)."""

    def op(hs: HsmSession) -> Any:
        return hs.session.generate_key(
            KeyType.AES,
            256,
            id=_kek.object_id(key_id),
            label=_kek.label(key_id, version, created_ms, nonce, pending=pending),
            store=True,
            template={**_kek.KEK_TEMPLATE, Attribute.MODIFIABLE: modifiable or pending},
        )

    return hsm.call(op)


def test_rotation_backs_off_from_a_rival_in_flight(hsm: Hsm) -> None:
    clock = Clock()
    km = KeyManager(hsm, clock=clock)
    km.create_key("rival")
    # Another replica is in the middle of publishing version 2 (its pending object is fresh).
    _raw_version(hsm, "rival", 2, int(clock.now * 1000), "ab" * 8, pending=True)
    with pytest.raises(Unavailable) as info:
        km.rotate_key("rival")
    assert info.value.reason == "KEY_VERSION_CONFLICT"
    assert len(_kek_objects(hsm, "rival")) == 2  # our own attempts were all removed
    assert km.describe_key("rival").current_version == 1


def test_duplicate_published_versions_are_tolerated(hsm: Hsm, tee_key: rsa.RSAPrivateKey) -> None:
    """Two objects claiming one version (two SoftHSM2 instances racing can publish both): every
    replica wraps with the same winner and unwraps with any candidate."""
    clock = Clock()
    km = KeyManager(hsm, clock=clock)
    km.create_key("dup")
    clock.now += 10
    km.rotate_key("dup")  # version 2, created at T0+10 s
    late = _raw_version(hsm, "dup", 2, int((clock.now + 5) * 1000), "ff" * 8, pending=False)

    def wrap_under_loser(hs: HsmSession) -> tuple[bytes, bytes]:
        dek = hs.session.generate_key(
            KeyType.AES, 256, store=False, template=_kek.RETURNED_DEK_TEMPLATE
        )
        try:
            return late.wrap_key(dek, mechanism=Mechanism.AES_KEY_WRAP_PAD), dek[Attribute.VALUE]
        finally:
            dek.destroy()

    wrapped_by_loser, dek_by_loser = hsm.call(wrap_under_loser)
    info = km.describe_key("dup")
    assert [v.version for v in info.versions] == [1, 2]
    assert info.current.created_at == datetime.fromtimestamp(clock.now, tz=UTC)  # the winner
    out, _ = km.release_to_ephemeral("dup", 2, wrapped_by_loser, spki(tee_key), [OaepHash.SHA1])
    assert tee_key.decrypt(out, OAEP_SHA1) == dek_by_loser
    fresh = km.generate_data_key("dup", *MODEL)
    assert fresh.version == 2
    assert km.rewrap("dup", 2, wrapped_by_loser).version == 2
    km.disable_key("dup", 2)
    assert km.describe_key("dup").versions[1].state is KeyState.DISABLED  # every candidate
    with pytest.raises(FailedPrecondition):
        km.release_to_ephemeral("dup", 2, fresh.wrapped, spki(tee_key), [OaepHash.SHA1])


def _flags(hsm: Hsm, obj: Any) -> tuple[bool, bool]:
    def op(_hs: HsmSession) -> tuple[bool, bool]:
        return bool(obj[Attribute.WRAP]), bool(obj[Attribute.UNWRAP])

    return hsm.call(op)


def test_abandoned_pending_version_is_reaped(hsm: Hsm) -> None:
    clock = Clock()
    km = KeyManager(hsm, clock=clock)
    km.create_key("crash")

    def leave_pending(hs: HsmSession) -> None:  # a replica that crashed mid-rotation
        hs.session.generate_key(
            KeyType.AES,
            256,
            id=_kek.object_id("crash"),
            label=_kek.label("crash", 2, int(clock.now * 1000), "00" * 8, pending=True),
            store=True,
            template=_kek.KEK_TEMPLATE,
        )

    hsm.call(leave_pending)
    assert km.describe_key("crash").current_version == 1  # pending versions are invisible
    clock.now += _kek.PENDING_TTL_MS / 1000 + 1
    assert km.rotate_key("crash").current_version == 2
    assert len(_kek_objects(hsm, "crash")) == 2


def _copies_in_memory(needle: bytes) -> int:
    """How many times ``needle`` occurs in this process's anonymous writable memory (heap, arenas),
    besides ``needle`` itself. Reads through one reused buffer, zeroed after each chunk, so the
    scan makes no copy of its own."""
    regions = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if "w" not in fields[1] or (len(fields) > 5 and not fields[5].startswith("[")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, end))
    buffer = bytearray(1 << 16)
    view = memoryview(buffer)
    zeros = bytes(len(buffer))
    overlap = len(needle) - 1
    hits = 0
    with open("/proc/self/mem", "rb", buffering=0) as memory:
        for start, end in regions:
            position = start
            while position < end:
                size = min(len(buffer), end - position)
                try:
                    memory.seek(position)
                    got = memory.readinto(view[:size]) or 0
                except OSError:
                    break
                hits += buffer.count(needle, 0, got)
                view[:got] = zeros[:got]
                if position + size >= end:
                    break
                position += size - overlap
    return hits - 1


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs /proc/self/mem")
def test_a_wiped_data_key_leaves_no_copy_in_memory(km: KeyManager) -> None:
    # generate_data_key's caller wipes DataKey.dek once it has encrypted. Read through
    # python-pkcs11, the value also went through an immutable bytes object (and that library's
    # buffer), freed but never wiped: a memory dump of the broker still held recent data keys.
    km.create_key("model")
    left = []
    for _ in range(3):
        data_key = km.generate_data_key("model", *MODEL)
        needle = bytes(memoryview(data_key.dek)[:16])
        data_key.wipe()
        gc.collect()
        left.append(_copies_in_memory(needle))
    assert left == [0, 0, 0]
