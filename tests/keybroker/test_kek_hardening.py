"""KEKs are immutable in the token (CKA_MODIFIABLE false): nobody holding the PIN can change their
attributes; disabling, enabling and rotating still work (enablers, claims), and KEKs made
modifiable before are named at start and still disabled through their flags."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from pkcs11 import Attribute, KeyType, ObjectClass

from strongroom.dev.softhsm import SoftHsmToken
from strongroom.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from strongroom.identifiers import MAX_KEY_VERSION
from strongroom.keybroker import _kek, state_lines
from strongroom.keybroker import _pkcs11_errors as errs
from strongroom.keybroker import keys as keys_module
from strongroom.keybroker.errors import HsmUnavailable, KeyStateMoving
from strongroom.keybroker.hsm import Hsm, HsmSession
from strongroom.keybroker.keys import ALL_VERSIONS, KeyManager, KeyState
from strongroom.keybroker.p11direct import DirectSession, Template
from strongroom.keybroker.state_lines import StateMoveLines
from strongroom.oaep import OaepHash
from tests.keybroker.helpers import (
    MODEL,
    WRAP_KEY,
    flap_during,
    session_objects,
    spki,
    token_call_replaced,
)

CKR_ATTRIBUTE_READ_ONLY = 0x10
CKR_ACTION_PROHIBITED = 0x1B  # SoftHSM2's answer for an object with CKA_MODIFIABLE false


def _objects(hsm: Hsm, key_id: str) -> list[Any]:
    def op(hs: HsmSession) -> list[Any]:
        return list(
            hs.session.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: _kek.object_id(key_id)}
            )
        )

    return hsm.call(op)


def _keks(hsm: Hsm, key_id: str) -> list[Any]:
    def op(hs: HsmSession) -> list[Any]:
        return [o for o in _objects_in(hs, key_id) if o[Attribute.KEY_TYPE] == KeyType.AES]

    return hsm.call(op)


def _objects_in(hs: HsmSession, key_id: str) -> list[Any]:
    template = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: _kek.object_id(key_id)}
    return list(hs.session.get_objects(template))


def _set_attribute(hsm: Hsm, obj: Any, attribute: Attribute, value: Any) -> int | None:
    """C_SetAttributeValue as a PIN holder would call it: the return code, None if it worked."""

    def op(_hs: HsmSession) -> int | None:
        try:
            obj[attribute] = value
        except p11x.PKCS11Error as exc:
            return errs.return_code(exc) or CKR_ATTRIBUTE_READ_ONLY  # mapped: read-only
        return None

    return hsm.call(op)


def _protection(_hs: HsmSession, kek: Any) -> dict[Attribute, Any]:
    return dict(
        kek.get_attributes(
            [
                Attribute.MODIFIABLE,
                Attribute.COPYABLE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.DESTROYABLE,
            ]
        )
    )


def test_new_keks_are_immutable(hsm: Hsm, km: KeyManager) -> None:
    km.create_key("locked")
    km.rotate_key("locked")
    keks = _keks(hsm, "locked")
    assert len(keks) == 2  # no claim is left behind
    for kek in keks:
        attrs = hsm.call(functools.partial(_protection, kek=kek))
        assert attrs == {
            Attribute.MODIFIABLE: False,
            Attribute.COPYABLE: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.DESTROYABLE: True,
        }
        for attribute, value in [
            (Attribute.LABEL, _kek.label("other", 1, 0, "00" * 8, pending=False)),  # identity swap
            (Attribute.ID, _kek.object_id("other")),
            (Attribute.WRAP, False),
            (Attribute.ENCRYPT, True),
            (Attribute.DECRYPT, True),
            (Attribute.EXTRACTABLE, True),
        ]:
            assert _set_attribute(hsm, kek, attribute, value) in (
                CKR_ATTRIBUTE_READ_ONLY,
                CKR_ACTION_PROHIBITED,
            ), attribute
    assert km.modifiable_versions() == {}


def test_disable_enable_and_rotate_work_on_immutable_keks(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey
) -> None:
    km.create_key("life")
    _, wrapped, _ = km.generate_data_key("life", *MODEL)
    km.disable_key("life", 1)
    replica = KeyManager(hsm)  # another broker: the state is in the token, not in km
    for manager in (km, replica):
        assert [v.state for v in manager.describe_key("life").versions] == [KeyState.DISABLED]
        with pytest.raises(FailedPrecondition) as info:
            manager.release_to_ephemeral("life", 1, wrapped, spki(tee_key), [OaepHash.SHA1])
        assert info.value.reason == "KEY_DISABLED"
        with pytest.raises(FailedPrecondition):
            manager.generate_data_key("life", *MODEL)
    km.disable_key("life", 1)  # idempotent
    assert len(_objects(hsm, "life")) == 1  # the KEK; its enabler is gone
    rotated = km.rotate_key("life")
    assert [v.state for v in rotated.versions] == [KeyState.DISABLED, KeyState.ENABLED]
    with pytest.raises(FailedPrecondition):
        km.rewrap("life", 1, wrapped)
    km.enable_key("life", ALL_VERSIONS)
    assert len(_objects(hsm, "life")) == 4  # two KEKs, an enabler each
    assert km.rewrap("life", 1, wrapped).version == 2
    out, _ = replica.release_to_ephemeral("life", 1, wrapped, spki(tee_key), [OaepHash.SHA1])
    assert len(out) == 384
    assert [v.state for v in km.list_keys()[0].versions] == [KeyState.ENABLED] * 2


def test_an_attempt_left_by_a_crashed_rotation_is_invisible_then_reaped(hs_clock: Any) -> None:
    hsm, km, now = hs_clock
    km.create_key("crash")

    def leave_enabler(hs: HsmSession) -> None:  # its KEK was never generated
        hs.session.generate_key(
            KeyType.GENERIC_SECRET,
            _kek.MARKER_BITS,
            id=_kek.object_id("crash"),
            label=_kek.label("crash", 2, int(now[0] * 1000), "00" * 8, pending=False, enabler=True),
            store=True,
            template=_kek.MARKER_TEMPLATE,
        )

    hsm.call(leave_enabler)
    assert km.describe_key("crash").current_version == 1
    with pytest.raises(Unavailable) as info:  # a fresh attempt: another replica's, in flight
        km.rotate_key("crash")
    assert info.value.reason == "KEY_VERSION_CONFLICT"
    now[0] += _kek.PENDING_TTL_MS / 1000 + 1
    assert km.rotate_key("crash").current_version == 2
    assert len(_objects(hsm, "crash")) == 4  # two KEKs, an enabler each: the attempt was reaped


@pytest.fixture
def hs_clock(hsm: Hsm) -> tuple[Hsm, KeyManager, list[float]]:
    """A key manager whose clock the test sets."""
    now = [1_767_225_600.0]
    return hsm, KeyManager(hsm, clock=lambda: now[0]), now


def test_keks_made_modifiable_before_are_named_and_still_disabled_by_their_flags(
    hsm: Hsm, km: KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    hsm.call(functools.partial(_legacy_kek, key_id="old"))
    km.rotate_key("old")
    with caplog.at_level(logging.WARNING, logger="strongroom.keybroker.keys"):
        assert km.warn_modifiable_versions() == {"old": [1]}
    (record,) = [r for r in caplog.records if getattr(r, "key_id", None) == "old"]
    assert record.key_versions == [1]  # type: ignore[attr-defined]
    km.disable_key("old", 1)
    assert _legacy_flags(hsm, "old") == (False, False)
    km.enable_key("old", 1)
    assert _legacy_flags(hsm, "old") == (True, True)
    assert [v.state for v in km.describe_key("old").versions] == [KeyState.ENABLED] * 2


def test_a_kek_whose_value_left_or_came_from_outside_the_token_is_never_used(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """A PIN holder cannot relabel a KEK, but could *create* one under a key's labels: a value they
    chose (C_CreateObject) as the winner of the current version, or one generated readable as the
    next version with its enabler. Every replica then wrapped new data keys under a key whose
    value they know: every model published later opened without the HSM, the PIN long changed."""
    km.create_key("planted")
    known = bytes(range(32))

    def plant(hs: HsmSession) -> None:
        hs.session.create_object(
            {
                **_kek.KEK_TEMPLATE,
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: known,
                Attribute.ID: _kek.object_id("planted"),
                # created at 0: the winner of version 1, ahead of the broker's own KEK
                Attribute.LABEL: _kek.label("planted", 1, 0, "00" * 8, pending=False),
            }
        )
        hs.session.generate_key(  # generated in the token, but readable: the next version
            KeyType.AES,
            256,
            id=_kek.object_id("planted"),
            label=_kek.label("planted", 2, 1, "11" * 8, pending=False),
            store=True,
            template={**_kek.KEK_TEMPLATE, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
        )
        hs.session.generate_key(
            KeyType.GENERIC_SECRET,
            _kek.MARKER_BITS,
            id=_kek.object_id("planted"),
            label=_kek.label("planted", 2, 1, "11" * 8, pending=False, enabler=True),
            store=True,
            template=_kek.MARKER_TEMPLATE,
        )

    hsm.call(plant)
    with caplog.at_level(logging.ERROR, logger="strongroom.keybroker._kek"):
        assert [v.version for v in km.describe_key("planted").versions] == [1]
    assert {getattr(r, "key_version", None) for r in caplog.records} == {1, 2}
    key = km.generate_data_key("planted", *MODEL)
    assert key.version == 1
    with pytest.raises(InvalidUnwrap):
        aes_key_unwrap_with_padding(known, key.wrapped)  # wrapped under the broker's own KEK
    planted_blob = aes_key_wrap_with_padding(known, bytes(32))
    with pytest.raises(InvalidArgument) as info:  # nor does the planted one unwrap anything
        km.release_to_ephemeral("planted", 1, planted_blob, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "WRAPPED_KEY_INVALID"
    assert km.rotate_key("planted").current_version == 2  # its own version 2, not the planted one
    assert km.generate_data_key("planted", *MODEL).version == 2


def test_a_public_kek_or_enabler_is_never_used(
    hsm: Hsm,
    km: KeyManager,
    softhsm_token: SoftHsmToken,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A public object (CKA_PRIVATE false) is usable by any session of the token without the PIN,
    and SoftHSM2 keeps its value in clear in the token's files. A PIN holder's KEK generated in
    the token as public passed every provenance check: as the winner of the current version it
    had every replica wrap new data keys under a value any copy of the token files reads, long
    after the PIN was changed. And an application sharing the token without the PIN re-enabled a
    disabled version by creating a public enabler in a session it never logged in."""
    km.create_key("public")

    def plant(hs: HsmSession) -> Any:
        return hs.session.generate_key(  # created at 0: the winner of version 1
            KeyType.AES,
            _kek.KEK_BITS,
            id=_kek.object_id("public"),
            label=_kek.label("public", 1, 0, "00" * 8, pending=False),
            store=True,
            template={**_kek.KEK_TEMPLATE, Attribute.PRIVATE: False},
        )

    planted = hsm.call(plant)
    with caplog.at_level(logging.ERROR, logger="strongroom.keybroker._kek"):
        key = km.generate_data_key("public", *MODEL)
    assert [getattr(r, "key_version", None) for r in caplog.records] == [1]

    def unwrap_with_planted(_hs: HsmSession) -> type[p11x.PKCS11Error] | None:
        try:
            planted.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                key.wrapped,
                template=_kek.SESSION_DEK_TEMPLATE,
            )
        except p11x.PKCS11Error as exc:
            return type(exc)
        return None

    assert hsm.call(unwrap_with_planted) is not None  # wrapped under the broker's own KEK
    km.disable_key("public", 1)
    # Another application of the token, which never logs in (a session without the PIN).
    monkeypatch.setenv("SOFTHSM2_CONF", str(softhsm_token.conf_path))
    other = softhsm_token.replica_module("no-pin")
    try:
        session = pkcs11.lib(str(other)).get_token(token_label=softhsm_token.label).open(rw=True)
        with session:
            session.generate_key(
                KeyType.GENERIC_SECRET,
                _kek.MARKER_BITS,
                id=_kek.object_id("public"),
                label=_kek.label("public", 1, 1, "11" * 8, pending=False, enabler=True),
                store=True,
                template={**_kek.MARKER_TEMPLATE, Attribute.PRIVATE: False},
            )
    finally:
        pkcs11.unload(str(other))
    assert [v.state for v in km.describe_key("public").versions] == [KeyState.DISABLED]


