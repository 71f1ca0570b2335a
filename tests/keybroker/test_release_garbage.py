"""A key release, and a key lookup, leave no reference cycles behind: the broker makes one release
per request, and every cycle waits for the garbage collector instead of being freed when its last
reference goes.

python-pkcs11 0.10 manufactures a class for every object it returns (``make_object``: the object
class plus one mixin per capability), and a class is always in a cycle (its ``__mro__`` holds it);
the two objects a re-wrap created left two such classes each time, until the release's data-key
path moved to direct calls (``strongroom.keybroker.p11direct``), which return plain handles. So
does ctypes for every ``Structure * n`` or ``c_char * n`` expression: the direct path makes none
per call.

Looking a key's objects up (every release after ``lookup_cache_ttl``, every cache miss, every
lifecycle call) went through python-pkcs11's search too, and left two such classes per object
found; it now finds and reads them directly as well, so these tests look the key up on every
release (``lookup_cache_ttl=0``). A new data key (GenerateDataKey) is generated directly too."""

from __future__ import annotations

import collections
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cryptography.hazmat.primitives.asymmetric import rsa

from strongroom.keybroker.hsm import Hsm
from strongroom.keybroker.keys import KeyManager
from strongroom.oaep import OaepHash
from tests.keybroker.helpers import MODEL, spki


@contextmanager
def _cyclic_garbage() -> Iterator[list[object]]:
    """Collects what becomes cyclic garbage inside the block into the list it yields."""
    found: list[object] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _assert_none(garbage: list[object]) -> None:
    classes = sorted(o.__qualname__ for o in garbage if isinstance(o, type))
    assert not classes, classes[:8]
    counted = collections.Counter(type(o).__qualname__ for o in garbage)
    assert not counted, counted.most_common(8)


def test_a_release_leaves_no_cyclic_garbage(hsm: Hsm, tee_key: rsa.RSAPrivateKey) -> None:
    km = KeyManager(hsm, lookup_cache_ttl=0)  # each release looks the key up
    km.create_key("acyclic")
    _, wrapped, version = km.generate_data_key("acyclic", *MODEL)
    target = spki(tee_key)
    km.release_to_ephemeral("acyclic", version, wrapped, target, [OaepHash.SHA1])  # warm caches
    with _cyclic_garbage() as garbage:
        for _ in range(20):
            km.release_to_ephemeral("acyclic", version, wrapped, target, [OaepHash.SHA1])
            pending = km.begin_release("acyclic", version, wrapped, target, [OaepHash.SHA1])
            pending.start()
            pending.result()
            del pending
    _assert_none(garbage)


def _classes() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, type))


def test_a_lookup_makes_no_class(hsm: Hsm) -> None:
    km = KeyManager(hsm, lookup_cache_ttl=0)
    km.create_key("lookup")
    km.rotate_key("lookup")  # two versions: two KEKs and their enablers to find and describe
    km.create_key("other")
    lookups: list[Callable[[], object]] = [
        lambda: km.describe_key("lookup"),
        km.list_keys,
        km.modifiable_versions,
    ]
    for lookup in lookups:
        lookup()  # warm caches
    gc.collect()
    before = _classes()
    with _cyclic_garbage() as garbage:
        for _ in range(10):
            for lookup in lookups:
                lookup()
    _assert_none(garbage)
    assert _classes() == before  # none kept either


def test_a_new_data_key_leaves_no_cyclic_garbage(hsm: Hsm) -> None:
    """Each GenerateDataKey generated its data key through python-pkcs11: two classes left."""
    km = KeyManager(hsm, lookup_cache_ttl=0)
    km.create_key("fresh")
    km.generate_data_key("fresh", *MODEL)  # warm caches
    with _cyclic_garbage() as garbage:
        for _ in range(10):
            km.generate_data_key("fresh", *MODEL).wipe()
    _assert_none(garbage)
