"""Data keys and release re-wrap to a TEE's ephemeral RSA key, against a real SoftHSM2 token."""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from strongroom.dev.softhsm import SoftHsmToken
from strongroom.errors import FailedPrecondition, InvalidArgument, NotFound
from strongroom.keybroker.ephemeral import (
    EphemeralPublicKey,
    ReleaseTarget,
    parse_ephemeral_public_key,
)
from strongroom.keybroker.errors import HsmUnavailable
from strongroom.keybroker.hsm import Hsm
from strongroom.keybroker.keys import WRAPPED_DEK_BYTES, DataKey, KeyManager
from strongroom.oaep import OaepHash
from strongroom.reasons import Reason
from tests.keybroker.helpers import (
    MODEL,
    WRAP_KEY,
    bound,
    ec_spki_on_an_unsupported_curve,
    make_config,
    session_objects,
    spki,
    token_call_replaced,
    unwraps_counted,
)

OAEP_SHA1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)


@pytest.fixture
def model_key(km: KeyManager) -> DataKey:
    km.create_key("model")
    return km.generate_data_key("model", *MODEL)


def test_generate_data_key(km: KeyManager, model_key: DataKey) -> None:
    dek, wrapped, version = model_key
    assert isinstance(dek, bytearray) and len(dek) == 32
    assert len(wrapped) == WRAPPED_DEK_BYTES
    assert version == 1
    assert dek.hex() not in repr(model_key) and "***" in repr(model_key)
    assert km.generate_data_key("model", *MODEL).dek != dek  # fresh key every time
    model_key.wipe()
    assert model_key.dek == bytearray(32)


