"""The direct PKCS#11 path (``strongroom.keybroker.p11direct``) against python-pkcs11 and SoftHSM2.

What it must get exactly right is what python-pkcs11 would have done: the entry-point offsets in
the function list, the exception class for every return code, the bytes a wrap produces, and
the session objects' attributes.
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11x
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from strongroom.keybroker import _kek, p11direct
from strongroom.keybroker import _pkcs11_errors as errs
from strongroom.keybroker.errors import HsmUnavailable
from strongroom.keybroker.hsm import Hsm, HsmSession
from strongroom.keybroker.keys import (
    EPHEMERAL_KEY_IMPORT,
    NEW_DATA_KEY,
    SCRATCH_KEY,
    SESSION_DEK_UNWRAP,
    KeyManager,
)
from strongroom.keybroker.p11direct import (
    _ENTRY_POINTS,
    RETURN_CODES,
    AttributeQuery,
    AttributeRead,
    StateChanged,
    StateReadFailed,
    TargetRefused,
    Template,
    UnwrapFailed,
    _Attribute,
    _FunctionList,
    error_for,
)
from strongroom.oaep import OaepHash
from tests.keybroker.helpers import (
    MODEL,
    hsm_answers_again,
    release_library_stand_in,
    session_objects,
    spki,
    token_call_replaced,
    unwraps_counted,
)


def _python_pkcs11_mapping() -> dict[str, str]:
    """``CKR_*`` name -> exception class name, read from the installed python-pkcs11's source."""
    pxd = Path(pkcs11.__file__).with_name("_pkcs11.pxd").read_text()
    body = pxd[pxd.index("map_rv_to_error") :]
    return dict(re.findall(r"rv == (CKR_\w+):\s*\n\s*exc = (\w+)\(\)", body))


def test_return_codes_map_to_the_classes_python_pkcs11_raises() -> None:
    theirs = _python_pkcs11_mapping()
    assert len(theirs) > 60  # the parse found the table
    ours = {name: cls.__name__ for name, cls in RETURN_CODES.values()}
    assert ours == theirs
    for code, (_, cls) in RETURN_CODES.items():
        assert type(error_for(code)) is cls


def test_spot_checked_return_code_values() -> None:
    # Values from the PKCS#11 2.40 header (pkcs11t.h), independent of the table's own source.
    for code, name in (
        (0x005, "CKR_GENERAL_ERROR"),
        (0x068, "CKR_KEY_FUNCTION_NOT_PERMITTED"),
        (0x082, "CKR_OBJECT_HANDLE_INVALID"),
        (0x0B3, "CKR_SESSION_HANDLE_INVALID"),
        (0x110, "CKR_WRAPPED_KEY_INVALID"),
        (0x113, "CKR_WRAPPING_KEY_HANDLE_INVALID"),
        (0x0F0, "CKR_UNWRAPPING_KEY_HANDLE_INVALID"),
    ):
        if name == "CKR_KEY_FUNCTION_NOT_PERMITTED":
            assert code not in RETURN_CODES  # python-pkcs11 leaves it unmapped
        else:
            assert RETURN_CODES[code][0] == name


def test_an_unmapped_code_reads_as_python_pkcs11_reports_it() -> None:
    exc = error_for(0x68)
    assert type(exc) is p11x.PKCS11Error
    assert str(exc) == "Unmapped error code 0x68"
    assert errs.is_function_not_permitted(exc)
    assert errs.is_device_failure(error_for(0x190))  # CKR_CRYPTOKI_NOT_INITIALIZED


def test_the_function_list_offsets_match_the_modules_own_symbols(hsm: Hsm) -> None:
    # SoftHSM2 exports every entry point by name as well: each slot of the table we read must
    # hold exactly the function of that name.
    library = ctypes.CDLL(hsm._module_key)
    get_list = library.C_GetFunctionList
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
    table = ctypes.POINTER(_FunctionList)()
    assert get_list(ctypes.byref(table)) == 0
    assert len(_ENTRY_POINTS) == 68
    for name in _ENTRY_POINTS:
        exported = ctypes.cast(getattr(library, f"C_{name}"), ctypes.c_void_p).value
        assert getattr(table.contents, f"C_{name}") == exported, name
    _ctypes.dlclose(library._handle)


