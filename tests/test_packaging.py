"""The built wheel installs a plugin that ``twistd`` finds, outside the checkout.

The wheel is built from a copy of the source tree (so the build never writes
into the working tree other people use), into which a stale ``dropin.cache``
is planted to prove it is not packaged.  It is then installed with a plain
``pip install`` (dependencies included, from the package index or pip's
cache) into a fresh virtual environment that knows nothing of this checkout
or of the development install, which is what a user does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json
import stripeproxy
import twisted.plugins.stripeproxy_plugins as plugin_module
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
options = {name: type(makers[name].options()).__module__
           for name in ("stripe-client", "stripe-server") if name in makers}
print(json.dumps({
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


def build_wheel(tmp_path: Path) -> Path:
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
    (source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale cache")
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, source, cwd=tmp_path)
    (wheel,) = dist.glob("stripeproxy-*.whl")
    return wheel


def test_wheel_installs_twistd_plugins(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/stripeproxy_plugins.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/__init__.py" not in names
    assert not [n for n in names if n.endswith("dropin.cache")]
    assert "stripeproxy/py.typed" in names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path, timeout=900)
    site_packages = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )

    probe = json.loads(run(python, "-c", PROBE, cwd=tmp_path))
    assert Path(probe["stripeproxy"]).is_relative_to(site_packages), probe
    assert Path(probe["plugin"]).is_relative_to(site_packages), probe
    assert {"stripe-client", "stripe-server"} <= set(probe["taps"]), probe
    assert probe["options"] == {
        "stripe-client": "stripeproxy.cli.client_tap",
        "stripe-server": "stripeproxy.cli.server_tap",
    }

    twistd = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    help_text = run(python, "-c", twistd, "--help", cwd=tmp_path)
    assert "stripe-client" in help_text
    assert "stripe-server" in help_text
    server_help = run(python, "-c", twistd, "stripe-server", "--help", cwd=tmp_path)
    assert "--psk-file" in server_help

    keygen = run(venv / "bin" / "stripe-keygen", "--dir", tmp_path / "keys", cwd=tmp_path)
    assert "server certificate fingerprint: sha256:" in keygen