def test_release_decrypts_to_the_same_data_key(
    hsm: Hsm, km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    dek, wrapped, version = model_key
    released, mechanism = km.release_to_ephemeral(
        "model", version, wrapped, spki(tee_key), [OaepHash.SHA1]
    )
    assert mechanism is OaepHash.SHA1
    assert len(released) == 384
    assert bound(tee_key.decrypt(released, OAEP_SHA1)) == dek
    assert session_objects(hsm) == 0


def test_release_after_rotation_and_rewrap(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    km.rotate_key("model")
    # The old version still unwraps ...
    out, _ = km.release_to_ephemeral("model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, OAEP_SHA1)) == model_key.dek
    # ... and a blob moved to the new version carries the same key.
    moved, version = km.rewrap("model", 1, model_key.wrapped)
    assert version == 2
    out, _ = km.release_to_ephemeral("model", 2, moved, spki(tee_key), [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, OAEP_SHA1)) == model_key.dek


def test_sha256_only_is_refused_on_softhsm(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(FailedPrecondition) as info:
        km.release_to_ephemeral("model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA256])
    assert info.value.reason == "OAEP_MECHANISM_UNSUPPORTED"
    assert "caller accepts [sha256]" in info.value.message
    assert "HSM supports [sha1]" in info.value.message


def test_negotiation_picks_the_first_supported_in_caller_order(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    out, mechanism = km.release_to_ephemeral(
        "model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA256, OaepHash.SHA1]
    )
    assert mechanism is OaepHash.SHA1
    assert bound(tee_key.decrypt(out, OAEP_SHA1)) == model_key.dek


def test_broker_policy_can_forbid_sha1(
    softhsm_token: SoftHsmToken, open_hsm: Callable[..., Hsm], tee_key: rsa.RSAPrivateKey
) -> None:
    km = KeyManager(open_hsm(make_config(softhsm_token, allowed_oaep_hashes=(OaepHash.SHA256,))))
    km.create_key("strict")
    dk = km.generate_data_key("strict", *MODEL)
    with pytest.raises(FailedPrecondition) as info:
        km.release_to_ephemeral("strict", 1, dk.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "OAEP_MECHANISM_UNSUPPORTED"


@pytest.mark.parametrize("accepted", [[], ["sha1"], [None], [1]])
def test_malformed_accepted_lists(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey, accepted: list[Any]
) -> None:
    with pytest.raises(InvalidArgument) as info:
        km.release_to_ephemeral("model", 1, model_key.wrapped, spki(tee_key), accepted)
    assert info.value.reason == "OAEP_MECHANISM_INVALID"


def test_disabled_version_refuses_release(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    km.rotate_key("model")
    km.disable_key("model", 1)
    with pytest.raises(FailedPrecondition) as info:
        km.release_to_ephemeral("model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "KEY_DISABLED"


def test_unknown_key_and_version(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(NotFound) as info:
        km.release_to_ephemeral("other", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "KEY_NOT_FOUND"
    with pytest.raises(NotFound) as info:
        km.release_to_ephemeral("model", 2, model_key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "KEY_VERSION_NOT_FOUND"


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda w: _flip(w, 0), id="integrity-block-flipped"),
        pytest.param(lambda w: _flip(w, 39), id="key-byte-flipped"),
        pytest.param(lambda w: w[8:] + w[:8], id="rotated"),
        pytest.param(lambda w: bytes(40), id="zeros"),
    ],
)
def test_corrupt_wrapped_keys_are_the_callers_fault(
    hsm: Hsm,
    km: KeyManager,
    model_key: DataKey,
    tee_key: rsa.RSAPrivateKey,
    mangle: Callable[[bytes], bytes],
) -> None:
    bad = mangle(model_key.wrapped)
    for call in (
        lambda: km.release_to_ephemeral("model", 1, bad, spki(tee_key), [OaepHash.SHA1]),
        lambda: km.rewrap("model", 1, bad),
    ):
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.reason == "WRAPPED_KEY_INVALID"
    assert hsm.status().connected  # not mistaken for a failing HSM
    assert session_objects(hsm) == 0


def test_wrapped_key_of_another_key_is_refused(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    km.create_key("other")
    with pytest.raises(InvalidArgument) as info:
        km.release_to_ephemeral("other", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "WRAPPED_KEY_INVALID"


@pytest.mark.parametrize("length", [0, 8, 24, 32, 39, 41, 48, 4096])
def test_wrong_length_wrapped_keys(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey, length: int
) -> None:
    blob = (model_key.wrapped * 103)[:length]
    with pytest.raises(InvalidArgument) as info:
        km.release_to_ephemeral("model", 1, blob, spki(tee_key), [OaepHash.SHA1])
    assert info.value.reason == "WRAPPED_KEY_INVALID"


def _rsa_public(bits: int, exponent: int = 65537) -> rsa.RSAPublicKey:
    """A public key with an odd modulus of exactly ``bits`` bits (no key generation needed)."""
    modulus = (1 << (bits - 1)) | 1 | (0x9E3779B97F4A7C15 << 8)
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def _even_public(bits: int) -> rsa.RSAPublicKey:
    """A "public key" whose modulus is even (a power of two at 4096 bits)."""
    modulus = 1 << (bits - 1) if bits == 4096 else _rsa_public(bits).public_numbers().n - 1
    return rsa.RSAPublicNumbers(65537, modulus).public_key()


def _ec_spki() -> bytes:
    return (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _ed25519_spki() -> bytes:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _pkcs1(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda: spki(_rsa_public(2048)), "EPHEMERAL_KEY_UNSUPPORTED", id="rsa-2048"),
        pytest.param(lambda: spki(_rsa_public(3071)), "EPHEMERAL_KEY_UNSUPPORTED", id="rsa-3071"),
        pytest.param(lambda: spki(_rsa_public(4097)), "EPHEMERAL_KEY_UNSUPPORTED", id="rsa-4097"),
        pytest.param(lambda: spki(_rsa_public(3072, 3)), "EPHEMERAL_KEY_UNSUPPORTED", id="e=3"),
        pytest.param(_ec_spki, "EPHEMERAL_KEY_UNSUPPORTED", id="ec-p384"),
        pytest.param(_ed25519_spki, "EPHEMERAL_KEY_UNSUPPORTED", id="ed25519"),
        pytest.param(
            ec_spki_on_an_unsupported_curve, "EPHEMERAL_KEY_UNSUPPORTED", id="ec-unknown-curve"
        ),
        pytest.param(lambda: b"", "EPHEMERAL_KEY_INVALID", id="empty"),
        pytest.param(lambda: b"\x30\x82garbage" * 8, "EPHEMERAL_KEY_INVALID", id="garbage"),
        pytest.param(
            lambda: spki(_rsa_public(3072)) + b"\x00", "EPHEMERAL_KEY_INVALID", id="trailing"
        ),
        pytest.param(lambda: spki(_rsa_public(3072))[:-1], "EPHEMERAL_KEY_INVALID", id="truncated"),
        pytest.param(
            lambda: _pkcs1(_rsa_public(3072)), "EPHEMERAL_KEY_INVALID", id="pkcs1-not-spki"
        ),
        pytest.param(lambda: b"\x30" * 2000, "EPHEMERAL_KEY_INVALID", id="oversized"),
        pytest.param(lambda: spki(_even_public(3072)), "EPHEMERAL_KEY_INVALID", id="even"),
        pytest.param(lambda: spki(_even_public(4096)), "EPHEMERAL_KEY_INVALID", id="2^4095"),
    ],
)
def test_bad_ephemeral_keys(
    hsm: Hsm, km: KeyManager, model_key: DataKey, make: Callable[[], bytes], reason: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        km.release_to_ephemeral("model", 1, model_key.wrapped, make(), [OaepHash.SHA1])
    assert info.value.reason == reason
    assert session_objects(hsm) == 0


def test_a_key_the_hsm_cannot_wrap_to_is_the_callers_error_not_the_keys(
    hsm: Hsm, km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    """SoftHSM2 fails the wrap to an even modulus with CKR_GENERAL_ERROR. Counted as the key's
    failure, two such requests re-initialised the HSM session and marked a healthy key unusable
    (DATA_LOSS KEY_OBJECT_UNUSABLE for every caller, readiness NOT_SERVING). The parser now
    refuses even moduli; this holds the layer below to the same outcome for any key the token
    will not import or wrap to, whoever parsed it."""
    even = _even_public(3072).public_numbers()
    unparsed = EphemeralPublicKey(
        modulus=even.n.to_bytes(384, "big"),
        public_exponent=b"\x01\x00\x01",
        bits=3072,
        spki_sha256="0" * 64,
    )
    target = ReleaseTarget(unparsed, (OaepHash.SHA1,))
    generation = hsm.status().generation
    for _ in range(3):
        with pytest.raises(InvalidArgument) as info:
            km.release_to_ephemeral("model", 1, model_key.wrapped, target)
        assert info.value.reason == "EPHEMERAL_KEY_UNSUPPORTED"
    assert km.unusable_keys() == {}
    assert hsm.status().generation == generation  # no re-initialised session either
    assert session_objects(hsm) == 0
    out, _ = km.release_to_ephemeral("model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1])
    assert len(out) == 384


def test_rsa_4096_is_accepted(hsm: Hsm, km: KeyManager, model_key: DataKey) -> None:
    out, _ = km.release_to_ephemeral(
        "model", 1, model_key.wrapped, spki(_rsa_public(4096)), [OaepHash.SHA1]
    )
    assert len(out) == 512


def test_parsed_key_repr_and_digest() -> None:
    der = spki(_rsa_public(3072))
    parsed = parse_ephemeral_public_key(der)
    assert parsed.bits == 3072
    assert parsed.public_exponent == b"\x01\x00\x01"
    assert len(parsed.modulus) == 384
    assert "rsa-3072" in repr(parsed)
    assert parse_ephemeral_public_key(bytearray(der)) == parsed


def test_parse_is_memoised_but_failures_are_never_remembered() -> None:
    # An inference server releases to the same ephemeral key for each model it loads.
    der = spki(_rsa_public(3072))
    assert parse_ephemeral_public_key(memoryview(der)) is parse_ephemeral_public_key(der)
    for bad in (der[:-1], der + b"\x00", spki(_rsa_public(2048))):
        for _ in range(2):
            with pytest.raises(InvalidArgument):
                parse_ephemeral_public_key(bad)


def test_cached_lookups_still_see_a_disable_on_another_replica(
    softhsm_token: SoftHsmToken,
    km: KeyManager,
    model_key: DataKey,
    open_hsm: Callable[..., Hsm],
    tee_key: rsa.RSAPrivateKey,
) -> None:
    other = KeyManager(open_hsm(make_config(softhsm_token, softhsm_token.replica_module("b"))))
    target = spki(tee_key)
    km.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])  # cached now
    other.disable_key("model", 1)
    with pytest.raises(FailedPrecondition) as info:  # refused by the HSM despite the cache
        km.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])
    assert info.value.reason == "KEY_DISABLED"
    other.enable_key("model", 1)
    fresh = KeyManager(km.hsm, lookup_cache_ttl=0)
    out, _ = fresh.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, OAEP_SHA1)) == model_key.dek


def test_a_version_disabled_before_the_release_is_refused_before_anything_is_unwrapped(
    softhsm_token: SoftHsmToken,
    hsm: Hsm,
    km: KeyManager,
    model_key: DataKey,
    open_hsm: Callable[..., Hsm],
    tee_key: rsa.RSAPrivateKey,
) -> None:
    """A version another replica disabled, which this one's lookup cache still holds enabled, had
    its data key unwrapped and re-wrapped in the HSM before the read after the wrap refused the
    release. Its enabler is read before the unwrap now, in the same C call: the release is
    refused, KEY_DISABLED as before, and the token is asked for no unwrap at all."""
    other = KeyManager(open_hsm(make_config(softhsm_token, softhsm_token.replica_module("b"))))
    target = spki(tee_key)
    with unwraps_counted(hsm) as unwraps:
        km.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])
        assert len(unwraps) == 1  # the counter sees the release's unwrap
        other.disable_key("model", 1)
        assert km._fresh_versions("model")[0].enabled  # type: ignore[index]  # not seen here
        before = session_objects(hsm)
        with pytest.raises(FailedPrecondition) as info:
            km.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])
        assert (info.value.reason, info.value.message) == (
            "KEY_DISABLED",
            "key 'model' version 1 is disabled",
        )
        assert len(unwraps) == 1
    assert session_objects(hsm) == before
    assert km.unusable_keys() == {}


@pytest.mark.parametrize("written", [0, 1])
def test_a_wrap_the_token_answers_with_too_few_bytes_is_the_hsms_failure(
    hsm: Hsm, km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey, written: int
) -> None:
    """A token whose C_WrapKey answers CKR_OK with fewer bytes than due (none at all, or one):
    the release was INTERNAL (a broker bug, its message withheld), a new data key too, and a
    re-wrap answered the short key as the re-wrapped one, for its caller to store in place of a
    key that unwraps. Each is UNAVAILABLE HSM_OPERATION_FAILED now, naming what was short (the
    session re-initialised; each on a key of its own: a second on the same key, on the fresh
    session, makes it unusable); no session object is left, and the keys work again once the
    token does."""
    direct = hsm._direct
    assert direct is not None
    token_wrap = WRAP_KEY(direct.entry_points.wrap_key)

    def short(session: int, mechanism: int, key: int, wrapped: int, out: int, length: Any) -> int:
        rv = int(token_wrap(session, mechanism, key, wrapped, out, length))
        length[0] = written
        return rv

    target = spki(tee_key)
    km.create_key("rewrapped")
    rewrapped = km.generate_data_key("rewrapped", *MODEL)
    km.create_key("generated")
    before = session_objects(hsm)
    calls: list[Callable[[], object]] = [
        lambda: km.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1]),
        lambda: km.rewrap("rewrapped", 1, rewrapped.wrapped),
        lambda: km.generate_data_key("generated", *MODEL),
    ]
    failures = []
    with token_call_replaced(hsm, "wrap_key", WRAP_KEY(short)):
        for call in calls:
            with pytest.raises(HsmUnavailable) as failed:
                call()
            failures.append(failed.value)
    assert [f.reason for f in failures] == [Reason.HSM_OPERATION_FAILED] * 3
    assert [f.message for f in failures] == [
        f"the HSM answered {what} with {written} bytes where {due} were due; the session is "
        "being re-initialised"
        for what, due in [
            ("the release's OAEP wrap", 384),
            ("the re-wrap", WRAPPED_DEK_BYTES),
            ("a new data key's wrap", WRAPPED_DEK_BYTES),
        ]
    ]
    assert session_objects(hsm) == before
    out, _ = km.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, OAEP_SHA1)) == model_key.dek
    assert len(km.rewrap("rewrapped", 1, rewrapped.wrapped).wrapped) == WRAPPED_DEK_BYTES
    km.generate_data_key("generated", *MODEL)
    assert km.unusable_keys() == {}