def _kek_and_data_key(hs: HsmSession) -> tuple[Any, bytes, bytes]:
    session = hs.session
    kek = session.generate_key(
        KeyType.AES, 256, store=False, template={Attribute.WRAP: True, Attribute.UNWRAP: True}
    )
    dek = session.generate_key(KeyType.AES, 256, store=False, template=_kek.RETURNED_DEK_TEMPLATE)
    value = bytes(dek[Attribute.VALUE])
    blob = kek.wrap_key(dek, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    dek.destroy()
    return kek, blob, value


def test_a_direct_rewrap_gives_the_key_python_pkcs11_wrapped(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey
) -> None:
    def op(hs: HsmSession) -> None:
        kek, blob, value = _kek_and_data_key(hs)
        raw = hs.direct
        handle = raw.unwrap_aes_kwp(kek.handle, blob, SESSION_DEK_UNWRAP)
        # RFC 5649 is deterministic: wrapping the unwrapped key again gives the same blob.
        assert raw.wrap_aes_kwp(kek.handle, handle, 40) == blob
        numbers = tee_key.public_key().public_numbers()
        modulus = numbers.n.to_bytes(384, "big")
        public = raw.create_object(
            Template(
                [
                    (Attribute.CLASS, ObjectClass.PUBLIC_KEY),
                    (Attribute.KEY_TYPE, KeyType.RSA),
                    (Attribute.TOKEN, False),
                    (Attribute.MODULUS, modulus),
                    (Attribute.PUBLIC_EXPONENT, numbers.e.to_bytes(3, "big")),
                    (Attribute.WRAP, True),
                ]
            )
        )
        for choice in hsm.oaep_hashes:
            out = raw.wrap_oaep(public, handle, choice, len(modulus))
            digest: hashes.HashAlgorithm = {
                OaepHash.SHA1: hashes.SHA1(),
                OaepHash.SHA256: hashes.SHA256(),
                OaepHash.SHA384: hashes.SHA384(),
                OaepHash.SHA512: hashes.SHA512(),
            }[choice]
            assert tee_key.decrypt(out, padding.OAEP(padding.MGF1(digest), digest, None)) == value
        assert raw.ulong_attribute(public, Attribute.CLASS) == ObjectClass.PUBLIC_KEY
        with pytest.raises(p11x.AttributeSensitive):
            raw.ulong_attribute(handle, Attribute.VALUE)  # sensitive, as the template says
        raw.destroy(public)
        raw.destroy(handle)
        with pytest.raises(p11x.ObjectHandleInvalid):
            raw.destroy(handle)

    hsm.call(op, name="test")


def test_failures_raise_the_classes_python_pkcs11_raises(hsm: Hsm) -> None:
    def op(hs: HsmSession) -> None:
        kek, _, _ = _kek_and_data_key(hs)
        bad = bytes(40)
        with pytest.raises(p11x.PKCS11Error) as theirs:
            kek.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                bad,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                template=_kek.SESSION_DEK_TEMPLATE,
            )
        with pytest.raises(p11x.PKCS11Error) as ours:
            hs.direct.unwrap_aes_kwp(kek.handle, bad, SESSION_DEK_UNWRAP)
        assert type(ours.value) is type(theirs.value)
        with pytest.raises(p11x.WrappingKeyHandleInvalid) as stale:
            hs.direct.wrap_aes_kwp(0xDEAD, kek.handle, 40)
        assert errs.is_stale_handle(stale.value)  # so a release looks its KEK up afresh
        with pytest.raises(ValueError, match="more than this path handles"):
            hs.direct.wrap_aes_kwp(kek.handle, kek.handle, 4096)

    hsm.call(op, name="test")


def test_a_template_refilled_with_bytes_leaves_the_original_alone() -> None:
    base = Template([(Attribute.CLASS, ObjectClass.PUBLIC_KEY), (Attribute.MODULUS, b"")])
    modulus = bytes(range(256)) * 2
    refilled = base.with_bytes({Attribute.MODULUS: modulus})
    del modulus  # the copy keeps the bytes it points at alive
    entry = refilled.array[1]
    assert entry.type == Attribute.MODULUS
    assert ctypes.string_at(entry.value, entry.length) == bytes(range(256)) * 2
    assert base.array[1].length == 0
    assert refilled.array[0].value == base.array[0].value  # the class value is shared, not copied
    assert ctypes.c_ulong.from_address(refilled.array[0].value).value == ObjectClass.PUBLIC_KEY


_DIGESTS: dict[OaepHash, hashes.HashAlgorithm] = {
    OaepHash.SHA1: hashes.SHA1(),
    OaepHash.SHA256: hashes.SHA256(),
    OaepHash.SHA384: hashes.SHA384(),
    OaepHash.SHA512: hashes.SHA512(),
}


def _public_template(key: rsa.RSAPrivateKey) -> Template:
    numbers = key.public_key().public_numbers()
    return EPHEMERAL_KEY_IMPORT.with_bytes(
        {
            Attribute.MODULUS: numbers.n.to_bytes(384, "big"),
            Attribute.PUBLIC_EXPONENT: numbers.e.to_bytes(3, "big"),
        }
    )


def _session_objects(hs: HsmSession) -> int:
    return len(list(hs.session.get_objects({Attribute.TOKEN: False})))


