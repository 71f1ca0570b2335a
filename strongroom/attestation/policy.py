"""The release policy: which verified evidence may release a key (validation, after verification).

A policy is a versioned YAML or JSON document (format: ``services/keybroker/POLICY.md``), checked
strictly when loaded: unknown keys, wrong types, hex of the wrong length and empty allow-lists are
errors (:class:`PolicyInvalid`), never silently ignored. Evaluation denies by default and raises
:class:`PolicyViolation` with a precise reason code on the first failed check.

This module holds what every TEE shares: the document, the callers' SPIFFE IDs, the allowed TEE
types, the collateral-completeness gate and the decision record. Each TEE's section and checks
live in its rules module, found through the registry in ``strongroom.attestation.rules``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, StrictStr, ValidationInfo

from strongroom.attestation import rules as tee_rules
from strongroom.attestation.claims import VerifiedClaims
from strongroom.attestation.errors import PolicyInvalid, PolicyViolation
from strongroom.attestation.evidence import TeeType
from strongroom.attestation.rules import schema
from strongroom.identifiers import name_rule_matches, name_rule_problem
from strongroom.reasons import Reason
from strongroom.spiffe import is_workload_id


def _fail(where: str, what: str, reason: str) -> PolicyInvalid:
    return PolicyInvalid(f"policy {where}: {what}", reason=reason)


MAX_POLICY_VERSION_LENGTH = 256
"""Longest policy ``version``: every decision records it, and the key broker's audit log takes at
most this many characters there (a longer one made every record under the policy invalid)."""


def _version(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise schema.invalid(Reason.POLICY_BAD_TYPE, "must be a non-empty string")
    if len(value) > MAX_POLICY_VERSION_LENGTH or not value.isprintable():
        # It is shown to operators (CLI, logs) and written into every audit record.
        raise schema.invalid(
            Reason.POLICY_BAD_VALUE,
            f"must be at most {MAX_POLICY_VERSION_LENGTH} printable characters",
        )
    return value


def _callers(value: Any) -> frozenset[str]:
    items = schema.allow_list(value)
    for caller in items:
        if not isinstance(caller, str) or not is_workload_id(caller):
            raise schema.invalid(Reason.POLICY_BAD_VALUE, f"{caller!r} is not a SPIFFE ID")
    return frozenset(items)


def _model_name_rule(entry: Any) -> str:
    """One ``model_names`` entry: a model name, or a name followed by ``/`` (everything under it)."""
    problem = name_rule_problem([entry])
    if problem:
        raise schema.invalid(Reason.POLICY_BAD_VALUE, problem)
    return str(entry)


def _publishers(value: Any) -> Mapping[str, tuple[str, ...]]:
    """``publishers``: each SPIFFE ID once, with the model names it may get data keys for."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in schema.allow_list(value):
        if not isinstance(entry, dict) or set(entry) != {"spiffe_id", "model_names"}:
            raise schema.invalid(
                Reason.POLICY_BAD_VALUE,
                "entries must be mappings with exactly spiffe_id and model_names",
            )
        caller = entry["spiffe_id"]
        if not isinstance(caller, str) or not is_workload_id(caller):
            raise schema.invalid(Reason.POLICY_BAD_VALUE, f"{caller!r} is not a SPIFFE ID")
        if caller in out:
            raise schema.invalid(Reason.POLICY_BAD_VALUE, f"{caller!r} is listed twice")
        out[caller] = tuple(_model_name_rule(n) for n in schema.allow_list(entry["model_names"]))
    return MappingProxyType(out)


def _tee_names(value: Any, info: ValidationInfo) -> frozenset[str]:
    assert info.context is not None  # ReleasePolicy.load passes the registered TEE types
    return schema.check_one_of(value, info.context["tees"])


class _Common(schema.Section):
    """The TEE-independent part of a policy document."""

    version: Annotated[StrictStr, BeforeValidator(_version)]
    description: StrictStr = ""
    allowed_spiffe_ids: Annotated[frozenset[str], BeforeValidator(_callers)]
    tee_types: Annotated[frozenset[str], BeforeValidator(_tee_names)]
    # Absent: any publisher identity may get data keys under the key, for any model name.
    publishers: Annotated[Mapping[str, tuple[str, ...]] | None, BeforeValidator(_publishers)] = None


