"""Which model names each publisher may store: the store's half of the key broker's ``publishers``
rule (services/keybroker/POLICY.md), with the same name rules (:func:`~strongroom.identifiers.
name_rule_matches`).

The broker decides which names a publisher may get data keys for; since a data key opens only its
own model (artifact format 3), an upload under a name the publisher has no key for cannot be
loaded, but it would still occupy that name and version in the store (the rightful publisher then
gets ALREADY_EXISTS). This check keeps it out: the store asks it as soon as the artifact's header
names the model, before the version is reserved and before the body is received.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from strongroom.errors import PermissionDenied
from strongroom.identifiers import MAX_NAME_LENGTH, name_rule_matches
from strongroom.reasons import Reason


@dataclasses.dataclass(frozen=True)
class PublisherScopes:
    """SPIFFE ID → the model-name rules that identity may store under."""

    rules: Mapping[str, tuple[str, ...]]

    def covers(self, spiffe_id: str, name: str) -> bool:
        """Whether ``spiffe_id`` is listed with a rule that covers model ``name``."""
        return any(name_rule_matches(rule, name) for rule in self.rules.get(spiffe_id, ()))

    def listing_prefixes(self, spiffe_id: str, prefix: str) -> list[str]:
        """The name prefixes whose models hold every model ``spiffe_id`` may read under
        ``prefix``, sorted, none a prefix of another (so their ranges are disjoint and in
        listing order); none if no name its rules cover can start with ``prefix``."""
        found: set[str] = set()
        for rule in self.rules.get(spiffe_id, ()):
            if rule.endswith("/") and len(rule) >= MAX_NAME_LENGTH:
                # No name fits under it (a 128-character name and its "/"): as a range it is a
                # prefix longer than any listing accepts, which failed the caller's whole listing
                # with INVALID_NAME_PREFIX whatever prefix it asked for.
                continue
            if rule.startswith(prefix):
                found.add(rule)
            elif rule.endswith("/") and prefix.startswith(rule):
                found.add(prefix)
        return sorted(p for p in found if not any(p != q and p.startswith(q) for q in found))

    def check(self, spiffe_id: str, name: str) -> None:
        """Raises PermissionDenied unless ``spiffe_id`` may store model ``name``
        (``PUBLISHER_NOT_ALLOWED``: not listed; ``MODEL_NAME_NOT_ALLOWED``: listed, not for it)."""
        names = self.rules.get(spiffe_id)
        if names is None:
            raise PermissionDenied(
                f"publisher {spiffe_id} may not store models in this store",
                reason=Reason.PUBLISHER_NOT_ALLOWED,
            )
        if not any(name_rule_matches(rule, name) for rule in names):
            raise PermissionDenied(
                f"publisher {spiffe_id} may not store model {name}",
                reason=Reason.MODEL_NAME_NOT_ALLOWED,
            )
