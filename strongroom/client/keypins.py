"""Which key-encryption keys a reader accepts each model under (the reader's own configuration).

The artifact names its KEK (``key_id``), and the store chooses the artifact: a reader that
accepts any KEK its attested identity may release from accepts a model wrapped under *another
tenant's* key, if that key's policy lets some publisher get data keys for this model's name (a
policy without ``publishers``). Pinning model names to keys closes that on the reader's side,
whatever the broker's policies say: a model whose artifact names another key is refused before
any key is requested.
"""

from __future__ import annotations

from dataclasses import dataclass

from strongroom.errors import FailedPrecondition
from strongroom.identifiers import name_rule_matches
from strongroom.reasons import Reason

__all__ = ["KeyPins"]


@dataclass(frozen=True)
class KeyPins:
    """``(name rule, key id)`` pairs (:func:`strongroom.identifiers.is_name_rule`); empty: any
    key for any model. Non-empty: a model loads only under a key of a rule covering its name."""

    rules: tuple[tuple[str, str], ...] = ()

    def keys_for(self, model_name: str) -> frozenset[str] | None:
        """The keys ``model_name`` may be under (None: unpinned, any)."""
        if not self.rules:
            return None
        return frozenset(key for rule, key in self.rules if name_rule_matches(rule, model_name))

    def check(self, model_name: str, model_version: str, key_id: str) -> None:
        """FailedPrecondition(MODEL_KEY_NOT_ALLOWED) unless ``key_id`` may wrap ``model_name``."""
        allowed = self.keys_for(model_name)
        if allowed is None or key_id in allowed:
            return
        wanted = ", ".join(sorted(allowed)) if allowed else "no key (no rule covers its name)"
        raise FailedPrecondition(
            f"{model_name}/{model_version} is stored under key {key_id!r}; this reader accepts "
            f"it under {wanted}",
            reason=Reason.MODEL_KEY_NOT_ALLOWED,
        )