def _rewrap(
    hs: HsmSession,
    unwrapping_key: int,
    blob: bytes,
    tee_key: rsa.RSAPrivateKey,
    choice: OaepHash,
    **changes: Any,
) -> bytes | None:
    """``rewrap_oaep`` as a release makes it (to ``tee_key``), with ``changes`` to its arguments."""
    arguments: dict[str, Any] = {
        "key_template": SESSION_DEK_UNWRAP,
        "key_length": 32,
        "public_template": _public_template(tee_key),
        "choice": choice,
        "size": 384,
        "state": None,
    } | changes
    return hs.direct.rewrap_oaep(unwrapping_key, blob, **arguments)


def test_the_one_call_rewrap_gives_what_the_single_calls_give(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey
) -> None:
    def op(hs: HsmSession) -> None:
        kek, blob, value = _kek_and_data_key(hs)
        before = _session_objects(hs)
        for choice in hsm.oaep_hashes:
            out = _rewrap(hs, kek.handle, blob, tee_key, choice)
            assert out is not None and len(out) == 384
            digest = _DIGESTS[choice]
            assert tee_key.decrypt(out, padding.OAEP(padding.MGF1(digest), digest, None)) == value
        assert _session_objects(hs) == before  # the unwrapped key and the imported key are gone

    hsm.call(op, name="test")


def test_each_failing_step_raises_its_own_class_and_leaves_no_object(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey
) -> None:
    def rewrap(hs: HsmSession, kek: Any, blob: bytes, **changes: Any) -> bytes | None:
        return _rewrap(hs, kek.handle, blob, tee_key, hsm.oaep_hashes[0], **changes)

    def op(hs: HsmSession) -> None:
        kek, blob, _ = _kek_and_data_key(hs)
        before = _session_objects(hs)
        # The unwrap: the class the single call raises, inside UnwrapFailed.
        with pytest.raises(p11x.PKCS11Error) as single:
            hs.direct.unwrap_aes_kwp(kek.handle, bytes(40), SESSION_DEK_UNWRAP)
        with pytest.raises(UnwrapFailed) as failed:
            rewrap(hs, kek, bytes(40))
        assert type(failed.value.error) is type(single.value)
        with pytest.raises(UnwrapFailed) as stale:
            _rewrap(hs, 0xDEAD, blob, tee_key, hsm.oaep_hashes[0])
        assert errs.is_stale_handle(stale.value.error)  # so a release looks its KEK up afresh
        # The import: a template the token refuses, after the key was unwrapped (the KEK worked:
        # what the token refused is the caller's key, so TargetRefused).
        with pytest.raises(TargetRefused) as imported:
            rewrap(
                hs, kek, blob, public_template=Template([(Attribute.CLASS, ObjectClass.PUBLIC_KEY)])
            )
        assert isinstance(imported.value.error, p11x.TemplateIncomplete)
        # The wrap: an output smaller than the modulus (CKR_BUFFER_TOO_SMALL, which python-pkcs11
        # leaves unmapped), after both objects exist.
        with pytest.raises(TargetRefused) as wrapped:
            rewrap(hs, kek, blob, size=100)
        assert "Unmapped error code 0x150" in str(wrapped.value.error)
        with pytest.raises(ValueError, match="more than this path handles"):
            rewrap(hs, kek, blob, size=4096)
        assert _session_objects(hs) == before

    hsm.call(op, name="test")


def test_an_unwrapped_key_of_another_length_is_not_the_callers(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey
) -> None:
    # SoftHSM2 reports 0 for CKA_VALUE_LEN (so it is not held to a length); a token that reports
    # one is stood in for by answering that single call from Python, every other call the token's.
    reports: list[int] = []

    def report(session: int, handle: int, query: int, count: int) -> int:
        attribute = ctypes.cast(query, ctypes.POINTER(_Attribute)).contents
        assert (count, attribute.type) == (1, Attribute.VALUE_LEN)
        ctypes.c_ulong.from_address(attribute.value).value = reports[-1]
        return 0

    prototype = ctypes.CFUNCTYPE(
        ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong
    )
    reporting = prototype(report)

    def op(hs: HsmSession) -> None:
        kek, blob, _ = _kek_and_data_key(hs)
        before = _session_objects(hs)
        handle = hs.direct.unwrap_aes_kwp(kek.handle, blob, SESSION_DEK_UNWRAP)
        assert hs.direct.ulong_attribute(handle, Attribute.VALUE_LEN) == 0
        hs.direct.destroy(handle)
        points = hs.direct._module.entry_points
        token_own = points.get_attribute_value
        points.get_attribute_value = ctypes.cast(reporting, ctypes.c_void_p).value
        try:
            for reported, released in ((16, False), (32, True), (0, True)):
                reports.append(reported)
                out = _rewrap(hs, kek.handle, blob, tee_key, hsm.oaep_hashes[0])
                assert (out is not None) == released, reported
        finally:
            points.get_attribute_value = token_own
        assert _session_objects(hs) == before

    hsm.call(op, name="test")


_KNOWN_KEK = bytes(range(32))


