"""The distribution installs one import name, ``mdlens``: the repository's hooks/ and analyses/
folders become ``mdlens.hooks`` and ``mdlens.analyses``, never top-level ``hooks`` / ``analyses``."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_name_and_maps_the_folders(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("mdlens", "hooks", "analyses"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("mdlens-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"mdlens"}
    assert "mdlens/hooks/probes.py" in names and "mdlens/analyses/trained.py" in names
    assert "mdlens/analyses/bench/models.py" in names  # the benchmarks sub-package
    assert any(name.startswith("mdlens/pretrained/disentangled-3l/") for name in names)

    # Unpacked and imported from elsewhere: mdlens.hooks and mdlens.analyses import, the generic names do not.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check = (
        "import importlib.util, mdlens, mdlens.hooks, mdlens.analyses.trained;"
        f"assert mdlens.__file__.startswith({str(site)!r}), mdlens.__file__;"
        "assert importlib.util.find_spec('hooks') is None and importlib.util.find_spec('analyses') is None"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-c", check], check=True, cwd=elsewhere, env={"PYTHONPATH": str(site), "PATH": ""})