def test_short_oaep_answers_to_a_caller_s_key_never_make_the_model_s_key_unusable(
    hsm: Hsm, km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey
) -> None:
    """The length of a release's OAEP wrap depends on the caller's ephemeral key: a token that
    answers it short for some keys would, counted like a failure of the model's key, let one
    attested caller's two releases in a row mark that key KEY_OBJECT_UNUSABLE for every caller
    until the recheck (the wraps to the caller's key it refuses are not counted, for the same
    reason). Each short answer stays the HSM's failure of that call, HSM_OPERATION_FAILED; the key
    stays usable and releases again once the token answers whole."""
    direct = hsm._direct
    assert direct is not None
    token_wrap = WRAP_KEY(direct.entry_points.wrap_key)

    def short(session: int, mechanism: int, key: int, wrapped: int, out: int, length: Any) -> int:
        rv = int(token_wrap(session, mechanism, key, wrapped, out, length))
        length[0] = 1
        return rv

    target = spki(tee_key)
    with token_call_replaced(hsm, "wrap_key", WRAP_KEY(short)):
        for _ in range(3):  # each on the session the last one re-initialised
            with pytest.raises(HsmUnavailable) as failed:
                km.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])
            assert failed.value.reason == Reason.HSM_OPERATION_FAILED
    assert km.unusable_keys() == {}
    out, _ = km.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, OAEP_SHA1)) == model_key.dek


