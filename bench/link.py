"""The emulated link of the WAN scenarios, and how the bench finds one.

Both WAN scenarios (``wan``, ``degraded``) run the proxies in two network
namespaces, ``wa`` (10.199.1.1) and ``wb`` (10.199.1.2), joined by a link
with a configured delay, loss and rate.  That needs root, and one of:

1. a *wanem-style* userspace emulator, named by ``--wanem DIR`` or, failing
   that, by the environment variable ``STRIPE_WANEM``: a directory whose
   ``setup.sh up --delay MS --loss PCT --rate MBIT --cc CC [options]``
   builds the two namespaces and whose ``setup.sh down`` removes them;
2. kernel ``tc netem`` on a veth pair, when this kernel has netem.

The order is that one: an emulator the user names wins over netem (it is
what they asked for, and only it can give single flows their own loss or
delay, which ``degraded`` needs); netem is used when nothing is named; with
neither, the WAN scenarios are skipped with :data:`HOW_TO` and the loopback
scenarios still run.  Nothing here knows where an emulator lives on any
particular machine.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench.procs import BenchError

NS_A, NS_B = "wa", "wb"
IP_A, IP_B = "10.199.1.1", "10.199.1.2"

ENV = "STRIPE_WANEM"

WANEM_CONTRACT = (
    f"a wanem-style emulator directory (--wanem DIR or {ENV}=DIR) whose "
    "`setup.sh up --delay MS --loss PCT --rate MBIT --cc CC` links namespaces "
    f"{NS_A} ({IP_A}) and {NS_B} ({IP_B}) and whose `setup.sh down` removes them"
)

HOW_TO = (
    "no link emulator for the WAN scenarios: this kernel has no tc netem and no emulator "
    f"was named. Either load netem (`modprobe sch_netem`; `tc` is in iproute2, and on "
    "Debian/Ubuntu the module ships with the kernel image or linux-modules-extra-$(uname -r)), "
    f"or give {WANEM_CONTRACT}. README, section Performance, says more."
)

HOW_TO_PER_FLOW = (
    "the degraded scenario needs per-flow loss and delay, which netem cannot give: "
    f"give {WANEM_CONTRACT}, with --flow-loss-spread and --flow-delay-spread"
)

NEEDS_ROOT = "needs root and network namespaces (ip netns): run the bench as root for WAN"


class NoEmulator(BenchError):
    """No usable link emulator; the message says how to get one."""


def sh(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def ns_exists(name: str) -> bool:
    return Path(f"/var/run/netns/{name}").exists()


def netem_works() -> bool:
    """Whether ``tc qdisc add ... netem`` works here (tried in a throwaway namespace)."""
    probe = f"sbprobe{os.getpid()}"
    try:
        if sh(["ip", "netns", "add", probe], check=False).returncode != 0:
            return False
    except OSError:  # no `ip` at all
        return False
    try:
        r = sh(
            ["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], False
        )
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        sh(["ip", "netns", "del", probe], check=False)


def root_problem() -> str | None:
    """Why the WAN scenarios cannot run as this user, or None."""
    return NEEDS_ROOT if os.geteuid() != 0 else None


class Link:
    """The emulated link between ``wa`` and ``wb``."""

    kind = ""

    def up(
        self, delay: float, loss: float, rate: float, cc: str, extra: Sequence[str] = ()
    ) -> None:
        """Bring the link up; ``extra`` are emulator options (wanem only)."""
        raise NotImplementedError

    def down(self) -> str:
        raise NotImplementedError

    def emulator_pid(self) -> int | None:
        return None


@dataclass
class Wanem(Link):
    """A userspace emulator driven only through its ``setup.sh``.

    ``source`` says where its directory came from (``--wanem`` or the
    environment variable); reports record that and the kind, not the path,
    which is only meaningful on the machine that ran them.
    """

    directory: Path
    source: str = "--wanem"
    kind = "wanem (userspace linkem)"

    @classmethod
    def at(cls, directory: Path, source: str) -> Wanem:
        """The emulator in ``directory``, or :class:`NoEmulator` saying what is wrong."""
        setup = directory / "setup.sh"
        if not setup.is_file():
            raise NoEmulator(f"{source} {directory}: no setup.sh there; expected {WANEM_CONTRACT}")
        if not os.access(setup, os.X_OK):
            raise NoEmulator(f"{source} {directory}: setup.sh is not executable")
        return cls(directory, source)

    def up(
        self, delay: float, loss: float, rate: float, cc: str, extra: Sequence[str] = ()
    ) -> None:
        argv = [str(self.directory / "setup.sh"), "up", "--delay", f"{delay:g}"]
        argv += ["--loss", f"{loss:g}", "--rate", f"{rate:g}", "--cc", cc, *extra]
        sh(argv)

    def down(self) -> str:
        r = sh([str(self.directory / "setup.sh"), "down"], check=False)
        return r.stdout + r.stderr

    def emulator_pid(self) -> int | None:
        # WANEM_RUN is the emulator's own setting for its run directory.
        try:
            run = os.environ.get("WANEM_RUN", "/run/wanem")
            return int(Path(run, "linkem.pid").read_text())
        except (OSError, ValueError):
            return None


class Netem(Link):
    """Kernel netem on a veth pair, same names and addresses as wanem."""

    kind = "netem (veth)"

    def up(
        self, delay: float, loss: float, rate: float, cc: str, extra: Sequence[str] = ()
    ) -> None:
        if extra:
            raise BenchError(f"netem cannot do {' '.join(extra)}")
        for ns in (NS_A, NS_B):
            sh(["ip", "netns", "add", ns])
            sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            for setting in (
                "net.ipv4.tcp_no_metrics_save=1",
                f"net.ipv4.tcp_congestion_control={cc}",
            ):
                sh(["ip", "netns", "exec", ns, "sysctl", "-qw", setting])
        sh(
            [
                "ip",
                "link",
                "add",
                "tw0",
                "netns",
                NS_A,
                "type",
                "veth",
                "peer",
                "tw1",
                "netns",
                NS_B,
            ]
        )
        for ns, dev, ip in ((NS_A, "tw0", IP_A), (NS_B, "tw1", IP_B)):
            sh(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            sh(["ip", "-n", ns, "link", "set", dev, "up"])
            netem = ["delay", f"{delay:g}ms", "loss", f"{loss:g}%", "limit", "1000"]
            if rate:
                netem += ["rate", f"{rate:g}mbit"]
            sh(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", *netem])

    def down(self) -> str:
        for ns in (NS_A, NS_B):
            if ns_exists(ns):
                sh(["ip", "netns", "del", ns], check=False)
        return "netem down"


def find_wanem(option: Path | None, environ: Mapping[str, str]) -> Wanem | None:
    """The emulator named by ``--wanem`` or else by ``$STRIPE_WANEM``; None if neither is set.

    A named directory that is not an emulator is an error, not a reason to
    fall back to something else: the user asked for that one.
    """
    if option is not None:
        return Wanem.at(option, "--wanem")
    named = environ.get(ENV, "").strip()
    if named:
        return Wanem.at(Path(named), f"${ENV}")
    return None


def find_link(
    option: Path | None,
    environ: Mapping[str, str],
    has_netem: Callable[[], bool] | None = None,
) -> Link:
    """``--wanem`` > ``$STRIPE_WANEM`` > netem; :class:`NoEmulator` (with :data:`HOW_TO`) else.

    ``has_netem`` defaults to :func:`netem_works`, looked up at call time.
    """
    wanem = find_wanem(option, environ)
    if wanem is not None:
        return wanem
    if (has_netem or netem_works)():
        return Netem()
    raise NoEmulator(HOW_TO)


L = TypeVar("L", bound=Link)


def available(find: Callable[[], L | None], missing: str) -> L | str:
    """The link ``find`` gives, or why there is none: not root, a bad or no emulator."""
    why = root_problem()
    if why is not None:
        return why
    try:
        link = find()
    except NoEmulator as e:
        return str(e)
    return missing if link is None else link


def describe(link: Link) -> str:
    """What a report records about the link: its kind and who chose it, not a path."""
    return f"{link.kind} from {link.source}" if isinstance(link, Wanem) else link.kind