def _blob_with_nuls() -> tuple[bytes, bytes]:
    """A data key and its RFC 5649 wrap under :data:`_KNOWN_KEK` that holds NUL bytes before its
    last (the first such key of a fixed sequence: the wrap is deterministic, so is the test)."""
    for i in range(1000):
        value = hashlib.sha256(i.to_bytes(2, "big")).digest()
        blob = aes_key_wrap_with_padding(_KNOWN_KEK, value)
        if b"\0" in blob[:20]:
            return value, blob
    raise AssertionError("no wrap with a NUL in 1000 keys")


def test_callbacks_built_from_the_modules_prototypes_see_binary_buffers_whole(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey
) -> None:
    # The prototypes typed a wrapped key and a wrap's output c_char_p: a callback built from them
    # (how the fault-injection tests stand in for the token) got a copy cut at the first NUL, so
    # it saw a blob shortened, and passed on, the token read past the copy (or wrote into it).
    # Built from the module's own prototypes, each callback here sees the buffers by address and
    # passes them on to SoftHSM2: the blob arrives whole, in the single call and in the C
    # release's, and the wrap writes the caller's own buffer.
    value, blob = _blob_with_nuls()
    token = hsm._direct
    assert token is not None
    token_unwrap = p11direct._PROTOTYPES["C_UnwrapKey"](token.entry_points.unwrap_key)
    token_wrap = p11direct._PROTOTYPES["C_WrapKey"](token.entry_points.wrap_key)
    seen: list[bytes] = []
    outputs: list[bool] = []

    def unwrap(
        session: int, mechanism: Any, key: int, wrapped: Any, length: int, *rest: Any
    ) -> int:
        if not isinstance(wrapped, int):  # a copy (c_char_p): the token must not be given it
            seen.append(wrapped)
            return _CKR_ARGUMENTS_BAD
        seen.append(ctypes.string_at(wrapped, length))
        return int(token_unwrap(session, mechanism, key, wrapped, length, *rest))

    def wrap(session: int, mechanism: Any, key: int, wrapped: int, out: Any, length: Any) -> int:
        outputs.append(isinstance(out, int))
        if not isinstance(out, int):  # a copy: the token would write into it, not the caller's
            return _CKR_ARGUMENTS_BAD
        return int(token_wrap(session, mechanism, key, wrapped, out, length))

    def op(hs: HsmSession) -> None:
        kek = hs.direct.create_object(
            Template(
                [
                    (Attribute.CLASS, ObjectClass.SECRET_KEY),
                    (Attribute.KEY_TYPE, KeyType.AES),
                    (Attribute.TOKEN, False),
                    (Attribute.VALUE, _KNOWN_KEK),
                    (Attribute.WRAP, True),
                    (Attribute.UNWRAP, True),
                ]
            )
        )
        try:
            handle = hs.direct.unwrap_aes_kwp(kek, blob, SESSION_DEK_UNWRAP)
            try:
                assert hs.direct.wrap_aes_kwp(kek, handle, len(blob)) == blob
            finally:
                hs.direct.destroy(handle)
            out = _rewrap(hs, kek, blob, tee_key, OaepHash.SHA1)
            assert out is not None
            oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
            assert tee_key.decrypt(out, oaep) == value
        finally:
            hs.direct.destroy(kek)

    with (
        token_call_replaced(hsm, "unwrap_key", p11direct._PROTOTYPES["C_UnwrapKey"](unwrap)),
        token_call_replaced(hsm, "wrap_key", p11direct._PROTOTYPES["C_WrapKey"](wrap)),
    ):
        hsm.call(op, name="test")
    assert seen == [blob, blob]  # the single unwrap, then the C release's
    assert outputs == [True, True]


_CKR_DEVICE_REMOVED = 0x32
_CKA_VALUE_LEN = 0x161
_CKR_ATTRIBUTE_TYPE_INVALID = 0x12


def test_a_failed_length_read_fails_the_release_and_the_rewrap(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey
) -> None:
    # Reading the unwrapped key's CKA_VALUE_LEN fails. "Cannot tell" (CKR_ATTRIBUTE_TYPE_INVALID)
    # is not held to a length; anything else (the device gone, here) is the failure: the data key
    # used to go on unchecked, to the next call's error or to a release, with a session that the
    # device dropped kept as if nothing happened.
    answers: list[int] = []
    direct = hsm._direct
    assert direct is not None
    real = direct.get_attribute_value

    def read(session: int, handle: int, query: int, count: int) -> int:
        # Only the length read fails: the reads a call makes of its KEK version's state once the
        # HSM has used it (keys._still_enabled) go to the token.
        if _Attribute.from_address(query).type != _CKA_VALUE_LEN:
            return int(real(session, handle, ctypes.cast(query, ctypes.POINTER(_Attribute)), count))
        return answers[-1]

    prototype = ctypes.CFUNCTYPE(
        ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong
    )
    failing = prototype(read)
    km.create_key("model")
    data_key = km.generate_data_key("model", *MODEL)
    before = session_objects(hsm)
    with token_call_replaced(hsm, "get_attribute_value", failing):
        answers.append(_CKR_ATTRIBUTE_TYPE_INVALID)
        released = km.release_to_ephemeral(
            "model", 1, data_key.wrapped, spki(tee_key), hsm.oaep_hashes[:1]
        )
        assert len(released.wrapped) == 384
        assert km.rewrap("model", 1, data_key.wrapped).version == 1
        answers.append(_CKR_DEVICE_REMOVED)
        with pytest.raises(HsmUnavailable):
            km.release_to_ephemeral(
                "model", 1, data_key.wrapped, spki(tee_key), hsm.oaep_hashes[:1]
            )
        with pytest.raises(HsmUnavailable):
            km.rewrap("model", 1, data_key.wrapped)
    hsm_answers_again(hsm)  # two drops in a row: the reconnects are backed off a moment
    assert session_objects(hsm) == before
    assert km.rewrap("model", 1, data_key.wrapped).version == 1  # reconnected