def test_a_version_made_on_another_replica_is_released_despite_the_lookup_cache(
    softhsm_token: SoftHsmToken,
    km: KeyManager,
    model_key: DataKey,
    open_hsm: Callable[..., Hsm],
    tee_key: rsa.RSAPrivateKey,
) -> None:
    """A rotation on another replica, a model published under the new version and its release
    within the lookup cache's lifetime: the cached versions did not hold it, and the release was
    refused KEY_VERSION_NOT_FOUND for a version the HSM had."""
    manager = KeyManager(km.hsm, lookup_cache_ttl=3600)
    other = KeyManager(open_hsm(make_config(softhsm_token, softhsm_token.replica_module("b"))))
    target = spki(tee_key)
    manager.release_to_ephemeral("model", 1, model_key.wrapped, target, [OaepHash.SHA1])
    other.rotate_key("model")
    newer = other.generate_data_key("model", *MODEL)
    assert newer.version == 2
    out, _ = manager.release_to_ephemeral("model", 2, newer.wrapped, target, [OaepHash.SHA1])
    assert bound(tee_key.decrypt(out, OAEP_SHA1)) == newer.dek
    with pytest.raises(NotFound) as info:  # a version that does not exist is still refused
        manager.release_to_ephemeral("model", 3, newer.wrapped, target, [OaepHash.SHA1])
    assert info.value.reason == "KEY_VERSION_NOT_FOUND"


