"""Who a client is, for fair admission (`serve_app.admission`): the address its connection came from, as the
nearest proxy we trust saw it.

Each proxy on the way appends the address it was connected from to `X-Forwarded-For`; anything a client wrote
there itself stays to the left of what our proxies appended. So the address list is read from the right (the
connection's own peer first), past every proxy we trust, and the first address that is not one of ours is the
client's. A header a client sends can only add addresses to the left of that one, which are never read.

Trusted proxies are the Ray cluster's nodes (Serve's HAProxy, or its Python proxy, on each node) and the networks
the operator lists (`IngressConfig.trusted_proxies`: a load balancer in front). Ray 2.60's HAProxy appends no
`X-Forwarded-For` itself, so `make serve` and the cluster files run it through `waterbirds-haproxy`
(`serve_app.haproxy`), which adds that one rule to the configuration Ray generates. Without it, HAProxy's
connections are not trusted: every client behind it counts as one, which is fair admission switched off, never a
header a client can forge.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path

from starlette.types import Scope

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HAPROXY_WRAPPER = "waterbirds-haproxy"
UNKNOWN = "unknown"


def parse_networks(specs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(spec, strict=False) for spec in specs)


def haproxy_appends_forwarded_for(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether Serve's HAProxy (if it is the proxy) runs through `waterbirds-haproxy`, which appends the address of
    its client to `X-Forwarded-For`. Replicas inherit the environment `ray start` ran with."""
    if env.get("RAY_SERVE_ENABLE_HA_PROXY", "0").lower() not in {"1", "true"}:
        return True  # Serve's Python proxy hands the replica the client's own address
    return Path(env.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")).name == HAPROXY_WRAPPER


class ClientIdentity:
    """The client address of each request, trusting `X-Forwarded-For` only as far as the chain of trusted proxies
    goes. `nodes` are the cluster's node addresses (refreshed by the ingress); `networks` the operator's."""

    def __init__(self, networks: Iterable[IPNetwork] = (), nodes: Iterable[str] = ()) -> None:
        self.networks: tuple[IPNetwork, ...] = ()
        self.nodes: frozenset[IPAddress] = frozenset()
        self._verdicts: dict[str, tuple[str, bool] | None] = {}
        self.set_trusted(networks, nodes)

    def set_trusted(self, networks: Iterable[IPNetwork] | None = None, nodes: Iterable[str] | None = None) -> None:
        if networks is not None:
            self.networks = tuple(networks)
        if nodes is not None:
            self.nodes = frozenset(a for a in map(_address, nodes) if a is not None)
        self._verdicts = {}

    def _verdict(self, hop: str) -> tuple[str, bool] | None:
        """A hop's address, written one way, and whether it is a trusted proxy; None if it is not an address.
        Remembered per text: parsing costs more than the rest of a refusal (bounded: forgotten all at once)."""
        verdict = self._verdicts.get(hop, False)
        if verdict is False:
            address = _address(hop)
            verdict = None if address is None else (str(address), address in self.nodes or
                                                    any(address in network for network in self.networks))
            if len(self._verdicts) >= 4096:
                self._verdicts = {}
            self._verdicts[hop] = verdict
        return verdict  # type: ignore[return-value]

    def client_of(self, scope: Scope) -> str:
        peer = scope.get("client")
        if not peer:
            return UNKNOWN
        hops: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                hops.extend(value.decode("latin-1").split(","))
        hops.append(peer[0])
        return self.client_from_hops(hops)

    def client_from_hops(self, hops: list[str]) -> str:
        """The first untrusted address from the right (the last is the connection's peer); the leftmost valid
        one if all are trusted (a request made on a node itself)."""
        client = UNKNOWN
        for hop in reversed(hops):
            verdict = self._verdict(hop)
            if verdict is None:  # only a client writes garbage: what our proxies appended was to its right
                return client
            client, trusted = verdict
            if not trusted:
                return client
        return client


def _address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