_CKR_ARGUMENTS_BAD = 0x7


def test_a_data_key_that_cannot_be_destroyed_closes_its_session(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey
) -> None:
    # C_DestroyObject refuses (with a code that is neither a device failure nor a stale handle):
    # the unwrapped data key, and the imported key of a release, stay in the session. They used
    # to stay there for every later operation (INTERNAL, session kept) until the next recycle;
    # now the operation is UNAVAILABLE and the session is closed, which destroys its objects.
    def refuse(session: int, handle: int) -> int:
        return _CKR_ARGUMENTS_BAD

    refusing = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)(refuse)
    km.create_key("model")
    data_key = km.generate_data_key("model", *MODEL)
    before = session_objects(hsm)
    with token_call_replaced(hsm, "destroy_object", refusing):
        with pytest.raises(HsmUnavailable):
            km.release_to_ephemeral(
                "model", 1, data_key.wrapped, spki(tee_key), hsm.oaep_hashes[:1]
            )
        # Each failure drops the session; a health check between waits out the back-off of the
        # drops before it and reconnects, so that the next call runs (it would be refused).
        hsm_answers_again(hsm)
        with pytest.raises(HsmUnavailable):
            km.rewrap("model", 1, data_key.wrapped)
        hsm_answers_again(hsm)
        with pytest.raises(HsmUnavailable):
            km.generate_data_key("model", *MODEL)  # its data key is not even sensitive
    hsm_answers_again(hsm)
    assert session_objects(hsm) == before


_CKR_KEY_SIZE_RANGE = 0x62


@pytest.mark.parametrize("refused", ["create_object", "wrap_key"])
def test_a_data_key_that_cannot_be_destroyed_after_a_refused_target_closes_its_session(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey, refused: str
) -> None:
    # The caller's key refused by the import or the wrap (the caller chooses it: an even modulus
    # fails SoftHSM2's wrap) while C_DestroyObject refuses: sr_rewrap_read reported the refused
    # target and kept the destroy's failure to itself, so the release was the caller's
    # EPHEMERAL_KEY_UNSUPPORTED on a session kept with the unwrapped data key in it, where the
    # one-call-at-a-time path and the length read's failure put the destroy's failure first.
    # It is UNAVAILABLE now, and the session is closed, which destroys its objects.
    def refuse(session: int, handle: int) -> int:
        return _CKR_ARGUMENTS_BAD

    def refuse_target(*args: Any) -> int:
        return _CKR_KEY_SIZE_RANGE

    direct = hsm._direct
    assert direct is not None
    signature = {
        "create_object": ctypes.CFUNCTYPE(
            ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p
        ),
        "wrap_key": ctypes.CFUNCTYPE(
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ),
    }[refused]
    refusing = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)(refuse)
    refusing_target = signature(refuse_target)
    km.create_key("model")
    data_key = km.generate_data_key("model", *MODEL)
    km.release_to_ephemeral("model", 1, data_key.wrapped, spki(tee_key), hsm.oaep_hashes[:1])
    before = session_objects(hsm)
    with (
        token_call_replaced(hsm, "destroy_object", refusing),
        token_call_replaced(hsm, refused, refusing_target),
        pytest.raises(HsmUnavailable),
    ):
        km.release_to_ephemeral("model", 1, data_key.wrapped, spki(tee_key), hsm.oaep_hashes[:1])
    assert session_objects(hsm) == before


_FIND_MARK = b"strongroom-test/find"
#: A read of every kind: a byte string (up to 8 bytes), a CK_ULONG and CK_BBOOLs.
_QUERY = AttributeQuery(
    [
        (Attribute.LABEL, 8),
        (Attribute.KEY_TYPE, "ulong"),
        (Attribute.SENSITIVE, "bool"),
        (Attribute.DERIVE, "bool"),
        (Attribute.VALUE, 64),
    ]
)