@pytest.mark.parametrize("ttl", [0.0, 60.0])
def test_a_release_looks_its_key_up_once(
    km: KeyManager,
    model_key: DataKey,
    tee_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    ttl: float,
) -> None:
    """The version check before the decision is recorded and the re-wrap share one lookup, with
    the lookup cache (a miss, then hits) and without it."""
    manager = KeyManager(km.hsm, lookup_cache_ttl=ttl)
    lookups: list[str] = []
    original = manager._versions

    def counted(hs: Any, key_id: str) -> Any:
        lookups.append(key_id)
        return original(hs, key_id)

    monkeypatch.setattr(manager, "_versions", counted)
    for _ in range(3):
        out, _ = manager.release_to_ephemeral(
            "model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1]
        )
        assert bound(tee_key.decrypt(out, OAEP_SHA1)) == model_key.dek
    assert lookups == ["model"] * (3 if ttl == 0 else 1)


def test_a_wrap_failing_on_a_token_that_stopped_is_the_hsms_failure_not_the_callers(
    softhsm_token: SoftHsmToken,
    hsm: Hsm,
    km: KeyManager,
    model_key: DataKey,
    tee_key: rsa.RSAPrivateKey,
) -> None:
    # CKR_GENERAL_ERROR from the OAEP wrap: while the token answers it is the caller's key
    # (EPHEMERAL_KEY_UNSUPPORTED, as an odd key makes SoftHSM2 answer); when the token itself has
    # stopped answering it is the HSM's failure, reported UNAVAILABLE and healed by a reconnect.
    # It used to be the caller's INVALID_ARGUMENT either way, on a session the token had dropped.
    store = softhsm_token.token_store()
    away = softhsm_token.directory / "away"
    vanish: list[bool] = []

    def wrap(*_: object) -> int:
        if vanish[-1]:
            store.rename(away)
        return 0x5  # CKR_GENERAL_ERROR

    prototype = ctypes.CFUNCTYPE(
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_ulong,
        ctypes.c_ulong,
        ctypes.c_void_p,
        ctypes.c_void_p,
    )
    failing = prototype(wrap)
    direct = hsm._direct
    assert direct is not None
    token_own = direct.entry_points.wrap_key
    direct.entry_points.wrap_key = ctypes.cast(failing, ctypes.c_void_p).value
    release = functools.partial(
        km.release_to_ephemeral, "model", 1, model_key.wrapped, spki(tee_key), hsm.oaep_hashes[:1]
    )
    try:
        vanish.append(False)
        with pytest.raises(InvalidArgument) as refused:
            release()
        assert refused.value.reason == Reason.EPHEMERAL_KEY_UNSUPPORTED
        vanish.append(True)
        with pytest.raises(HsmUnavailable):
            release()
    finally:
        direct.entry_points.wrap_key = token_own
        if away.exists():
            away.rename(store)
    assert km.unusable_keys() == {}
    assert len(release().wrapped) == 384  # the next release reconnects and works


