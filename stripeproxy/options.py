"""Options shared by ``twistd stripe-client`` and ``twistd stripe-server``."""

from __future__ import annotations

from twisted.python import usage

from stripeproxy.keygen import load_psk
from stripeproxy.session import SessionConfig

SESSION_PARAMETERS = [
    ["psk-file", None, None, "Pre-shared key file (hex, as written by stripe-keygen)."],
    ["heartbeat", None, 5.0, "Seconds between PINGs on an idle subflow.", float],
    ["dead-interval", None, 15.0, "Seconds of silence after which a subflow is dropped.", float],
    ["grace", None, 30.0, "Seconds a session outlives its last subflow.", float],
    ["handshake-timeout", None, 10.0, "Seconds a new subflow has to authenticate.", float],
    ["congestion", None, None, "TCP congestion control for subflows (e.g. cubic, bbr)."],
]


class SessionOptions(usage.Options):
    """Base for both sides: key, timers, TLS switch."""

    optFlags = [["no-tls", None, "Plaintext subflows with a CRC32C on every frame (lab use)."]]

    def postOptions(self) -> None:
        if not self["psk-file"]:
            raise usage.UsageError("--psk-file is required (create one with stripe-keygen)")
        try:
            self["psk"] = load_psk(self["psk-file"])
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"cannot read --psk-file: {e}") from None
        for name in ("heartbeat", "dead-interval", "grace", "handshake-timeout"):
            if self[name] <= 0:
                raise usage.UsageError(f"--{name} must be positive")
        if self["dead-interval"] <= self["heartbeat"]:
            raise usage.UsageError("--dead-interval must be longer than --heartbeat")

    def session_config(self) -> SessionConfig:
        return SessionConfig(
            heartbeat_interval=self["heartbeat"],
            dead_interval=self["dead-interval"],
            grace_period=self["grace"],
            crc=bool(self["no-tls"]),
        )
