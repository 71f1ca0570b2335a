"""A key release leaves no reference cycles of its own behind: the broker makes one release per
request, and every cycle waits for the garbage collector instead of being freed when its last
reference goes.

python-pkcs11 0.10 manufactures a class for every object it returns (``make_object``: the object
class plus one mixin per capability), and a class is always in a cycle (its ``__mro__`` holds it);
the two objects a re-wrap creates leave two such classes each time. That is the library's, not
ours, and the only garbage allowed."""

from __future__ import annotations

import collections
import gc

import pkcs11
from cryptography.hazmat.primitives.asymmetric import rsa

from strongroom.keybroker.keys import KeyManager
from strongroom.oaep import OaepHash
from tests.keybroker.helpers import spki


def test_a_release_leaves_no_cyclic_garbage(km: KeyManager, tee_key: rsa.RSAPrivateKey) -> None:
    km.create_key("acyclic")
    _, wrapped, version = km.generate_data_key("acyclic")
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
        classes = {o for o in gc.garbage if isinstance(o, type)}
        assert classes and all(issubclass(c, pkcs11.Object) for c in classes)
        # What the classes hold (their __mro__, __bases__, ...) is collected with them.
        theirs = {id(x) for c in classes for x in gc.get_referents(c)} | {id(c) for c in classes}
        ours = collections.Counter(type(o).__qualname__ for o in gc.garbage if id(o) not in theirs)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not ours, ours.most_common(8)
