"""A small Kubernetes NetworkPolicy evaluator, for checking which flows rendered policies allow.

It implements the networking.k8s.io/v1 semantics the chart relies on: a pod is isolated for a
direction once any policy selecting it lists that direction in ``policyTypes``; a connection needs
the source's egress AND the destination's ingress to allow it; peers are pod/namespace selectors
(a pod selector alone means the policy's namespace) or ipBlocks; missing ``from``/``to``/``ports``
mean "everything". Ports must be numeric (the chart never uses named ports), so a named port fails
loudly instead of being guessed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Flow = tuple[str, str, str]  # (source party, destination party, "PORT/PROTOCOL")


@dataclass(frozen=True)
class Party:
    """Something that can open or accept a connection: a pod (namespace set) or an address outside."""

    name: str
    ip: str
    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    # True for the chart's own pods: only flows touching them are reported.
    ours: bool = False

    @property
    def is_pod(self) -> bool:
        """Whether the party is a pod (selectors can match it)."""
        return self.namespace is not None


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """LabelSelector semantics; an empty selector matches everything."""
    if selector is None:
        return True
    unknown = set(selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise ValueError(f"unknown selector fields {unknown}")
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], set(expr.get("values") or [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown operator {op}")
    return True


def peer_matches(peer: Mapping[str, Any], party: Party, policy_namespace: str) -> bool:
    """Whether a NetworkPolicyPeer designates ``party``."""
    if "ipBlock" in peer:
        if set(peer) != {"ipBlock"}:
            raise ValueError("an ipBlock peer cannot carry selectors")
        address = ipaddress.ip_address(party.ip)
        block = peer["ipBlock"]
        if address not in ipaddress.ip_network(block["cidr"], strict=False):
            return False
        return not any(
            address in ipaddress.ip_network(e, strict=False) for e in block.get("except") or []
        )
    if not party.is_pod:
        return False  # selectors designate pods only
    if not {"podSelector", "namespaceSelector"} & set(peer):
        raise ValueError(f"empty NetworkPolicyPeer {peer}")
    if "namespaceSelector" in peer:
        ns_ok = selector_matches(peer["namespaceSelector"], party.namespace_labels)
    else:
        ns_ok = party.namespace == policy_namespace
    return ns_ok and selector_matches(peer.get("podSelector"), party.labels)


def port_matches(ports: Iterable[Mapping[str, Any]] | None, port: int, protocol: str) -> bool:
    """Whether a rule's ``ports`` admit ``port``/``protocol`` (absent or empty: all)."""
    ports = list(ports or [])
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        if "port" not in p:
            return True
        if not isinstance(p["port"], int):
            raise ValueError(f"named port {p['port']!r}: resolve it before evaluating")
        if p["port"] <= port <= p.get("endPort", p["port"]):
            return True
    return False


def _policy_types(spec: Mapping[str, Any]) -> list[str]:
    if "policyTypes" in spec:
        return list(spec["policyTypes"])
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


class Evaluator:
    """Answers "is src -> dst:port/protocol allowed?" for a set of NetworkPolicy documents."""

    def __init__(self, policies: Iterable[Mapping[str, Any]], namespace: str) -> None:
        self.policies = [
            (p["metadata"].get("namespace", namespace), p["spec"])
            for p in policies
            if p.get("kind") == "NetworkPolicy"
        ]

    def _selecting(self, party: Party, direction: str) -> list[Mapping[str, Any]]:
        if not party.is_pod:
            return []
        return [
            spec
            for ns, spec in self.policies
            if ns == party.namespace
            and direction in _policy_types(spec)
            and selector_matches(spec.get("podSelector") or {}, party.labels)
        ]

    def _allows(
        self, subject: Party, other: Party, port: int, protocol: str, direction: str
    ) -> bool:
        specs = self._selecting(subject, direction)
        if not specs:
            return True  # not isolated in this direction
        rules_key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
        for spec in specs:
            for rule in spec.get(rules_key) or []:
                peers = rule.get(peers_key)
                peer_ok = not peers or any(
                    peer_matches(peer, other, subject.namespace or "") for peer in peers
                )
                if peer_ok and port_matches(rule.get("ports"), port, protocol):
                    return True
        return False

    def allowed(self, src: Party, dst: Party, port: int, protocol: str) -> bool:
        """Whether a connection from ``src`` to ``dst`` on ``port``/``protocol`` is allowed."""
        return self._allows(src, dst, port, protocol, "Egress") and self._allows(
            dst, src, port, protocol, "Ingress"
        )

    def candidate_ports(self, extra: Iterable[int] = ()) -> set[tuple[int, str]]:
        """Every port some rule names, plus ``extra`` and a few no rule should open, both protocols."""
        ports = {1, 22, 80, 443, 8081, 31337, 65535, *extra}
        for _ns, spec in self.policies:
            for key in ("ingress", "egress"):
                for rule in spec.get(key) or []:
                    for p in rule.get("ports") or []:
                        if isinstance(p.get("port"), int):
                            ports.add(p["port"])
        return {(p, proto) for p in ports for proto in ("TCP", "UDP", "SCTP")}

    def flows(self, parties: Iterable[Party], extra_ports: Iterable[int] = ()) -> set[Flow]:
        """Every allowed (src, dst, port/protocol) where src or dst is one of the chart's pods."""
        parties = list(parties)
        ports = self.candidate_ports(extra_ports)
        out: set[Flow] = set()
        for src in parties:
            for dst in parties:
                if src is dst or not (src.ours or dst.ours):
                    continue
                for port, protocol in ports:
                    if self.allowed(src, dst, port, protocol):
                        out.add((src.name, dst.name, f"{port}/{protocol}"))
        return out
