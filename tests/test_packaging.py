"""The sdist and the wheel built from a clean copy of the tracked tree carry the whole package, the
top-level ``downstream/`` folder included, and a wheel install finds the downstream by itself."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOWNSTREAM_FILES = ("__init__.py", "config.yaml", "dataset.py", "expert.py", "model.py")


def tracked_files() -> list[str]:
    try:
        listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                                 text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout to copy the tracked tree from")
    return [name for name in listing.splitlines() if (REPO / name).is_file()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """sdist and wheel built from a copy of the tracked files (what a clean clone has)."""
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    source = tmp_path_factory.mktemp("clone")
    files = tracked_files()
    for name in files:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((REPO / name).read_bytes())
    dist = source / "dist"
    code = ("from setuptools import build_meta as b; "
            "s = b.build_sdist('dist'); w = b.build_wheel('dist'); print('BUILT', s, w)")
    result = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    sdist_name, wheel_name = result.stdout.rsplit("BUILT", 1)[1].split()
    return {"files": files, "sdist": dist / sdist_name, "wheel": dist / wheel_name}


def package_modules(files) -> set[str]:
    """Installed paths of every tracked module: s3prl_stimulus/**.py, and downstream/** under s3prl_stimulus/."""
    wanted = set()
    for name in files:
        if name.startswith("s3prl_stimulus/") and name.endswith(".py"):
            wanted.add(name)
        elif name.startswith("downstream/"):
            wanted.add("s3prl_stimulus/" + name)
    return wanted


def test_wheel_holds_every_module_and_the_downstream(built):
    with zipfile.ZipFile(built["wheel"]) as wheel:
        names = set(wheel.namelist())
    missing = package_modules(built["files"]) - names
    assert not missing, f"missing from the wheel: {sorted(missing)}"
    for name in DOWNSTREAM_FILES:
        assert f"s3prl_stimulus/downstream/emotion_stimulus/{name}" in names
    assert "s3prl_stimulus_alias.pth" in names
    assert not any(name.startswith("downstream/") for name in names)  # never a top-level package "downstream"
    from s3prl_stimulus.resources import SHA256

    for name in SHA256:  # every packaged data file (votes, folds, manifest, the paper's numbers)
        assert f"s3prl_stimulus/data/{name}" in names


def test_sdist_holds_the_top_level_downstream_folder(built):
    with tarfile.open(built["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for name in DOWNSTREAM_FILES:
        assert f"downstream/emotion_stimulus/{name}" in names
    for name in ("setup.py", "setup.cfg", "s3prl_stimulus_alias.pth", "recipes/run_paper.sh"):
        assert name in names
    missing = {n for n in built["files"] if n.startswith("s3prl_stimulus/") and n.endswith(".py")} - names
    assert not missing, f"missing from the sdist: {sorted(missing)}"


def test_wheel_install_finds_its_downstream_and_config(built, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                             str(target), str(built["wheel"])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    code = ("from s3prl_stimulus.integration.registration import downstream_source\n"
            "from s3prl_stimulus.integration.launcher import packaged_config\n"
            "print(downstream_source()); print(packaged_config())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(target)))
    assert result.returncode == 0, result.stderr[-2000:]
    source, config = result.stdout.split()
    assert Path(source) == (target / "s3prl_stimulus" / "downstream" / "emotion_stimulus").resolve()
    assert Path(config) == Path(source) / "config.yaml" and Path(config).is_file()


def test_editable_install_points_at_the_top_level_folder():
    from s3prl_stimulus.integration.registration import downstream_source

    source = downstream_source()
    if not str(source).startswith(str(REPO)):
        pytest.skip(f"s3prl-stimulus is installed from {source}, not editable from this checkout")
    assert source == (REPO / "downstream" / "emotion_stimulus").resolve()