def _secret(hs: HsmSession, label: bytes, *, sensitive: bool) -> int:
    """A session generic secret under :data:`_FIND_MARK`."""
    return hs.direct.create_object(
        Template(
            [
                (Attribute.CLASS, ObjectClass.SECRET_KEY),
                (Attribute.KEY_TYPE, KeyType.GENERIC_SECRET),
                (Attribute.TOKEN, False),
                (Attribute.ID, _FIND_MARK),
                (Attribute.LABEL, label),
                (Attribute.SENSITIVE, sensitive),
                (Attribute.EXTRACTABLE, True),
                (Attribute.DERIVE, False),
                (Attribute.VALUE, bytes(range(16))),
            ]
        )
    )


def test_find_objects_returns_every_batch_and_always_ends_its_search(hsm: Hsm) -> None:
    search = Template([(Attribute.TOKEN, False), (Attribute.ID, _FIND_MARK)])

    def device_error(session: int, handles: int, most: int, count: int) -> int:
        return _CKR_DEVICE_REMOVED

    failing = ctypes.CFUNCTYPE(
        ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p
    )(device_error)
    direct = hsm._direct
    assert direct is not None

    def op(hs: HsmSession) -> None:
        made = {_secret(hs, b"n", sensitive=False) for _ in range(150)}  # more than two batches
        found = hs.direct.find_objects(search)
        assert len(found) == 150 and set(found) == made
        theirs = {o.handle for o in hs.session.get_objects({Attribute.ID: _FIND_MARK})}
        assert theirs == made
        real = direct.find_objects
        direct.find_objects = failing
        try:
            with pytest.raises(p11x.DeviceRemoved):
                hs.direct.find_objects(search)
        finally:
            direct.find_objects = real
        # The failed search was ended: a search left open makes the next CKR_OPERATION_ACTIVE.
        assert set(hs.direct.find_objects(search)) == made
        for handle in made:
            hs.direct.destroy(handle)
        assert hs.direct.find_objects(search) == []

    hsm.call(op, name="test")


def test_read_attributes_returns_each_kind_and_leaves_out_what_the_token_withholds(
    hsm: Hsm,
) -> None:
    def op(hs: HsmSession) -> None:
        readable = _secret(hs, b"a\x00b", sensitive=False)
        secret = _secret(hs, b"12345678", sensitive=True)
        too_long = _secret(hs, b"123456789", sensitive=False)
        assert hs.direct.read_attributes(readable, _QUERY) == {
            Attribute.LABEL: b"a\x00b",  # whole: not cut at its NUL
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.SENSITIVE: False,
            Attribute.DERIVE: False,
            Attribute.VALUE: bytes(range(16)),
        }
        # CKR_ATTRIBUTE_SENSITIVE for the value, the rest still read (a label of exactly 8 fits).
        assert hs.direct.read_attributes(secret, _QUERY) == {
            Attribute.LABEL: b"12345678",
            Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
            Attribute.SENSITIVE: True,
            Attribute.DERIVE: False,
        }
        # CKR_BUFFER_TOO_SMALL for the label: absent, never cut short.
        assert Attribute.LABEL not in hs.direct.read_attributes(too_long, _QUERY)
        for handle in (readable, secret, too_long):
            hs.direct.destroy(handle)
        with pytest.raises(p11x.ObjectHandleInvalid) as stale:
            hs.direct.read_attributes(readable, _QUERY)
        assert errs.is_stale_handle(stale.value)  # so a lookup searches again

    hsm.call(op, name="test")


def test_set_attributes_sets_and_maps_a_refusal(hsm: Hsm) -> None:
    def op(hs: HsmSession) -> None:
        handle = _secret(hs, b"flags", sensitive=False)
        hs.direct.set_attributes(handle, Template([(Attribute.DERIVE, True)]))
        assert hs.direct.read_attributes(handle, _QUERY)[Attribute.DERIVE] is True
        with pytest.raises(p11x.PKCS11Error):
            # CKA_SENSITIVE cannot go back to false once set (PKCS#11): refused, not ignored.
            hs.direct.set_attributes(handle, Template([(Attribute.SENSITIVE, True)]))
            hs.direct.set_attributes(handle, Template([(Attribute.SENSITIVE, False)]))
        hs.direct.destroy(handle)

    hsm.call(op, name="test")


def test_an_attribute_query_takes_only_the_kinds_it_knows() -> None:
    for kind in (0, -1, True, "bytes"):
        with pytest.raises(ValueError, match="not an attribute kind"):
            AttributeQuery([(Attribute.LABEL, kind)])  # type: ignore[list-item]


