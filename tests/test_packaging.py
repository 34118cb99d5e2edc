"""The built wheel and an editable install both give ``twistd`` its plugins.

The wheel is built from a copy of the source tree (so the build never writes
into the working tree other people use), into which a stale ``dropin.cache``
is planted to prove it is not packaged.  It is then installed with a plain
``pip install`` (dependencies included, from the package index or pip's
cache, at the versions of ``constraints.txt``) into a fresh virtual
environment that knows nothing of this checkout or of the development
install, which is what a user does.  The wheel holds the product only: not
the benchmark (``bench/``, run from a checkout) nor the tests.

A developer's ``pip install -e .`` (of another copy, into another fresh
environment) must register the plugins too: setuptools' default editable
mode used to hide the checkout's ``twisted/plugins`` from Twisted's plugin
scan (see ``package-dir`` in ``pyproject.toml``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util
import json
import stripeproxy
import twisted.plugins.stripeproxy_plugins as plugin_module
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
options = {name: type(makers[name].options()).__module__
           for name in ("stripe-client", "stripe-server") if name in makers}
print(json.dumps({
    "bench": importlib.util.find_spec("bench") is not None,
    "stripeproxy": stripeproxy.__file__,
    "plugin": plugin_module.__file__,
    "taps": sorted(makers),
    "options": options,
}))
"""


def run(*args: str | Path, cwd: Path, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def copy_source(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "*.egg-info",
            "build",
            "dist",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            ".run",
        ),
    )
    return source


def build_wheel(tmp_path: Path) -> Path:
    source = copy_source(tmp_path)
    (source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale cache")
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, source, cwd=tmp_path)
    (wheel,) = dist.glob("stripeproxy-*.whl")
    return wheel


VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def make_venv(venv: Path, cwd: Path) -> Path:
    run(sys.executable, "-m", "venv", venv, cwd=cwd)
    return venv / "bin" / "python"


def pip_install(python: Path, *what: str | Path, cwd: Path) -> None:
    """``pip install``, dependencies at the versions the suite passed with."""
    constraints = ("--constraint", REPO / "constraints.txt")
    run(python, "-m", "pip", "install", "--quiet", *constraints, *what, cwd=cwd, timeout=900)


def check_plugins(python: Path, cwd: Path) -> dict[str, Any]:
    """Both taps are found by getPlugins and listed by ``twistd --help``; the probe's answer."""
    probe: dict[str, Any] = json.loads(run(python, "-c", PROBE, cwd=cwd))
    assert {"stripe-client", "stripe-server"} <= set(probe["taps"]), probe
    assert probe["options"] == {
        "stripe-client": "stripeproxy.cli.client_tap",
        "stripe-server": "stripeproxy.cli.server_tap",
    }

    twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    help_text = run(python, "-c", twistd, "--help", cwd=cwd)
    assert "stripe-client" in help_text
    assert "stripe-server" in help_text
    server_help = run(python, "-c", twistd, "stripe-server", "--help", cwd=cwd)
    assert "--psk-file" in server_help
    client_help = run(python.parent / "twistd", "stripe-client", "--help", cwd=cwd)
    assert "--server-fingerprint" in client_help
    return probe


def test_wheel_installs_twistd_plugins(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/stripeproxy_plugins.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "stripeproxy/py.typed" in names
    # The product only: the benchmark and the tests stay in the checkout.
    top_level = {n.split("/", 1)[0] for n in names}
    assert top_level - {"stripeproxy", "twisted"} == {f"stripeproxy-{VERSION}.dist-info"}
    assert not [n for n in names if n.startswith(("bench/", "tests/", "stripeproxy/bench/"))]
    entry_points = zipfile.ZipFile(wheel).read(f"stripeproxy-{VERSION}.dist-info/entry_points.txt")
    assert b"stripe-keygen" in entry_points and b"stripe-bench" not in entry_points

    venv = tmp_path / "venv"
    python = make_venv(venv, tmp_path)
    pip_install(python, wheel, cwd=tmp_path)
    site_packages = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    probe = check_plugins(python, tmp_path)
    assert Path(probe["stripeproxy"]).is_relative_to(site_packages), probe
    assert Path(probe["plugin"]).is_relative_to(site_packages), probe
    assert not probe["bench"], probe

    keygen = run(venv / "bin" / "stripe-keygen", "--dir", tmp_path / "keys", cwd=tmp_path)
    assert "server certificate fingerprint: sha256:" in keygen


def test_editable_install_registers_twistd_plugins(tmp_path: Path) -> None:
    source = copy_source(tmp_path)
    work = tmp_path / "elsewhere"  # not the checkout: nothing found through the cwd
    work.mkdir()
    python = make_venv(tmp_path / "venv", work)
    pip_install(python, "--editable", source, cwd=work)

    probe = check_plugins(python, work)
    # The code runs from the checkout: an edit there is what twistd runs.
    assert Path(probe["stripeproxy"]) == source / "stripeproxy" / "__init__.py", probe
    assert Path(probe["plugin"]) == source / "twisted" / "plugins" / "stripeproxy_plugins.py"


def test_constraints_pin_every_dependency_and_are_applied() -> None:
    """constraints.txt pins each declared dependency (and test tool) to a version it allows.

    It is what scripts/test, scripts/run-local and the Containerfile install
    with; a dependency added to pyproject.toml without a pin here would go
    in at whatever version the index has that day.
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not a pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    assert "stripeproxy" not in pins
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    for user in ("scripts/test", "scripts/run-local"):
        assert "--constraint constraints.txt" in (REPO / user).read_text(), user
    containerfile = (REPO / "deploy" / "Containerfile").read_text()
    assert "COPY constraints.txt" in containerfile
    assert "pip install --constraint /wheels/constraints.txt" in containerfile