def test_a_kek_of_another_length_is_never_used(
    hsm: Hsm, km: KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    """Every broker generates 256-bit KEKs. A PIN holder's AES-128 KEK generated in the token
    (private, sensitive, never extractable: every provenance check passed) created at 0 won
    version 1, and new data keys were wrapped under half the strength the format promises."""
    km.create_key("short")

    def plant(hs: HsmSession) -> Any:
        return hs.session.generate_key(
            KeyType.AES,
            128,
            id=_kek.object_id("short"),
            label=_kek.label("short", 1, 0, "00" * 8, pending=False),
            store=True,
            template=_kek.KEK_TEMPLATE,
        )

    planted = hsm.call(plant)
    with caplog.at_level(logging.ERROR, logger="strongroom.keybroker._kek"):
        key = km.generate_data_key("short", *MODEL)
    refused = [r for r in caplog.records if getattr(r, "key_version", None) == 1]
    assert len(refused) == 1
    assert refused[0].provenance == {"VALUE_LEN": 16}  # type: ignore[attr-defined]

    def unwrap_with_planted(_hs: HsmSession) -> type[p11x.PKCS11Error] | None:
        try:
            planted.unwrap_key(
                ObjectClass.SECRET_KEY, KeyType.AES, key.wrapped, template=_kek.SESSION_DEK_TEMPLATE
            )
        except p11x.PKCS11Error as exc:
            return type(exc)
        return None

    assert hsm.call(unwrap_with_planted) is not None  # wrapped under the broker's own KEK


def test_refusals_past_the_logged_bound_are_still_reported(
    hsm: Hsm, km: KeyManager, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused objects were logged once per label up to 1,024 labels and then never: planting
    that many first hid every later one. Past the bound they are counted, with a line at each
    power of two naming the latest."""
    monkeypatch.setattr(_kek, "_REFUSED_LOGGED", set())
    monkeypatch.setattr(_kek, "_REFUSED_LOGGED_MAX", 1)
    monkeypatch.setattr(_kek, "_REFUSED_UNLOGGED", [0], raising=False)
    km.create_key("hidden")

    def plant(created_at_ms: int) -> Callable[[HsmSession], Any]:
        def op(hs: HsmSession) -> Any:
            return hs.session.generate_key(
                KeyType.AES,
                _kek.KEK_BITS,
                id=_kek.object_id("hidden"),
                label=_kek.label("hidden", 1, created_at_ms, "00" * 8, pending=False),
                store=True,
                template={**_kek.KEK_TEMPLATE, Attribute.PRIVATE: False},
            )

        return op

    hsm.call(plant(0))
    with caplog.at_level(logging.ERROR, logger="strongroom.keybroker._kek"):
        km.describe_key("hidden")
        hsm.call(plant(1))
        km.describe_key("hidden")
    counted = [r for r in caplog.records if hasattr(r, "refusals_unlogged")]
    assert [r.label for r in counted] == [  # type: ignore[attr-defined]
        _kek.label("hidden", 1, 1, "00" * 8, pending=False)
    ]


def _plant_secret(hsm: Hsm, key_id: str, label: bytes, object_id: bytes | None = None) -> None:
    """Creates a token secret under ``key_id``'s CKA_ID (or ``object_id``) with the raw ``label``
    (python-pkcs11 only writes labels that are text)."""
    template = Template(
        [
            (Attribute.CLASS, ObjectClass.SECRET_KEY),
            (Attribute.KEY_TYPE, KeyType.GENERIC_SECRET),
            (Attribute.TOKEN, True),
            (Attribute.ID, object_id or _kek.object_id(key_id)),
            (Attribute.LABEL, label),
            (Attribute.VALUE, bytes(16)),
        ]
    )
    hsm.call(lambda hs: hs.direct.create_object(template))


def test_a_label_that_is_not_utf8_is_a_damaged_object_not_a_missing_key(
    hsm: Hsm, km: KeyManager
) -> None:
    # What a damaged object file reads as (SoftHSM2 decrypts a private object's label to garbage;
    # test_hsm_faults damages one): the key's lookup fails as the HSM's, never as NOT_FOUND.
    km.create_key("mangled")
    _plant_secret(hsm, "mangled", b"strongroom/kek/mangled/v1/\xff\xfe")
    with pytest.raises(HsmUnavailable) as info:
        km.describe_key("mangled")
    assert info.value.reason == "HSM_OPERATION_FAILED"
    assert "unreadable label" in info.value.message


def test_another_applications_objects_do_not_break_or_join_the_list_of_keys(
    hsm: Hsm, km: KeyManager
) -> None:
    """A token shared with another application: its secret key with a binary label made every
    list of keys (and the start's check for modifiable KEKs) fail as a damaged object, dropping
    the session each time; an object labelled as one key but filed under another's CKA_ID was
    listed as a version by list_keys and not by describe_key."""
    km.create_key("good")
    _plant_secret(hsm, "good", b"\xff\xfe binary", object_id=b"\x01\x02")

    def misfiled(hs: HsmSession) -> None:
        hs.session.generate_key(
            KeyType.AES,
            _kek.KEK_BITS,
            id=_kek.object_id("elsewhere"),
            label=_kek.label("good", 2, 1, "ab" * 8, pending=False),
            store=True,
            template=_kek.KEK_TEMPLATE,
        )

    hsm.call(misfiled)
    assert [(k.key_id, [v.version for v in k.versions]) for k in km.list_keys()] == [("good", [1])]
    assert [v.version for v in km.describe_key("good").versions] == [1]
    assert km.modifiable_versions() == {}


def test_a_label_longer_than_any_kek_label_is_not_a_kek(hsm: Hsm, km: KeyManager) -> None:
    km.create_key("long")
    real = _kek.label("long", 1, 0, "00" * 8, pending=False)
    for label in (real.encode() + b"/" + b"x" * 4000, b"\xff" * (_kek.LABEL_MAX_BYTES + 1)):
        _plant_secret(hsm, "long", label)  # read as absent: no KEK, no rival, no error
    assert [(v.version, v.state) for v in km.describe_key("long").versions] == [
        (1, KeyState.ENABLED)
    ]
    _plant_secret(hsm, "only-long", b"strongroom/kek/only-long/v1/" + b"0" * 4000)
    with pytest.raises(NotFound):
        km.describe_key("only-long")


def test_the_longest_kek_label_is_read_whole(hsm: Hsm, km: KeyManager) -> None:
    # 15 digits of milliseconds, still within a datetime (the last millisecond of year 9999)
    key_id, version, created = "k" * 63, MAX_KEY_VERSION, 253_402_300_799_999
    longest = _kek.label(key_id, version, created, "f" * 16, pending=False, enabler=True)
    assert len(longest) == _kek.LABEL_MAX_BYTES

    def plant(hs: HsmSession) -> None:
        hs.session.generate_key(
            KeyType.AES,
            _kek.KEK_BITS,
            id=_kek.object_id(key_id),
            label=_kek.label(key_id, version, created, "f" * 16, pending=False),
            store=True,
            template=_kek.KEK_TEMPLATE,
        )
        hs.session.generate_key(
            KeyType.GENERIC_SECRET,
            _kek.MARKER_BITS,
            id=_kek.object_id(key_id),
            label=longest,
            store=True,
            template=_kek.MARKER_TEMPLATE,
        )

    hsm.call(plant)
    # Enabled: its enabler, under the longest label there is, was found and parsed.
    assert [(v.version, v.state) for v in km.describe_key(key_id).versions] == [
        (version, KeyState.ENABLED)
    ]


def test_a_kek_label_dated_beyond_year_9999_is_not_a_kek(hsm: Hsm, km: KeyManager) -> None:
    """The label grammar takes 15 digits of milliseconds (up to year 33658). One such KEK, which
    a PIN holder can generate in the token, made every list of keys and every look at its key
    fail with a bare ValueError (INTERNAL): a rotation even made its version, then failed."""
    km.create_key("far")
    km.create_key("near")

    def plant(hs: HsmSession) -> None:
        for ms in (253_402_300_800_000, 999_999_999_999_999):  # year 10000 on
            hs.session.generate_key(
                KeyType.AES,
                _kek.KEK_BITS,
                id=_kek.object_id("far"),
                label=_kek.label("far", 2, ms, "ab" * 8, pending=False),
                store=True,
                template=_kek.KEK_TEMPLATE,
            )

    hsm.call(plant)
    assert [k.key_id for k in km.list_keys()] == ["far", "near"]
    assert [v.version for v in km.describe_key("far").versions] == [1]
    assert km.rotate_key("far").current_version == 2  # its own version 2
    assert km.generate_data_key("far", *MODEL).version == 2


def test_a_kek_version_beyond_the_highest_a_broker_numbers_is_not_a_kek(
    hsm: Hsm, km: KeyManager
) -> None:
    """The label grammar takes 10 digits of version; a broker numbers 1..2**31-1. A PIN holder's
    KEK generated in the token as version 2**31 (with its enabler) became every key's current
    version: new data keys were wrapped under it, and a release of it is refused
    KEY_VERSION_INVALID, so every model published afterwards could never be released; one past
    2**32-1 made every ListKeys fail (the version does not fit the answer's uint32)."""
    km.create_key("beyond")
    for version in (MAX_KEY_VERSION + 1, 9_999_999_999):
        _generated_version(hsm, "beyond", version)
    assert [v.version for v in km.describe_key("beyond").versions] == [1]
    assert [[v.version for v in k.versions] for k in km.list_keys()] == [[1]]
    assert km.generate_data_key("beyond", *MODEL).version == 1
    assert km.rotate_key("beyond").current_version == 2


def _generated_version(hsm: Hsm, key_id: str, version: int) -> None:
    """A KEK of ``key_id`` generated in the token as ``version``, with its enabler, as a PIN
    holder can make one (it passes every provenance check)."""

    def plant(hs: HsmSession) -> None:
        for key_type, bits, template, enabler in (
            (KeyType.AES, _kek.KEK_BITS, _kek.KEK_TEMPLATE, False),
            (KeyType.GENERIC_SECRET, _kek.MARKER_BITS, _kek.MARKER_TEMPLATE, True),
        ):
            hs.session.generate_key(
                key_type,
                bits,
                id=_kek.object_id(key_id),
                label=_kek.label(key_id, version, 1, "ab" * 8, pending=False, enabler=enabler),
                store=True,
                template=template,
            )

    hsm.call(plant)


def _legacy_flags(hsm: Hsm, key_id: str) -> tuple[bool, bool]:
    """CKA_WRAP and CKA_UNWRAP of the one modifiable KEK of ``key_id``, found afresh (a disable
    re-initialises the module, which voids the handles found before)."""

    def op(hs: HsmSession) -> tuple[bool, bool]:
        (kek,) = [o for o in _objects_in(hs, key_id) if o[Attribute.MODIFIABLE]]
        return kek[Attribute.WRAP], kek[Attribute.UNWRAP]

    return hsm.call(op)


def _legacy_kek(hs: HsmSession, key_id: str) -> Any:
    """Version 1 of ``key_id`` as a broker made it before KEKs were immutable (no enabler)."""
    return hs.session.generate_key(
        KeyType.AES,
        256,
        id=_kek.object_id(key_id),
        label=_kek.label(key_id, 1, 1_700_000_000_000, "cd" * 8, pending=False),
        store=True,
        template={**_kek.KEK_TEMPLATE, Attribute.MODIFIABLE: True},
    )


def _disable_during(
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    other: KeyManager,
    key_id: str,
    version: int,
    *,
    after: bool = False,
) -> list[Any]:
    """Has ``other`` disable ``version`` once, while this replica's operation is in its HSM call
    ``step`` (a function of :mod:`keys`): right before it (``after``: once the HSM's own checks
    are behind it, right after it). Returns the list that receives the disable's answer."""
    real = getattr(keys_module, step)
    disabled: list[Any] = []

    def disabled_meanwhile(*args: Any) -> Any:
        if not disabled and not after:  # once: the retry after the stale enabler runs as it is
            disabled.append(other.disable_key(key_id, version))
        out = real(*args)
        if not disabled and after:
            disabled.append(other.disable_key(key_id, version))
        return out

    monkeypatch.setattr(keys_module, step, disabled_meanwhile)
    return disabled


@contextlib.contextmanager
def _disable_inside_the_rewrap(
    hsm: Hsm, other: KeyManager, key_id: str, version: int
) -> Iterator[list[Any]]:
    """Has ``other`` disable ``version`` once, inside this replica's one-call release re-wrap
    (``p11direct``'s ``rewrap_oaep``): right after the token's C_WrapKey returned, so after the
    HSM's own checks and before anything the call reads afterwards. Yields the list that
    receives the disable's answer."""
    direct = hsm._direct
    assert direct is not None
    token_wrap = WRAP_KEY(direct.entry_points.wrap_key)
    disabled: list[Any] = []

    def wrap(session: int, mechanism: Any, key: int, wrapped: int, out: int, length: Any) -> int:
        rv = int(token_wrap(session, mechanism, key, wrapped, out, length))
        if not disabled:
            disabled.append(other.disable_key(key_id, version))
        return rv

    with token_call_replaced(hsm, "wrap_key", WRAP_KEY(wrap)):
        yield disabled


def test_a_disable_that_lands_while_the_hsm_rewraps_refuses_the_release(
    km: KeyManager,
    replica: Callable[[], KeyManager],
    tee_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The release read the enabler *before* the re-wrap: a disable on another replica that
    returned while the HSM re-wrapped (after that read) still had its release answered, so a
    version was released after `keys disable` had said it was disabled. A flag-disabled KEK was
    refused by the HSM inside the re-wrap itself."""
    km.create_key("race")
    key = km.generate_data_key("race", *MODEL)
    disabled = _disable_during(monkeypatch, "_release_with", replica(), "race", 1)
    with pytest.raises(FailedPrecondition) as info:
        km.release_to_ephemeral("race", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "KEY_DISABLED"
    assert disabled[0].versions[0].state is KeyState.DISABLED


_OPERATIONS: dict[str, tuple[str, Callable[[KeyManager, Any, rsa.RSAPrivateKey], Any]]] = {
    # operation -> (the keys function a flap lands before, the call)
    "release": (
        "_release_with",
        lambda km, key, tee: km.release_to_ephemeral(
            "flap", 1, key.wrapped, spki(tee), [OaepHash.SHA1]
        ),
    ),
    "generate_data_key": ("_wrap", lambda km, _key, _tee: km.generate_data_key("flap", *MODEL)),
    "rewrap": ("_wrap", lambda km, key, _tee: km.rewrap("flap", 1, key.wrapped)),
}


@pytest.mark.parametrize("operation", list(_OPERATIONS))
def test_a_version_flapping_a_few_times_under_an_operation_gets_its_answer(
    km: KeyManager,
    replica: Callable[[], KeyManager],
    tee_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
) -> None:
    """A replica disabling and re-enabling a version while this one used it twice in a row: the
    first stale enabler was looked up afresh, the second answered HSM_UNAVAILABLE ("an HSM object
    changed; retry"), an HSM failure where the HSM had not failed. The version is enabled each
    time it is looked up again, and the operation is answered once a re-read holds still."""
    km.create_key("flap")
    key = km.generate_data_key("flap", *MODEL)
    step, call = _OPERATIONS[operation]
    flaps = flap_during(monkeypatch, step, replica(), "flap", 1, times=2)
    call(km, key, tee_key)
    assert [f.versions[0].state for f in flaps] == [KeyState.ENABLED] * 2
    assert km.unusable_keys() == {}


@pytest.mark.parametrize("operation", list(_OPERATIONS))
def test_a_version_flapping_under_an_operation_on_a_token_reusing_handles_gets_its_answer(
    hsm: Hsm,
    km: KeyManager,
    replica: Callable[[], KeyManager],
    tee_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
) -> None:
    """On a token that gives a destroyed enabler's handle to a new object, a flap leaves the
    version's handle reading another enabler's label: the release's first compare in its C call
    (StateChanged) or the read after the HSM's work (_judge_state). Both are the version's state
    moving, looked up afresh like a handle gone invalid; raised as a bare stale handle, the
    second flap answered HSM_UNAVAILABLE, and no test saw it."""
    km.create_key("flap")
    km.create_key("bystander")
    key = km.generate_data_key("flap", *MODEL)
    bystander = hsm.call(lambda hs: km._require_versions(hs, "bystander")[0].enablers[0].handle)
    step = "_release_with" if operation == "release" else "_still_enabled"
    other = replica()
    flaps = flap_during(monkeypatch, step, other, "flap", 1, times=2, reused=bystander)
    _OPERATIONS[operation][1](km, key, tee_key)
    assert [f.versions[0].state for f in flaps] == [KeyState.ENABLED] * 2
    assert other.describe_key("bystander").versions[0].state is KeyState.ENABLED
    assert km.unusable_keys() == {}


@pytest.mark.parametrize("operation", list(_OPERATIONS))
def test_a_version_that_keeps_flapping_under_an_operation_is_refused_disabled(
    hsm: Hsm,
    km: KeyManager,
    replica: Callable[[], KeyManager],
    tee_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
) -> None:
    """Past a bounded number of re-reads, a version disabled under every attempt is refused as
    what each attempt met, a disable (KEY_DISABLED, fail closed), not HSM_UNAVAILABLE; no session
    object is left and the key is not counted against; once the flapping stops it works."""
    km.create_key("flap")
    key = km.generate_data_key("flap", *MODEL)
    step, call = _OPERATIONS[operation]
    before = session_objects(hsm)
    flaps = flap_during(monkeypatch, step, replica(), "flap", 1, times=1000)
    with pytest.raises(FailedPrecondition) as info:
        call(km, key, tee_key)
    assert info.value.reason == "KEY_DISABLED"
    assert isinstance(info.value, KeyStateMoving)  # the broker's replicas', not the caller's
    assert info.value.message == (
        "key 'flap' version 1 was disabled while the HSM used it, 4 times in 4 attempts "
        "(another replica is changing its state); retry once it holds still"
    )
    assert len(flaps) == keys_module._STATE_ATTEMPTS
    assert session_objects(hsm) == before
    assert km.unusable_keys() == {}
    monkeypatch.undo()
    call(km, key, tee_key)


def _moved_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of each ``state moved`` WARNING the key manager logged."""
    fields = (
        "key_id",
        "key_version",
        "attempts",
        "disabled_under_it",
        "stale_handles",
        "outcome",
        "operations_not_logged",
    )
    return [
        {f: getattr(r, f) for f in fields}
        for r in caplog.records
        if r.name == keys_module.__name__ and "state moved under an operation" in r.getMessage()
    ]


@pytest.mark.parametrize("operation", list(_OPERATIONS))
def test_an_operation_that_retried_as_its_version_flapped_is_logged_once(
    km: KeyManager,
    replica: Callable[[], KeyManager],
    tee_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    operation: str,
) -> None:
    """The re-reads of a flapping version logged nothing: an operator could not see a version
    flapping between replicas. Each operation that retried is one WARNING (not one per attempt)
    naming the key version, its attempts, what moved and how it ended; one that did not retry
    logs none."""
    km.create_key("flap")
    key = km.generate_data_key("flap", *MODEL)
    step, call = _OPERATIONS[operation]
    caplog.set_level(logging.WARNING, logger=keys_module.__name__)
    call(km, key, tee_key)
    assert _moved_lines(caplog) == []
    flap_during(monkeypatch, step, replica(), "flap", 1, times=2)
    call(km, key, tee_key)
    answered = {
        "key_id": "flap",
        "key_version": 1,
        "attempts": 3,
        "disabled_under_it": 2,
        "stale_handles": 0,
        "outcome": "answered",
        "operations_not_logged": 0,
    }
    assert _moved_lines(caplog) == [answered]


def test_the_lines_of_a_version_that_keeps_flapping_are_bounded_and_count_the_rest(
    km: KeyManager,
    replica: Callable[[], KeyManager],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Under load every operation on a flapping version retries: one line each would be
    unbounded. A key version has one line at once, then one a minute, which counts the
    operations not logged since; another version has its own."""
    now = [1000.0]
    km._state_lines = StateMoveLines(logging.getLogger(keys_module.__name__), lambda: now[0])
    km.create_key("flap")
    km.create_key("other")
    caplog.set_level(logging.WARNING, logger=keys_module.__name__)
    flaps = flap_during(monkeypatch, "_wrap", replica(), "flap", 1, times=1000)
    for _ in range(3):
        with pytest.raises(KeyStateMoving):
            km.generate_data_key("flap", *MODEL)
    refused = {
        "key_id": "flap",
        "key_version": 1,
        "attempts": 4,
        "disabled_under_it": 4,
        "stale_handles": 0,
        "outcome": "KEY_DISABLED",
        "operations_not_logged": 0,
    }
    assert len(flaps) == 3 * keys_module._STATE_ATTEMPTS
    assert _moved_lines(caplog) == [refused]
    now[0] += state_lines.REPEAT_SECONDS - 1
    with pytest.raises(KeyStateMoving):
        km.generate_data_key("flap", *MODEL)
    assert len(_moved_lines(caplog)) == 1
    now[0] += 1
    with pytest.raises(KeyStateMoving):
        km.generate_data_key("flap", *MODEL)
    assert _moved_lines(caplog)[1:] == [{**refused, "operations_not_logged": 3}]


def test_the_counts_of_versions_that_stopped_flapping_do_not_crowd_out_a_new_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A version that stopped flapping (an admin's disable met by two operations in a minute,
    then never again) kept its count of operations not logged for good: once as many versions
    as the lines remember had left one, a version flapping now had its operations between lines
    dropped, its next line saying 0. The versions counted longest ago are forgotten first."""
    now = [1000.0]
    lines = StateMoveLines(logging.getLogger("state-lines-test"), lambda: now[0])
    caplog.set_level(logging.WARNING, logger="state-lines-test")
    met: Any = {"attempts": 2, "disabled": 1, "stale": 0, "outcome": "KEY_DISABLED"}
    for version in range(1, state_lines._MAX_VERSIONS + 2):
        lines.retried("old", version, **met)  # logged
        lines.retried("old", version, **met)  # counted, never logged: it stopped
    caplog.clear()
    lines.retried("new", 1, **met)
    lines.retried("new", 1, **met)
    now[0] += state_lines.REPEAT_SECONDS
    lines.retried("new", 1, **met)
    assert [r.operations_not_logged for r in caplog.records] == [0, 1]  # before: [0, 0]


def test_a_refusal_after_a_stale_kek_and_disables_counts_what_each_attempt_met(
    km: KeyManager,
    replica: Callable[[], KeyManager],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A KEK handle gone stale under the first attempt, then a disable under each of the other
    three: refused KEY_DISABLED after 4 attempts (README upgrade item 94), but told it was
    disabled "3 times in a row", neither the attempts made nor the rule documented. The message
    counts both: 3 disables in 4 attempts."""
    km.create_key("flap")
    caplog.set_level(logging.WARNING, logger=keys_module.__name__)
    real = keys_module._wrap
    flaps = flap_during(monkeypatch, "_wrap", replica(), "flap", 1, times=1000)
    flapping = keys_module._wrap
    staled: list[int] = []

    def stale_kek_first(hs: HsmSession, kek: Any, key: int) -> bytes:
        if staled:
            return flapping(hs, kek, key)
        scratch = hs.direct.generate_aes_key(keys_module.SCRATCH_KEY)
        hs.direct.destroy(scratch)
        staled.append(scratch)
        kek.handle = scratch  # the KEK's handle names nothing any more
        return real(hs, kek, key)

    monkeypatch.setattr(keys_module, "_wrap", stale_kek_first)
    with pytest.raises(KeyStateMoving) as info:
        km.generate_data_key("flap", *MODEL)
    assert info.value.message == (
        "key 'flap' version 1 was disabled while the HSM used it, 3 times in 4 attempts "
        "(another replica is changing its state); retry once it holds still"
    )
    assert len(flaps) == 3
    assert [
        (m["attempts"], m["disabled_under_it"], m["stale_handles"]) for m in _moved_lines(caplog)
    ] == [(4, 3, 1)]


def test_a_disable_that_lands_between_the_wrap_and_the_answer_refuses_the_release(
    hsm: Hsm, km: KeyManager, replica: Callable[[], KeyManager], tee_key: rsa.RSAPrivateKey
) -> None:
    """The enabler is read inside the release's one C call, after the wrap: a disable on another
    replica that returned after the token wrapped (before the read) drops the answer, as when the
    read was a call of its own after the re-wrap. The wrapped key is not returned, no session
    object is left, and the stale enabler does not count against the key."""
    km.create_key("race")
    key = km.generate_data_key("race", *MODEL)
    before = session_objects(hsm)
    with (
        _disable_inside_the_rewrap(hsm, replica(), "race", 1) as disabled,
        pytest.raises(FailedPrecondition) as info,
    ):
        km.release_to_ephemeral("race", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "KEY_DISABLED"
    assert info.value.message == "key 'race' version 1 is disabled"
    assert disabled[0].versions[0].state is KeyState.DISABLED
    assert session_objects(hsm) == before
    assert km.unusable_keys() == {}


@pytest.mark.parametrize("kek", ["immutable", "modifiable"])
def test_a_version_disabled_on_another_replica_between_two_releases_is_refused(
    hsm: Hsm,
    replica: Callable[[], KeyManager],
    tee_key: rsa.RSAPrivateKey,
    kek: str,
) -> None:
    """The same refusal, reason and message whether the still-enabled read is a call of its own
    or the re-wrap's last: a cache that has not seen the disable (its lookup outlives the test)
    still refuses, through the enabler or the KEK's flag."""
    km = KeyManager(hsm, lookup_cache_ttl=3600)
    if kek == "modifiable":
        hsm.call(functools.partial(_legacy_kek, key_id="gone"))
    else:
        km.create_key("gone")
    key = km.generate_data_key("gone", *MODEL)
    km.release_to_ephemeral("gone", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])  # cached
    replica().disable_key("gone", 1)
    assert km._cache["gone"][2][0].enabled  # the cache has not seen the disable
    before = session_objects(hsm)
    with pytest.raises(FailedPrecondition) as info:
        km.release_to_ephemeral("gone", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "KEY_DISABLED"
    assert info.value.message == "key 'gone' version 1 is disabled"
    assert session_objects(hsm) == before
    assert km.unusable_keys() == {}


@pytest.mark.parametrize("kek", ["immutable", "modifiable"])
def test_the_releases_first_read_and_the_read_after_the_hsms_work_are_one_check(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey, kek: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a version's state is read before the unwrap, and what it must hold, was decided in
    _release_with while _state_read decided what to read (each on needs_enabler): edited apart,
    the C call's first compare could read one thing and look for another. Both come from one
    keys._state_check now: the release's C call is given its read and value, _still_enabled
    makes its read, and on an enabled version the read gives exactly that value (the enabler's
    label), or, for a KEK made modifiable, no value is compared first and the flag reads set."""
    if kek == "modifiable":
        hsm.call(functools.partial(_legacy_kek, key_id="one"))
    else:
        km.create_key("one")
    key = km.generate_data_key("one", *MODEL)
    checks: list[Any] = []
    given: list[tuple[Any, Any]] = []
    real_check, real_rewrap = keys_module._state_check, DirectSession.rewrap_oaep

    def check(version: _kek.KekVersion) -> Any:
        checks.append(real_check(version))
        return checks[-1]

    def rewrap(self: DirectSession, *args: Any, **kwargs: Any) -> Any:
        given.append((kwargs["state"], kwargs["enabled"]))
        return real_rewrap(self, *args, **kwargs)

    monkeypatch.setattr(keys_module, "_state_check", check)
    monkeypatch.setattr(DirectSession, "rewrap_oaep", rewrap)
    km.release_to_ephemeral("one", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])
    km.generate_data_key("one", *MODEL)  # its read after the wrap: _still_enabled
    assert len(checks) == 2
    assert given == [(checks[0].read, checks[0].enabled)]
    after = checks[1]
    if kek == "modifiable":
        assert [c.enabled for c in checks] == [None, None]
        assert after.read.value() == b"\x01"  # CKA_UNWRAP, set
    else:
        assert checks[0].enabled is not None
        assert after.read.value() == after.enabled == checks[0].enabled


def test_a_disabled_versions_enabler_handle_given_to_another_object_refuses_the_release(
    hsm: Hsm, replica: Callable[[], KeyManager], tee_key: rsa.RSAPrivateKey
) -> None:
    """A token may give a destroyed object's handle to a new object (PKCS#11 allows it; SoftHSM2
    never does, so the cached handle is pointed at another live enabler, as such a token would
    leave it). The check after the re-wrap read an attribute every object has through the cached
    enabler handle, so a version another replica had disabled was still released until the
    lookup cache expired. It reads the enabler's own label now: another object's is a stale
    handle, the key is looked up afresh, and the release is refused."""
    km = KeyManager(hsm, lookup_cache_ttl=3600)  # the cache outlives the test: no timing
    km.create_key("reused")
    km.create_key("bystander")
    keys = {k: km.generate_data_key(k, *MODEL) for k in ("reused", "bystander")}
    for key_id, key in keys.items():  # both keys' handles cached, as busy keys' are
        km.release_to_ephemeral(key_id, 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])
    replica().disable_key("reused", 1)
    cached = {k: km._cache[k][2][0] for k in keys}
    assert cached["reused"].enabled  # the cache has not seen the disable
    cached["reused"].enablers[0].handle = cached["bystander"].enablers[0].handle
    with pytest.raises(FailedPrecondition) as info:
        km.release_to_ephemeral("reused", 1, keys["reused"].wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "KEY_DISABLED"
    bystander = keys["bystander"].wrapped  # the other key, whose enabler it is, still releases
    km.release_to_ephemeral("bystander", 1, bystander, spki(tee_key), [OaepHash.SHA1])


def test_a_disabled_versions_enabler_handle_given_to_an_object_with_a_longer_label_refuses_it(
    hsm: Hsm, replica: Callable[[], KeyManager], tee_key: rsa.RSAPrivateKey
) -> None:
    """The release's state read is made by the C call into a buffer of LABEL_MAX_BYTES: an object
    that took the enabler's handle with a longer label (here the enabler's own, extended) answers
    CKR_BUFFER_TOO_SMALL, which is no enabler's answer: a stale handle, looked up afresh, and the
    release refused KEY_DISABLED, not an HSM error (nothing tested this branch: dropping it from
    keys._unreadable_state passed every test)."""
    km = KeyManager(hsm, lookup_cache_ttl=3600)  # the cache outlives the test: no timing
    km.create_key("longer")
    key = km.generate_data_key("longer", *MODEL)
    km.release_to_ephemeral("longer", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])  # cached
    enabler = km._cache["longer"][2][0].enablers[0]
    label = enabler.label.decode() + "x" * _kek.LABEL_MAX_BYTES

    def other_object(hs: HsmSession) -> int:
        made = hs.session.create_object(
            {Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: False, Attribute.LABEL: label}
        )
        return int(made.handle)

    replica().disable_key("longer", 1)
    enabler.handle = hsm.call(other_object, name="test")
    with pytest.raises(FailedPrecondition) as info:
        km.release_to_ephemeral("longer", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert (info.value.reason, info.value.message) == (
        "KEY_DISABLED",
        "key 'longer' version 1 is disabled",
    )
    assert km.unusable_keys() == {}


def test_a_disable_that_lands_while_the_hsm_wraps_a_new_data_key_refuses_it(
    km: KeyManager, replica: Callable[[], KeyManager], monkeypatch: pytest.MonkeyPatch
) -> None:
    """generate_data_key read the enabler before the HSM wrapped the new data key: a disable on
    another replica that returned meanwhile still had a data key wrapped under the disabled
    version handed to a publisher (its model published under a version `keys disable` had
    retired). It is refused KEY_DISABLED, and the stale enabler does not count against the key."""
    km.create_key("gen")
    other = replica()
    disabled = _disable_during(monkeypatch, "_wrap", other, "gen", 1)
    with pytest.raises(FailedPrecondition) as info:
        km.generate_data_key("gen", *MODEL)
    assert info.value.reason == "KEY_DISABLED"
    assert disabled[0].versions[0].state is KeyState.DISABLED
    monkeypatch.undo()
    assert km.unusable_keys() == {}
    other.enable_key("gen", 1)
    assert km.generate_data_key("gen", *MODEL).version == 1


@pytest.mark.parametrize("version", [1, 2], ids=["from-version", "to-version"])
def test_a_disable_of_either_version_that_lands_during_a_rewrap_refuses_it(
    km: KeyManager, replica: Callable[[], KeyManager], monkeypatch: pytest.MonkeyPatch, version: int
) -> None:
    """ReWrap read both versions' enablers before the HSM unwrapped and wrapped: a disable that
    returned on another replica meanwhile still had the key unwrapped under a disabled version
    (as a release would be refused) or wrapped *to* one (a model stored under a retired
    version). Injected between the unwrap and the wrap, it is refused KEY_DISABLED."""
    km.create_key("move")
    key = km.generate_data_key("move", *MODEL)
    km.rotate_key("move")
    other = replica()
    disabled = _disable_during(monkeypatch, "_wrap", other, "move", version)
    with pytest.raises(FailedPrecondition) as info:
        km.rewrap("move", 1, key.wrapped)
    assert info.value.reason == "KEY_DISABLED"
    assert f"version {version} is disabled" in info.value.message
    assert disabled[0].versions[version - 1].state is KeyState.DISABLED
    monkeypatch.undo()
    assert km.unusable_keys() == {}
    other.enable_key("move", version)
    assert km.rewrap("move", 1, key.wrapped).version == 2


@pytest.mark.parametrize("operation", ["release", "generate_data_key", "rewrap"])
def test_a_disable_that_returns_right_after_the_hsm_used_a_modifiable_kek_refuses_the_answer(
    hsm: Hsm,
    km: KeyManager,
    replica: Callable[[], KeyManager],
    tee_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    operation: str,
) -> None:
    """A KEK made modifiable before is refused by the HSM itself once disabled (its flags), but
    only inside the call: a disable that returned on another replica after the unwrap or wrap and
    before the answer still had it answered. Its flag is read after the HSM call, as an
    enabler is."""
    hsm.call(functools.partial(_legacy_kek, key_id="old"))
    key = km.generate_data_key("old", *MODEL)
    if operation == "rewrap":
        km.rotate_key("old")  # from the modifiable version 1 to an immutable version 2
    other = replica()
    with pytest.raises(FailedPrecondition) as info:
        if operation == "release":
            # The release reads the flag inside its one C call: the disable goes in there.
            with _disable_inside_the_rewrap(hsm, other, "old", 1) as disabled:
                km.release_to_ephemeral("old", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])
        else:
            disabled = _disable_during(monkeypatch, "_wrap", other, "old", 1, after=True)
            if operation == "generate_data_key":
                km.generate_data_key("old", *MODEL)
            else:
                km.rewrap("old", 1, key.wrapped)
    assert info.value.reason == "KEY_DISABLED"
    assert disabled[0].versions[0].state is KeyState.DISABLED
    assert km.unusable_keys() == {}


def test_a_disable_destroys_an_enabler_another_replica_made_at_the_same_moment(
    hsm: Hsm,
    km: KeyManager,
    replica: Callable[[], KeyManager],
    tee_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two replicas enabling a version at the same moment each make an enabler, and a SoftHSM2
    instance that wrote its own after the other's, without searching in between, never sees
    the other's (it re-reads the token only when another instance changed it since its last
    write). A disable on that replica destroyed only the enabler it saw and answered DISABLED,
    while every other replica kept releasing under the version."""
    km.create_key("twice")
    key = km.generate_data_key("twice", *MODEL)
    km.disable_key("twice", 1)
    other = replica()
    real = keys_module._create_enabler
    raced: list[Any] = []

    def enabled_meanwhile(*args: Any, **kwargs: Any) -> Any:
        if not raced:  # km's enable lands between other's search and other's enabler
            raced.append(None)
            raced[0] = km.enable_key("twice", 1)
        return real(*args, **kwargs)

    monkeypatch.setattr(keys_module, "_create_enabler", enabled_meanwhile)
    other.enable_key("twice", 1)
    monkeypatch.undo()
    assert raced[0].versions[0].state is KeyState.ENABLED
    assert len(_objects(hsm, "twice")) == 3  # the KEK and two enablers
    answer = other.disable_key("twice", 1)
    assert answer.versions[0].state is KeyState.DISABLED
    assert len(_objects(hsm, "twice")) == 1  # the KEK: both enablers went
    for manager in (km, other):
        assert manager.describe_key("twice").versions[0].state is KeyState.DISABLED
        with pytest.raises(FailedPrecondition) as info:
            manager.release_to_ephemeral("twice", 1, key.wrapped, spki(tee_key), [OaepHash.SHA1])
        assert info.value.reason == "KEY_DISABLED"
