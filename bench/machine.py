"""What a result was measured on: hardware, kernel, software versions, commit.

Figures from a 2-vCPU guest and from a workstation are not comparable, so
every report carries this next to its numbers.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.procs import project_root, sysctl


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def git_commit(root: Path | None) -> str | None:
    """HEAD of the checkout (read-only ``git rev-parse``); None outside one."""
    if root is None:
        return None
    try:
        r = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except OSError:
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    import OpenSSL

    import twisted

    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "openssl": _openssl_version(),
        "git_commit": git_commit(project_root()),
        "hostname": platform.node(),
        "host_congestion_control": sysctl("net.ipv4.tcp_congestion_control"),
        "loadavg_start": list(os.getloadavg()),
    }


def _openssl_version() -> str | None:
    try:
        from OpenSSL import SSL

        return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except (ImportError, AttributeError):
        return None
