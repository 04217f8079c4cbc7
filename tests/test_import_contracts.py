"""The import contracts of .importlinter (design.md's one-way flow), run as `make test` runs them:
on a tree with the installed layout, built here from [tool.setuptools.package-dir]. They hold on
the repository as it is, and a copy of it with one wrong import planted breaks them, with a
message that names that import."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def import_tree(where: Path, planted: dict[str, str] | None = None) -> Path:
    """``where/mdlens`` laid out as installed (each package's folder under its import name), every
    file a link to the repository's, except the files named in ``planted`` (by import path, e.g.
    ``mdlens/estimators.py``): copies with that line added at the end. Returns ``where``."""
    planted = dict(planted or {})
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(package_dir.items()):  # parents before their subpackages
        target = where.joinpath(*package.split("."))
        target.mkdir(parents=True)
        for entry in (ROOT / folder).iterdir():
            name = f"{target.relative_to(where).as_posix()}/{entry.name}"
            if name in planted:
                (target / entry.name).write_text(entry.read_text() + "\n" + planted.pop(name) + "\n")
            elif not (target / entry.name).exists():
                (target / entry.name).symlink_to(entry)
    if planted:
        raise ValueError(f"no such files to plant an import in: {sorted(planted)}")
    return where


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    # From the tree's folder: lint-imports puts its working directory first on sys.path.
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache", ROOT / ".importlinter"], cwd=tree, capture_output=True, text=True, timeout=120
    )


def test_the_contracts_hold(tmp_path):
    result = lint_imports(import_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout and ", 0 broken." in result.stdout, result.stdout
    # The tree really holds the three folders: a graph without hooks/analyses would fail on a missing layer.
    assert (tmp_path / "mdlens" / "hooks" / "attention.py").is_symlink()
    assert (tmp_path / "mdlens" / "analyses" / "report.py").is_symlink()


@pytest.mark.parametrize(
    ("path", "line", "message"),
    [
        ("mdlens/estimators.py", "import mdlens.hooks", "mdlens.estimators is not allowed to import mdlens.hooks"),
        ("mdlens/validation.py", "from mdlens import task", "mdlens.validation is not allowed to import mdlens.task"),
        ("mdlens/task.py", "import mdlens.checkpoints", "mdlens.task is not allowed to import mdlens.checkpoints"),
        (
            "mdlens/training.py",
            "import mdlens.checkpoints",
            "mdlens.training is not allowed to import mdlens.checkpoints",
        ),
        (
            "mdlens/hooks/probes.py",
            "import mdlens.analyses.plotting",
            "mdlens.hooks is not allowed to import mdlens.analyses",
        ),
        (
            "mdlens/hooks/probes.py",
            "from mdlens.checkpoints import load",
            "mdlens.hooks is not allowed to import mdlens.checkpoints",
        ),
        (
            "mdlens/analyses/trained.py",
            "from mdlens.analyses import mechanisms",
            "mdlens.analyses.trained is not allowed to import mdlens.analyses.mechanisms",
        ),
    ],
)
def test_a_wrong_import_breaks_them(tmp_path, path, line, message):
    result = lint_imports(import_tree(tmp_path, {path: line}))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and message in result.stdout, result.stdout
