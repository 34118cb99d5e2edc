"""The package's layers, checked from the source: who may import whom.

``stripeproxy.core`` is the sans-I/O layer (no reactor, no sockets, time as an
argument), so it may import only itself, the standard library and a few pure
third-party packages. The adapters (``net``) and operations (``ops``) sit on
top of it and below the entry points (``cli``); the benchmark and the tests
are outside the product and nothing in it may depend on them.

Every module is parsed with ``ast`` rather than imported, so that imports a
run would skip still count: those inside functions, under ``TYPE_CHECKING``,
in ``try`` blocks, and ``importlib.import_module("...")`` with a literal name.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "stripeproxy"

# Pure third-party packages the core may use: crc32c (plaintext-mode frame checksums),
# txaio (its framework-neutral logger, so the core logs without importing Twisted) and
# zope.interface (declarations only: an interface the adapters provide, no I/O).
CORE_THIRD_PARTY = frozenset({"crc32c", "txaio", "zope.interface"})


# Core modules that import twisted.internet on main today (IReactorTime, for their
# clock); the issue 9 work removes those imports. strict=True turns the fix into an
# XPASS failure, the signal to delete the entry.
@dataclass(frozen=True)
class Import:
    """One module name an import statement may load, and where the statement is."""

    name: str
    line: int


def imported_names(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every module name ``source`` (the text of ``module``) may import, anywhere in it.

    ``from a.b import c`` counts as ``a.b`` and ``a.b.c``: ``c`` may be a
    submodule, and a rule about ``a.b.c`` must not be dodged by spelling it
    ``from a.b import c``. Relative imports are resolved against ``module``
    (``is_package`` when it is an ``__init__``).
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            found.append(Import(base, node.lineno))
            found.extend(
                Import(f"{base}.{alias.name}", node.lineno)
                for alias in node.names
                if alias.name != "*"
            )
        elif (
            isinstance(node, ast.Call)
            and _called_name(node.func) in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(node.args[0].value, node.lineno))
    return found


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


@dataclass(frozen=True)
class Module:
    name: str
    path: Path

    def imports(self) -> list[Import]:
        return imported_names(
            self.path.read_text(encoding="utf-8"), self.name, self.path.name == "__init__.py"
        )


def _modules(root: Path, top: str) -> Iterator[Module]:
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield Module(".".join([top, *parts]), path)


PRODUCT = [
    *_modules(PACKAGE, "stripeproxy"),
    *_modules(ROOT / "twisted" / "plugins", "twisted.plugins"),
]
BY_NAME = {module.name: module for module in PRODUCT}


def _in_layer(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def _layer(layer: str) -> list[Module]:
    return [module for module in PRODUCT if _in_layer(module.name, layer)]


def _offences(module: Module, forbidden: Iterable[str]) -> list[str]:
    """``path:line imports name`` for each import of a name in one of ``forbidden``."""
    layers = tuple(forbidden)
    hits = {
        (found.line, found.name)
        for found in module.imports()
        if any(_in_layer(found.name, layer) for layer in layers)
    }
    return [f"{_where(module.path)}:{line} imports {name}" for line, name in sorted(hits)]


def _where(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _core_params() -> list[object]:
    return [pytest.param(m.name, id=m.name) for m in _layer("stripeproxy.core")]


def test_the_layers_are_found() -> None:
    """The checks below walk real modules: an empty walk would pass them all."""
    assert len(_layer("stripeproxy.core")) >= 9
    for layer in ("net", "ops", "cli", "harness", "testing"):
        assert _layer(f"stripeproxy.{layer}"), layer
    assert "twisted.plugins.stripeproxy_plugins" in BY_NAME


@pytest.mark.parametrize("name", _core_params())
def test_core_does_not_import_twisted_internet(name: str) -> None:
    """The core never touches the reactor, not even for a type: time comes as an argument."""
    offences = _offences(BY_NAME[name], ["twisted.internet"])
    assert not offences, "the core must not import twisted.internet:\n" + "\n".join(offences)


@pytest.mark.parametrize("name", _core_params())
def test_core_imports_only_core_stdlib_and_pure_packages(name: str) -> None:
    module = BY_NAME[name]
    outside = {
        found.name
        for found in module.imports()
        if not (
            _in_layer(found.name, "stripeproxy.core")
            or found.name.partition(".")[0] in sys.stdlib_module_names
            or any(_in_layer(found.name, allowed) for allowed in CORE_THIRD_PARTY)
        )
    }
    offences = _offences(module, outside)
    assert not offences, (
        "the core may import only stripeproxy.core, the standard library and "
        f"{sorted(CORE_THIRD_PARTY)}:\n" + "\n".join(offences)
    )


def test_nothing_below_the_entry_points_imports_them() -> None:
    """``cli`` wires the layers together; a layer that imports it would import them all."""
    offences = [
        offence
        for layer in ("net", "ops", "harness", "testing")
        for module in _layer(f"stripeproxy.{layer}")
        for offence in _offences(module, ["stripeproxy.cli"])
    ]
    assert not offences, "only stripeproxy.cli may import stripeproxy.cli:\n" + "\n".join(offences)


def test_the_product_does_not_import_the_lab() -> None:
    """The benchmark and the tests are not in the wheel: an import of them breaks an install."""
    offences = [offence for module in PRODUCT for offence in _offences(module, ["bench", "tests"])]
    assert not offences, "the product must not import bench or tests:\n" + "\n".join(offences)


# ----- the import finder itself: each rule above is only as good as what it sees

_SAMPLE = """
import os, twisted.internet.task as task
from typing import TYPE_CHECKING
from twisted import internet
from . import sibling
from ..net import driver
from .. import cli as entry
import importlib

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

def later():
    from bench import run
    try:
        import tests.helpers
    except ImportError:
        pass
    return importlib.import_module("stripeproxy.ops.metrics")
"""


def test_the_import_finder_sees_every_kind_of_import() -> None:
    names = {found.name for found in imported_names(_SAMPLE, "stripeproxy.core.sample")}
    assert {
        "os",
        "twisted.internet.task",
        "twisted.internet",  # from twisted import internet
        "stripeproxy.core.sibling",
        "stripeproxy.net.driver",
        "stripeproxy.cli",
        "twisted.internet.interfaces.IReactorTime",  # under TYPE_CHECKING
        "bench.run",  # inside a function
        "tests.helpers",  # inside try
        "stripeproxy.ops.metrics",  # importlib.import_module("...")
    } <= names


def test_relative_imports_resolve_from_a_package() -> None:
    found = imported_names("from . import wire\nfrom .. import net\n", "stripeproxy.core", True)
    assert {"stripeproxy.core.wire", "stripeproxy.net"} <= {f.name for f in found}


def test_offences_name_the_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(_SAMPLE, encoding="utf-8")
    offences = _offences(Module("stripeproxy.core.sample", source), ["twisted.internet"])
    assert offences == [
        f"{source}:2 imports twisted.internet.task",
        f"{source}:4 imports twisted.internet",
        f"{source}:11 imports twisted.internet.interfaces",
        f"{source}:11 imports twisted.internet.interfaces.IReactorTime",
    ]
