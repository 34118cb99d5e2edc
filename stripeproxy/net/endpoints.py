"""Address strings users type: ``host:port`` or a Twisted endpoint string.

Operators write ``127.0.0.1:1080`` or ``[::1]:1080``; Twisted users write
``tcp:1080:interface=127.0.0.1`` or ``unix:/run/stripe.sock``.  Both are
accepted everywhere an address is asked for.
"""

from __future__ import annotations

from twisted.internet.endpoints import HostnameEndpoint, clientFromString, serverFromString
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint

_ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "unix:", "ssl:", "systemd:", "tls:", "haproxy:")


def is_endpoint_string(text: str) -> bool:
    return text.startswith(_ENDPOINT_PREFIXES)


def parse_host_port(text: str, default_host: str = "", allow_zero: bool = False) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or ``:port``; raise ValueError otherwise.

    Port 0 (any free port) only makes sense for listening, hence ``allow_zero``.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bad address {text!r}: expected [IPv6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"bad address {text!r}: expected host:port")
        if ":" in host:
            raise ValueError(f"bad address {text!r}: put IPv6 addresses in brackets")
    if not port.isdigit() or not (0 if allow_zero else 1) <= int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host or default_host, int(port)


def server_endpoint(reactor: object, text: str) -> IStreamServerEndpoint:
    """A listening endpoint for ``host:port`` (all interfaces if host is empty)."""
    description = text
    if not is_endpoint_string(text):
        host, port = parse_host_port(text, allow_zero=True)
        description = f"tcp:{port}"
        if host:
            description += ":interface=" + host.replace(":", r"\:")
    # serverFromString is unannotated in Twisted; it documents this return type.
    endpoint: IStreamServerEndpoint = serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    return endpoint


def client_endpoint(reactor: object, text: str, timeout: float) -> IStreamClientEndpoint:
    """A connecting endpoint; names resolve on every attempt (HostnameEndpoint)."""
    if is_endpoint_string(text):
        # clientFromString is unannotated in Twisted; it documents this return type.
        endpoint: IStreamClientEndpoint = clientFromString(reactor, text)  # type: ignore[no-untyped-call]
        return endpoint
    host, port = parse_host_port(text)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)
