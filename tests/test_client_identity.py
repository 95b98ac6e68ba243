"""Who a client is: X-Forwarded-For believed only as far as trusted proxies go; HAProxy's rule added to Ray's
configuration, or the start refused."""

from __future__ import annotations

import pytest

from serve_app.client_identity import ClientIdentity, haproxy_appends_forwarded_for, parse_networks
from serve_app.haproxy import RULE, TemplateChanged, with_client_rule, with_listeners_on_loopback

NODE = "10.0.0.7"  # a node of the cluster, where Serve's HAProxy runs
LOAD_BALANCER = "192.168.5.0/24"


def _scope(peer: str | None, *forwarded_for: str) -> dict:
    return {"client": (peer, 50000) if peer else None,
            "headers": [(b"host", b"x"), *((b"x-forwarded-for", v.encode()) for v in forwarded_for)]}


@pytest.fixture
def identity() -> ClientIdentity:
    return ClientIdentity(parse_networks([LOAD_BALANCER]), nodes=["127.0.0.1", NODE])


def test_a_client_straight_to_the_service_is_its_peer_whatever_it_writes(identity: ClientIdentity) -> None:
    assert identity.client_of(_scope("203.0.113.9")) == "203.0.113.9"
    assert identity.client_of(_scope("203.0.113.9", "9.9.9.9")) == "203.0.113.9"  # a forged header is not read


def test_behind_haproxy_the_client_is_the_address_haproxy_appended(identity: ClientIdentity) -> None:
    assert identity.client_of(_scope(NODE, "203.0.113.9")) == "203.0.113.9"
    # what the client wrote itself stays to the left of what HAProxy appended, and is never reached
    assert identity.client_of(_scope(NODE, "9.9.9.9, 8.8.8.8", "203.0.113.9")) == "203.0.113.9"


def test_behind_a_trusted_load_balancer_the_chain_is_followed_past_it(identity: ClientIdentity) -> None:
    # client -> load balancer (appends the client) -> HAProxy (appends the balancer) -> replica
    assert identity.client_of(_scope(NODE, "9.9.9.9, 203.0.113.9, 192.168.5.3")) == "203.0.113.9"
    # the same through a balancer nobody listed: it is the client
    assert identity.client_of(_scope(NODE, "203.0.113.9, 172.16.0.3")) == "172.16.0.3"


def test_garbage_stops_the_walk_at_the_last_good_address(identity: ClientIdentity) -> None:
    assert identity.client_of(_scope(NODE, "not-an-address, 192.168.5.3")) == "192.168.5.3"
    assert identity.client_of(_scope(NODE, "::ffff:203.0.113.9")) == "203.0.113.9"  # IPv4-mapped IPv6
    assert identity.client_of(_scope(None, "203.0.113.9")) == "unknown"  # no peer: nothing to start from


def test_haproxy_is_trusted_only_when_it_runs_through_the_wrapper() -> None:
    assert haproxy_appends_forwarded_for({})  # Serve's Python proxy: the replica sees the client itself
    assert not haproxy_appends_forwarded_for({"RAY_SERVE_ENABLE_HA_PROXY": "1"})
    assert haproxy_appends_forwarded_for({"RAY_SERVE_ENABLE_HA_PROXY": "1",
                                          "RAY_SERVE_HAPROXY_BINARY_PATH": "/venv/bin/waterbirds-haproxy"})


RAY_FRONTEND = """defaults
    mode http
frontend http_frontend
    bind 0.0.0.0:8000
    log global
    http-request return status 200 if healthcheck
"""


def test_the_rule_goes_right_after_the_frontends_bind_line_once() -> None:
    extended = with_client_rule(RAY_FRONTEND)
    assert extended.splitlines()[4:6] == RULE.splitlines()
    assert with_client_rule(extended) == extended  # a reload of the same file adds nothing


def test_a_ray_whose_template_moved_the_frontend_fails_loudly() -> None:
    with pytest.raises(TemplateChanged, match="Ray 2.60"):
        with_client_rule(RAY_FRONTEND.replace("frontend http_frontend", "frontend http_in"))
    with pytest.raises(TemplateChanged):
        with_client_rule(RAY_FRONTEND.replace("    bind 0.0.0.0:8000\n", ""))


RAY_LISTENERS = """frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind {host}:8000
    log global
listen stats
  bind *:8404
  stats enable
"""


def test_haproxys_own_listeners_follow_a_loopback_http_host_and_only_that() -> None:
    local = with_listeners_on_loopback(with_client_rule(RAY_LISTENERS.format(host="127.0.0.1")))
    assert "    bind 127.0.0.1:9101\n" in local and "  bind 127.0.0.1:8404\n" in local
    assert "bind :" not in local and "bind *" not in local and RULE in local
    node = RAY_LISTENERS.format(host="0.0.0.0")  # a cluster node: Prometheus scrapes it from elsewhere
    assert with_listeners_on_loopback(node) == node
