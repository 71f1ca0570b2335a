"""A key release leaves no reference cycles behind: the broker makes one release per request, and
every cycle waits for the garbage collector instead of being freed when its last reference goes.

python-pkcs11 0.10 manufactures a class for every object it returns (``make_object``: the object
class plus one mixin per capability), and a class is always in a cycle (its ``__mro__`` holds it);
the two objects a re-wrap created left two such classes each time, until the release's data-key
path moved to direct calls (``strongroom.keybroker.p11direct``), which return plain handles. So
does ctypes for every ``Structure * n`` or ``c_char * n`` expression: the direct path makes none
per call.

Looking a key's objects up still goes through python-pkcs11's search, and so still leaves two such
classes per object found: the release path does it once per ``lookup_cache_ttl`` per key, not per
release. This test gives its key manager a TTL no run can outlast, so that what it measures is the
release itself: with the default second, a slow machine (CI's garbage collection of a whole suite's
objects before the loop) saw the entry expire mid-loop and counted the refresh's two classes."""

from __future__ import annotations

import collections
import gc

from cryptography.hazmat.primitives.asymmetric import rsa

from strongroom.keybroker.hsm import Hsm
from strongroom.keybroker.keys import KeyManager
from strongroom.oaep import OaepHash
from tests.keybroker.helpers import MODEL, spki


def test_a_release_leaves_no_cyclic_garbage(hsm: Hsm, tee_key: rsa.RSAPrivateKey) -> None:
    km = KeyManager(hsm, lookup_cache_ttl=24 * 3600.0)
    km.create_key("acyclic")
    _, wrapped, version = km.generate_data_key("acyclic", *MODEL)
    target = spki(tee_key)
    km.release_to_ephemeral("acyclic", version, wrapped, target, [OaepHash.SHA1])  # warm caches
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            km.release_to_ephemeral("acyclic", version, wrapped, target, [OaepHash.SHA1])
            pending = km.begin_release("acyclic", version, wrapped, target, [OaepHash.SHA1])
            pending.start()
            pending.result()
            del pending
        gc.collect()
        classes = sorted(o.__qualname__ for o in gc.garbage if isinstance(o, type))
        garbage = collections.Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not classes, classes[:8]
    assert not garbage, garbage.most_common(8)