class _StrictLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects duplicate mapping keys."""


def _mapping_no_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            # ``? [a]: b`` makes a list key; ``key in seen`` would raise TypeError (INTERNAL).
            raise PolicyInvalid(
                f"a mapping key must be a scalar, not a {type(key).__name__}",
                reason=Reason.POLICY_SYNTAX,
            )
        if key in seen:
            raise PolicyInvalid(f"duplicate key {key!r}", reason=Reason.POLICY_SYNTAX)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_no_duplicates,
)


@dataclass(frozen=True)
class PolicyDecision:
    """A successful evaluation: what allowed the release, for the audit log."""

    policy_version: str
    tee_type: TeeType
    caller_spiffe_id: str
    measurement: str

    def as_dict(self) -> dict[str, str]:
        """A JSON-able view."""
        return {
            "policy_version": self.policy_version,
            "tee_type": self.tee_type.value,
            "caller_spiffe_id": self.caller_spiffe_id,
            "measurement": self.measurement,
        }


def _deny(message: str, reason: str) -> PolicyViolation:
    return PolicyViolation(message, reason=reason)


@dataclass(frozen=True)
class ReleasePolicy:
    """A loaded, validated release policy; ``rules`` holds one entry per allowed TEE type."""

    version: str
    allowed_spiffe_ids: frozenset[str]
    tee_types: frozenset[TeeType]
    rules: Mapping[TeeType, tee_rules.TeeRules]
    #: Publisher SPIFFE ID → the model names it may get data keys for (None: any publisher, any
    #: name). An entry ending in ``/`` covers every name under it.
    publishers: Mapping[str, tuple[str, ...]] | None = None
    #: The mode it was loaded in: False admitted development-only values (an SNP
    #: ``min_reported_tcb: any``), which :meth:`check_deployment` refuses in production.
    production: bool = True

    @classmethod
    def load(cls, text: str | bytes, *, production: bool = True) -> ReleasePolicy:
        """Parses and strictly validates a YAML or JSON policy document.

        ``production`` is the broker's mode, passed to each TEE's parser (only a development
        broker accepts an SNP ``min_reported_tcb: any``).
        """
        try:
            doc = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise PolicyInvalid(
                f"policy is not valid YAML/JSON: {exc}", reason=Reason.POLICY_SYNTAX
            ) from None
        except RecursionError:
            # PyYAML composes recursively: ``"[" * 20000`` exhausts the stack. The key broker
            # bounds a document before it gets here; any other caller (a backend loading the
            # policy it holds a server to) got a RecursionError traceback.
            raise PolicyInvalid(
                "policy nests too deeply to read", reason=Reason.POLICY_TOO_DEEP
            ) from None
        except (ValueError, TypeError, LookupError, AttributeError) as exc:
            # PyYAML's constructors raise these, not YAMLError, for a node they resolve but cannot
            # build: an unquoted impossible date (``version: 2026-02-30``: ValueError), an integer
            # beyond Python's digit limit, ``!!int abc``, ``!!bool abc`` (KeyError), ``!!timestamp
            # abc`` (AttributeError), ``!!map [1]`` (TypeError). The author's mistake, not the
            # broker's: without this it was INTERNAL with a traceback in the log.
            raise PolicyInvalid(
                f"policy has a value YAML cannot read ({type(exc).__name__}: {exc}); quote it "
                "to make it a string",
                reason=Reason.POLICY_SYNTAX,
            ) from None
        tees = tee_rules.registered()
        if not isinstance(doc, dict):
            raise _fail("document", "must be a mapping", Reason.POLICY_BAD_TYPE)
        # Unknown keys first: a misspelt section must not read as a missing one.
        known = set(_Common.model_fields) | {t.section for t in tees.values()}
        unknown = sorted(str(k) for k in doc if k not in known)
        if unknown:
            raise _fail("document", f"unknown key(s) {unknown}", Reason.POLICY_UNKNOWN_KEY)
        common = schema.load(
            _Common,
            "",  # top-level fields are named as written: "version", "tee_types"
            {k: v for k, v in doc.items() if k in _Common.model_fields},
            tees=tuple(t.value for t in tees),
        )
        allowed = frozenset(t for t in tees if t.value in common.tee_types)
        for tee, module in tees.items():
            if (tee in allowed) != (module.section in doc):
                raise _fail(
                    module.section,
                    f"a {module.section!r} section is required exactly when tee_types lists "
                    f"{tee.value}",
                    Reason.POLICY_MISSING_KEY if tee in allowed else Reason.POLICY_BAD_VALUE,
                )
        return cls(
            version=common.version,
            allowed_spiffe_ids=common.allowed_spiffe_ids,
            publishers=None
            if common.publishers is None
            else MappingProxyType(dict(common.publishers)),
            tee_types=allowed,
            rules={
                tee: module.parse(doc[module.section], production=production)
                for tee, module in tees.items()
                if tee in allowed
            },
            production=production,
        )

    def check_deployment(self, *, trust_domain: str | None, production: bool) -> None:
        """Refuses a policy that cannot be right where it is deployed (raises PolicyInvalid).

        An ``allowed_spiffe_ids`` entry outside ``trust_domain`` can never match a caller (the
        broker authenticates only its own trust domain), so it is always an error (not judged
        when the trust domain is not known: None); ``allow_debug`` releases keys to a VM whose
        memory the host can read, so production refuses it, and ``allow_simulated`` too, whether
        or not the trust domain is known, and a policy loaded in development mode (it may hold
        development-only values, such as no TCB minimum).
        """
        for field, ids in (
            ("allowed_spiffe_ids", self.allowed_spiffe_ids),
            ("publishers", self.publishers or ()),
        ):
            foreign = sorted(
                i
                for i in ids
                if trust_domain is not None and not i.startswith(f"spiffe://{trust_domain}/")
            )
            if foreign:
                raise _fail(
                    field,
                    f"{', '.join(foreign)} outside this broker's trust domain {trust_domain!r} "
                    "can never match a caller",
                    Reason.POLICY_FOREIGN_TRUST_DOMAIN,
                )
        if production and not self.production:
            # Loaded with production=False, it may state no TCB minimum at all: a client checking
            # a server with production trust must not hold it to less than a production broker.
            raise _fail(
                "document",
                "was loaded in development mode (which admits development-only values such as "
                "min_reported_tcb: any): load it in production mode",
                Reason.POLICY_DEVELOPMENT_MODE,
            )
        if production:
            tees = tee_rules.registered()
            for tee, rules in self.rules.items():
                # Development material: a production broker's trust store holds no simulated root,
                # so such a policy admits nothing more today; refused so that it is never the only
                # thing between simulated evidence and a key (and is not mistaken for a real one).
                if rules.allow_simulated:
                    raise _fail(
                        f"{tees[tee].section}.allow_simulated",
                        "must be false in production mode (the simulated TEE is for development "
                        "only)",
                        Reason.POLICY_SIMULATED_IN_PRODUCTION,
                    )
                if rules.allow_debug:
                    raise _fail(
                        f"{tees[tee].section}.allow_debug",
                        "must be false in production mode (a debug VM's memory is readable "
                        "by the host)",
                        Reason.POLICY_DEBUG_IN_PRODUCTION,
                    )

    def check_caller(self, caller_spiffe_id: str) -> None:
        """Raises :class:`PolicyViolation` (``CALLER_NOT_ALLOWED``) unless the policy names the
        caller. A release checks this before verifying evidence, so a caller the policy does not
        name cannot make the broker fetch collateral or verify signatures on its behalf."""
        if caller_spiffe_id not in self.allowed_spiffe_ids:
            raise _deny(f"caller {caller_spiffe_id!r} is not allowed", Reason.CALLER_NOT_ALLOWED)

    def check_publisher(self, publisher_spiffe_id: str, model_name: str) -> None:
        """Raises :class:`PolicyViolation` unless the policy lets ``publisher_spiffe_id`` get a
        data key for ``model_name`` (``PUBLISHER_NOT_ALLOWED``: not listed;
        ``MODEL_NAME_NOT_ALLOWED``: listed, not for that name). No ``publishers``: any."""
        if self.publishers is None:
            return
        names = self.publishers.get(publisher_spiffe_id)
        if names is None:
            raise _deny(
                f"publisher {publisher_spiffe_id!r} may not get data keys under this key",
                Reason.PUBLISHER_NOT_ALLOWED,
            )
        if not any(name_rule_matches(n, model_name) for n in names):
            raise _deny(
                f"publisher {publisher_spiffe_id!r} may not get data keys for model "
                f"{model_name!r} under this key",
                Reason.MODEL_NAME_NOT_ALLOWED,
            )

    def evaluate(self, claims: VerifiedClaims, caller_spiffe_id: str) -> PolicyDecision:
        """Allows the release or raises :class:`PolicyViolation` naming the failed check."""
        self.check_caller(caller_spiffe_id)
        rules = self.rules.get(claims.tee_type)
        if claims.tee_type not in self.tee_types or rules is None:
            raise _deny(
                f"{claims.tee_type.value} evidence is not allowed", Reason.TEE_TYPE_NOT_ALLOWED
            )
        if not claims.collateral_complete:
            # Claims verified without the verifier's own CRLs / TCB info / QE identity (offline
            # inspection) can never release a key.
            raise _deny(
                "the evidence was verified without complete verifier-owned collateral",
                Reason.COLLATERAL_INCOMPLETE,
            )
        measurement = rules.evaluate(claims)
        return PolicyDecision(
            policy_version=self.version,
            tee_type=claims.tee_type,
            caller_spiffe_id=caller_spiffe_id,
            measurement=measurement.hex(),
        )