#: What a generated session key must read back as, whichever way it was generated.
_GENERATED = AttributeQuery(
    [
        (Attribute.CLASS, "ulong"),
        (Attribute.KEY_TYPE, "ulong"),
        (Attribute.VALUE_LEN, "ulong"),
        (Attribute.ID, 8),
        (Attribute.LABEL, 8),
        *(
            (attribute, "bool")
            for attribute in (
                Attribute.TOKEN,
                Attribute.PRIVATE,
                Attribute.SENSITIVE,
                Attribute.EXTRACTABLE,
                Attribute.ENCRYPT,
                Attribute.DECRYPT,
                Attribute.WRAP,
                Attribute.UNWRAP,
                Attribute.SIGN,
                Attribute.VERIFY,
                Attribute.DERIVE,
                Attribute.LOCAL,
                Attribute.ALWAYS_SENSITIVE,
                Attribute.NEVER_EXTRACTABLE,
            )
        ),
    ]
)


@pytest.mark.parametrize(
    ("direct_template", "their_template"),
    [(NEW_DATA_KEY, _kek.RETURNED_DEK_TEMPLATE), (SCRATCH_KEY, _kek.SESSION_DEK_TEMPLATE)],
    ids=["data-key", "scratch-key"],
)
def test_a_direct_session_key_is_the_one_python_pkcs11_generated(
    hsm: Hsm, direct_template: Template, their_template: dict[Attribute, Any]
) -> None:
    def op(hs: HsmSession) -> None:
        theirs = hs.session.generate_key(
            KeyType.AES, 256, store=False, template=their_template
        ).handle
        ours = hs.direct.generate_aes_key(direct_template)
        read = [hs.direct.read_attributes(h, _GENERATED) for h in (theirs, ours)]
        assert read[0] == read[1]
        assert read[1][Attribute.KEY_TYPE] == KeyType.AES and read[1][Attribute.VALUE_LEN] == 32
        for handle in (theirs, ours):
            hs.direct.destroy(handle)

    hsm.call(op, name="test")


_CKA_LABEL = 0x3
_READ = ctypes.CFUNCTYPE(
    ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong
)


def test_a_release_is_one_foreign_call_that_reads_the_versions_state_first_and_last(
    hsm: Hsm, km: KeyManager, tee_key: rsa.RSAPrivateKey
) -> None:
    # The still-enabled read (keys._still_enabled) was a foreign call of its own after the C
    # re-wrap: a second release and retake of the interpreter lock per release, ~60 us. It is
    # the C call's last PKCS#11 call now, on the version's enabler, after the length read; and
    # its first, before the unwrap (a version already disabled unwraps nothing).
    km.create_key("model")
    data_key = km.generate_data_key("model", *MODEL)
    target = spki(tee_key)
    km.release_to_ephemeral("model", 1, data_key.wrapped, target, hsm.oaep_hashes[:1])  # cached
    direct = hsm._direct
    assert direct is not None
    enabler = km._cache["model"][2][0].enablers[0]
    foreign: list[str] = []
    names = [n for n, v in vars(direct).items() if isinstance(v, ctypes._CFuncPtr)]
    reads: list[tuple[int, int]] = []
    token_read = _READ(direct.entry_points.get_attribute_value)

    def read(session: int, handle: int, query: int, count: int) -> int:
        reads.append((handle, _Attribute.from_address(query).type))
        return int(token_read(session, handle, query, count))

    def counted(name: str, real: Any) -> Any:
        def call(*args: Any) -> Any:
            foreign.append(name)
            return real(*args)

        return call

    reading = _READ(read)
    originals = {name: getattr(direct, name) for name in names}
    with contextlib.ExitStack() as stack:
        stack.enter_context(token_call_replaced(hsm, "get_attribute_value", reading))
        for name in names:  # after the replacement, so that its single call is counted too
            stack.callback(setattr, direct, name, originals[name])
            setattr(direct, name, counted(name, getattr(direct, name)))
        km.release_to_ephemeral("model", 1, data_key.wrapped, target, hsm.oaep_hashes[:1])
    assert "rewrap" in names and "get_attribute_value" in names
    assert foreign == ["rewrap"]
    assert [attribute for _, attribute in reads] == [_CKA_LABEL, _CKA_VALUE_LEN, _CKA_LABEL]
    assert reads[0][0] == reads[2][0] == enabler.handle


def test_the_rewraps_first_state_read_stops_it_before_the_unwrap(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey
) -> None:
    # With the value an enabled version holds, the state is read before the unwrap too: another
    # value is StateChanged and a failed read StateReadFailed, the token asked for no unwrap and
    # no object left; the value itself goes on to the unwrap, and is read again after the wrap.
    def op(hs: HsmSession) -> None:
        kek, blob, _ = _kek_and_data_key(hs)
        rewrap = functools.partial(_rewrap, hs, kek.handle, blob, tee_key, hsm.oaep_hashes[0])
        before = _session_objects(hs)
        state = AttributeRead(kek.handle, Attribute.UNWRAP, 1)
        out = rewrap(state=state, enabled=b"\x01")
        assert out is not None and len(out) == 384
        assert state.value() == b"\x01"
        with unwraps_counted(hsm) as unwraps:
            changed = AttributeRead(kek.handle, Attribute.UNWRAP, 1)
            with pytest.raises(StateChanged):
                rewrap(state=changed, enabled=b"\x00")
            assert changed.value() == b"\x01"  # what was read, for the caller to judge
            longer = AttributeRead(kek.handle, Attribute.UNWRAP, 1)
            with pytest.raises(StateChanged):  # the length counts, not only the bytes
                rewrap(state=longer, enabled=b"\x01\x00")
            gone = AttributeRead(0xDEAD, Attribute.LABEL, 64)
            with pytest.raises(StateReadFailed) as failed:
                rewrap(state=gone, enabled=b"x")
            assert errs.is_stale_handle(failed.value.error)
        assert unwraps == []
        assert _session_objects(hs) == before

    hsm.call(op, name="test")


