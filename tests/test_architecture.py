"""The package's architecture, checked: layers and independence (import-linter), private names, test isolation.

* The import-linter contracts in ``pyproject.toml`` (``[tool.importlinter]``): the layering of the
  package, which modules may not import which, and no import cycles. Run by hand with
  ``lint-imports --no-cache`` from the repository root.
* A private name (one with a leading underscore: a function, class, constant or module) is used only
  inside its own folder. import-linter cannot say this about names, so it is checked here with ``ast``.
* No module in ``tests/`` imports another test module.

Both hand-written checks have an allowlist of today's violations. The redesign in progress removes
them; a violation that is not listed fails the test, so the lists can only shrink.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = "mcdrop"

# "importing module -> private name it uses" that are tolerated: none since the redesign (issue 17).
# Make the name public, or move the code that uses it into the name's folder, rather than add one.
KNOWN_VIOLATIONS: frozenset[str] = frozenset()

# "test module -> the test module it imports" that are tolerated: none. Fixtures shared between test
# files belong in conftest.py, shared models and helpers in tests/zoo.py or tests/support_models.py.
KNOWN_TEST_IMPORTS: frozenset[str] = frozenset()


# ----------------------------------------------------------------------------------------------
# import-linter contracts
# ----------------------------------------------------------------------------------------------
def _lint_imports() -> list[str]:
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    script = Path(sys.executable).parent / ("lint-imports.exe" if os.name == "nt" else "lint-imports")
    found = str(script) if script.exists() else shutil.which("lint-imports")
    if found is None:  # pragma: no cover - the package installs the script
        pytest.skip("the lint-imports command is not installed")
    return [found]


def test_import_linter_contracts_are_kept() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [*_lint_imports(), "--no-cache"],  # no cache: nothing is written into the repository
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout


# ----------------------------------------------------------------------------------------------
# private names stay in their folder
# ----------------------------------------------------------------------------------------------
def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(name: str, base: Path) -> bool:
    return (base / Path(*name.split(".")) / "__init__.py").is_file()


def _is_module(name: str, base: Path) -> bool:
    return _is_package(name, base) or (base / Path(*name.split("."))).with_suffix(".py").is_file()


def _folder(container: str, base: Path) -> str:
    """The folder inside which the private names defined in ``container`` may be used.

    A name defined in a package (a private submodule, or a name in its ``__init__``) belongs to that
    package's folder. A name defined in a module, or in a class of one, belongs to the module's
    package folder; except in the top-level ``mcdrop/`` folder, which is the whole library and not
    one unit: there each module is its own folder (``mcdrop.wrapper`` may not use
    ``mcdrop.sampling._signature``). Subfolders of a folder are inside it.
    """
    while container != ROOT and not _is_module(container, base):
        container = container.rpartition(".")[0]  # a class or other object: its module decides
    if _is_package(container, base):
        return container
    parent = container.rpartition(".")[0]
    return container if parent == ROOT else parent


def _violations(dotted: str, importer: str, base: Path) -> Iterator[str]:
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        if _is_private(parts[i]):
            folder = _folder(".".join(parts[:i]), base)
            if importer != folder and not importer.startswith(folder + "."):
                yield f"{importer} -> {'.'.join(parts[: i + 1])}"
                return


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".")
    if not is_package:
        package.pop()
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, node.module] if node.module else package)


def _dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in bound:
        return ".".join([bound[node.id], *reversed(attrs)])
    return None


def private_name_uses(base: Path) -> set[str]:
    """Every use of a private name outside its folder in the package under ``base``, as ``importer -> name``."""
    found: set[str] = set()
    for path in sorted((base / ROOT).rglob("*.py")):
        importer = _module_name(path, base)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bound: dict[str, str] = {}  # local name -> the mcdrop module or object it stands for
        refs: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    refs.append(alias.name)
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        head = alias.name.split(".")[0]
                        bound[head] = head
            elif isinstance(node, ast.ImportFrom):
                module = _absolute(node, importer, path.name == "__init__.py")
                for alias in node.names:
                    if alias.name == "*":
                        refs.append(module)
                        continue
                    refs.append(f"{module}.{alias.name}")
                    bound[alias.asname or alias.name] = f"{module}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                dotted = _dotted(node, bound)
                if dotted is not None:
                    refs.append(dotted)
        for ref in refs:
            if ref == ROOT or ref.startswith(ROOT + "."):
                found.update(_violations(ref, importer, base))
    return found


def test_private_names_are_used_only_inside_their_folder() -> None:
    new = sorted(private_name_uses(REPO) - KNOWN_VIOLATIONS)
    assert not new, (
        "private names used outside their folder (make the name public, or move the code that uses "
        "it into the name's folder):\n  " + "\n  ".join(new)
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from mcdrop.sampling import _signature", {"mcdrop.wrapper -> mcdrop.sampling._signature"}),
        (
            "from mcdrop import sampling\nsampling._signature(1)",
            {"mcdrop.wrapper -> mcdrop.sampling._signature"},
        ),
        ("import mcdrop.report._report", {"mcdrop.wrapper -> mcdrop.report._report"}),
        ("from mcdrop.metrics._inputs import vector", {"mcdrop.wrapper -> mcdrop.metrics._inputs"}),
        ("from mcdrop._checks import check_int", set()),  # a private module of the package itself
        ("from mcdrop.sampling import sample as _sample", set()),  # a private alias of a public name
        ("from .sampling import _signature", {"mcdrop.wrapper -> mcdrop.sampling._signature"}),
    ],
)
def test_private_name_check_finds_what_it_should(tmp_path: Path, source: str, expected: set[str]) -> None:
    for name in ["__init__", "wrapper", "sampling", "_checks"]:
        (tmp_path / ROOT).mkdir(exist_ok=True)
        (tmp_path / ROOT / f"{name}.py").write_text("")
    for package in ["report", "metrics"]:
        (tmp_path / ROOT / package).mkdir()
        for name in ["__init__", "_report", "_inputs", "figures"]:
            (tmp_path / ROOT / package / f"{name}.py").write_text("")
    (tmp_path / ROOT / "wrapper.py").write_text(source + "\n")
    (tmp_path / ROOT / "report" / "figures.py").write_text("from mcdrop.report._report import x\n")
    assert private_name_uses(tmp_path) == expected


# ----------------------------------------------------------------------------------------------
# test modules are independent of each other
# ----------------------------------------------------------------------------------------------
def test_test_modules_do_not_import_each_other() -> None:
    tests = REPO / "tests"
    local = {_module_name(p, tests).split(".")[0] for p in tests.rglob("*.py")}  # importable via rootdir
    found = set()
    for path in sorted(tests.rglob("*.py")):
        importer = "tests." + _module_name(path, tests)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: inside tests/
                    module = ".".join(filter(None, ["tests", module]))
                targets = (
                    [f"{module}.{alias.name}" for alias in node.names] if module == "tests" else [module]
                )
            else:
                continue
            for target in targets:
                head = target.split(".")[0]
                if head == "tests":
                    target = target.removeprefix("tests.")
                elif head not in local:
                    continue
                # Shared helpers (the model zoo, conftest) are meant to be imported; test modules are not.
                if target.split(".")[0].startswith("test_"):
                    found.add(f"{importer} -> tests.{target}")
    new = sorted(found - KNOWN_TEST_IMPORTS)
    assert not new, "test modules importing other test modules:\n  " + "\n  ".join(new)
