"""The client's address behind trusted proxies (``server.trusted_proxies``).

When the TCP peer is a trusted proxy, the client is the rightmost address of the
incoming ``X-Forwarded-For`` chain that is not itself trusted: every trusted hop
appended the address it saw, so that entry is the first one nobody we trust could have
written for the client (nginx's ``real_ip_recursive``, Envoy's ``xff_num_trusted_hops``).
If every entry is trusted the leftmost is taken, as nginx does; an entry that is not an
IP address ends the walk at the last trusted address before it. An entry may carry a
port (``198.51.100.7:5000``, ``[2001:db8::7]:443``), which is ignored. A peer that is not
trusted is the client, whatever its ``X-Forwarded-For`` says.

Only requests carrying ``X-Forwarded-For`` on a gateway with trusted proxies come here.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Peers seen are few (the proxies in front); their verdicts are kept, up to this many.
_PEER_CACHE = 1024


class TrustedProxies:
    """The networks of ``server.trusted_proxies`` and the client address behind them."""

    __slots__ = ("_networks", "_peers")

    def __init__(self, networks: tuple[Network, ...]) -> None:
        self._networks = networks
        self._peers: dict[str, bool] = {}

    def _trusted(self, address: Address) -> bool:
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:10.0.0.1 on dual-stack sockets
        if mapped is not None:
            address = mapped
        return any(address in network for network in self._networks)

    def _peer_trusted(self, peer: str) -> bool:
        verdict = self._peers.get(peer)
        if verdict is None:
            try:
                verdict = self._trusted(ipaddress.ip_address(peer))
            except ValueError:  # not an IP peer (a Unix socket)
                verdict = False
            if len(self._peers) >= _PEER_CACHE:
                self._peers.clear()
            self._peers[peer] = verdict
        return verdict

    def client(self, peer: str, forwarded_for: bytes) -> str:
        """The client's address for a request from ``peer`` with this chain."""
        if not self._peer_trusted(peer):
            return peer
        client = peer
        for entry in reversed(forwarded_for.split(b",")):
            text = entry.strip().decode("latin-1")
            if not text:
                continue  # "a,,b" or a trailing comma: nothing said there
            try:
                address = _address(text)
            except ValueError:
                return client
            client = str(address)
            if not self._trusted(address):
                return client
        return client


def _address(entry: str) -> Address:
    """The IP address of one ``X-Forwarded-For`` entry, with or without a port.

    Some proxies (Azure's among them) append ``203.0.113.7:41234`` or
    ``[2001:db8::1]:443``; the port says nothing about who the client is.
    """
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            raise ValueError(entry)
        return ipaddress.IPv6Address(host)
    if entry.count(":") == 1:  # an IPv4 address and a port (IPv6 has two colons at least)
        host, _, port = entry.partition(":")
        if not port.isdigit():
            raise ValueError(entry)
        return ipaddress.IPv4Address(host)
    return ipaddress.ip_address(entry)


class AddressFilter:
    """A route's ``allow_ips`` and ``deny_ips``: whether a client address may call it.

    ``deny`` wins; with ``allow`` given, only addresses in it pass. An address that is
    not an IP (a Unix socket peer) is in no network. IPv4-mapped IPv6 addresses count as
    their IPv4 address. Verdicts are kept per address string, up to a bound.
    """

    __slots__ = ("_allow", "_deny", "_verdicts")

    def __init__(self, allow: tuple[Network, ...], deny: tuple[Network, ...]) -> None:
        self._allow = allow
        self._deny = deny
        self._verdicts: dict[str, bool] = {}

    def permits(self, client: str) -> bool:
        """Whether ``client`` (an address as text) may call the route."""
        verdict = self._verdicts.get(client)
        if verdict is None:
            verdict = self._judge(client)
            if len(self._verdicts) >= _VERDICT_CACHE:
                self._verdicts.clear()
            self._verdicts[client] = verdict
        return verdict

    def _judge(self, client: str) -> bool:
        try:
            address: Address = ipaddress.ip_address(client)
        except ValueError:
            return not self._allow
        mapped = getattr(address, "ipv4_mapped", None)
        if mapped is not None:
            address = mapped
        if any(address in network for network in self._deny):
            return False
        return not self._allow or any(address in network for network in self._allow)


#: Client addresses whose verdicts a route keeps (clients are many; the bound is memory).
_VERDICT_CACHE = 65536