def test_an_enabled_value_without_its_state_read_is_refused_before_the_unwrap(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey
) -> None:
    # The C call makes its first read only with both: given ``enabled`` alone, it skipped the
    # check it was asked for and re-wrapped the key. Refused before the call now.
    def op(hs: HsmSession) -> None:
        kek, blob, _ = _kek_and_data_key(hs)
        with unwraps_counted(hsm) as unwraps, pytest.raises(ValueError, match="without a state"):
            _rewrap(hs, kek.handle, blob, tee_key, hsm.oaep_hashes[0], enabled=b"\x01")
        assert unwraps == []

    hsm.call(op, name="test")


def test_the_rewraps_state_read_comes_last_and_fails_it_alone(
    hsm: Hsm, tee_key: rsa.RSAPrivateKey
) -> None:
    # The seventh call: made once the wrap succeeded, its value the caller's to judge; a failed
    # read is StateReadFailed (the answer withheld), with every object already destroyed.
    def op(hs: HsmSession) -> None:
        kek, blob, _ = _kek_and_data_key(hs)
        before = _session_objects(hs)
        state = AttributeRead(kek.handle, Attribute.UNWRAP, 1)
        assert _rewrap(hs, kek.handle, blob, tee_key, hsm.oaep_hashes[0], state=state)
        assert state.value() == b"\x01"
        with pytest.raises(StateReadFailed) as failed:
            _rewrap(
                hs,
                kek.handle,
                blob,
                tee_key,
                hsm.oaep_hashes[0],
                state=AttributeRead(0xDEAD, Attribute.LABEL, 64),
            )
        assert errs.is_stale_handle(failed.value.error)
        unread = AttributeRead(kek.handle, Attribute.UNWRAP, 1)
        with pytest.raises(UnwrapFailed):  # no read once a step before it failed
            _rewrap(hs, kek.handle, bytes(40), tee_key, hsm.oaep_hashes[0], state=unread)
        assert unread.value() == b"\x00"
        assert _session_objects(hs) == before

    hsm.call(op, name="test")


def test_the_built_release_library_is_the_version_this_code_expects() -> None:
    # The library the package built loads; the C source's constant is the Python one (a bump of
    # one without the other fails here even before a rebuild).
    assert p11direct.load_release_calls(Path(p11direct.__file__).parent) is not None
    source = Path(p11direct.__file__).with_name("_p11release.c").read_text()
    (defined,) = re.findall(r"^#define SR_P11RELEASE_VERSION (\d+)$", source, flags=re.MULTILINE)
    assert int(defined) == p11direct.RELEASE_CALLS_VERSION


_OTHER_VERSION = p11direct.RELEASE_CALLS_VERSION + 1


@pytest.mark.parametrize(
    ("source", "found"),
    [
        # sr_rewrap took two arguments fewer: called with today's, it would take the state
        # read's handle for its step pointer and write through it.
        pytest.param(
            "unsigned long sr_rewrap(void) { return 0; }\n", "have no version", id="sr_rewrap"
        ),
        # Today's function from a build before versions (its behaviour unknown).
        pytest.param(
            "unsigned long sr_rewrap_read(void) { return 0; }\n",
            "have no version",
            id="unversioned",
        ),
        # The same function names, another behaviour.
        pytest.param(
            "unsigned long sr_rewrap_read(void) { return 0; }\n"
            f"int sr_p11release_version(void) {{ return {_OTHER_VERSION}; }}\n",
            f"are version {_OTHER_VERSION}",
            id="other-version",
        ),
    ],
)
def test_a_release_library_of_another_version_is_refused(
    tmp_path: Path, source: str, found: str
) -> None:
    """A stale build of _p11release.c (the same function's name and arguments, another
    behaviour) loaded silently; it is refused, naming the file, the version it has, the one
    this code expects, and how to rebuild it."""
    built = release_library_stand_in(tmp_path / "stale", source)
    with pytest.raises(ImportError) as refused:
        p11direct.load_release_calls(built.parent)
    message = str(refused.value)
    assert f"release calls in {built} {found}" in message
    assert f"expects version {p11direct.RELEASE_CALLS_VERSION}" in message
    assert "`make setup`" in message