def test_the_step_after_a_release_runs_on_the_hsm_worker_with_its_result(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """``begin_release(then=...)``: the broker signs its answer there, while its own thread
    syncs the audit log. Given the very result the caller then gets, on the HSM's worker, before
    the caller hears of it; never for a release that failed; what it raises is logged, and the
    caller still gets its result."""
    seen: list[tuple[Any, str]] = []

    def then(released: Any) -> None:
        seen.append((released, threading.current_thread().name))

    pending = km.begin_release(
        "model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1], then=then
    )
    pending.start()
    released = pending.result()
    assert len(seen) == 1 and seen[0][0] is released
    assert seen[0][1] != threading.current_thread().name and seen[0][1].startswith("hsm-")
    assert bound(tee_key.decrypt(released.wrapped, OAEP_SHA1)) == model_key.dek

    seen.clear()
    bad = km.begin_release("model", 1, bytes(40), spki(tee_key), [OaepHash.SHA1], then=then)
    with pytest.raises(InvalidArgument):
        bad.result()
    assert seen == []

    def failing(released: Any) -> None:
        raise RuntimeError("the step failed")

    with caplog.at_level(logging.ERROR, logger="strongroom.keybroker.hsm"):
        again = km.begin_release(
            "model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1], then=failing
        ).result()
    assert bound(tee_key.decrypt(again.wrapped, OAEP_SHA1)) == model_key.dek
    assert "the step after the HSM's release_to_ephemeral raised" in caplog.text


class _Panic(BaseException):
    """Stands in for pyo3's ``PanicException`` (a panic in Rust code such as the
    ``cryptography`` signature the step makes), which derives from BaseException."""


def test_a_step_raising_past_exception_leaves_the_hsm_worker_serving(
    km: KeyManager, model_key: DataKey, tee_key: rsa.RSAPrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """The step runs on the HSM's one worker, which every release and key change shares. A
    BaseException from it (pyo3 raises a Rust panic as one) went past ``except Exception`` and
    ended the worker thread before the call was ended: that caller, and every HSM call after it,
    waited out its deadline into ``HSM_TIMEOUT`` until the broker restarted. It is logged like
    any failure of the step; the caller gets its key and the worker goes on."""

    def panicking(released: Any) -> None:
        raise _Panic("a panic in the signature")

    def release(then: Callable[[Any], None] | None = None) -> Any:
        return km.begin_release(
            "model", 1, model_key.wrapped, spki(tee_key), [OaepHash.SHA1], timeout=5, then=then
        ).result()

    with caplog.at_level(logging.ERROR, logger="strongroom.keybroker.hsm"):
        released = release(panicking)
    assert bound(tee_key.decrypt(released.wrapped, OAEP_SHA1)) == model_key.dek
    assert "the step after the HSM's release_to_ephemeral raised" in caplog.text
    assert "a panic in the signature" in caplog.text
    assert bound(tee_key.decrypt(release().wrapped, OAEP_SHA1)) == model_key.dek
