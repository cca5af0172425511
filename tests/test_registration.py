"""register/unregister (a symlink in S3PRL's downstream folder) and the .pth alias hook."""

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from s3prl_stimulus.cli import main as cli
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.registration import downstream_source, is_our_link, register, s3prl_downstream_dir, unregister

REPO = Path(__file__).resolve().parents[1]
PTH = REPO / "s3prl_stimulus_alias.pth"

pytestmark = pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")


@pytest.fixture()
def s3prl_checkout(tmp_path) -> Path:
    """A fake S3PRL checkout: <root>/s3prl/{__init__.py, downstream/{__init__.py, runner.py}}."""
    downstream = tmp_path / "s3prl-checkout" / "s3prl" / "downstream"
    downstream.mkdir(parents=True)
    (downstream.parent / "__init__.py").write_text("")
    (downstream / "__init__.py").write_text("")
    (downstream / "runner.py").write_text("# S3PRL's runner\n")
    return tmp_path / "s3prl-checkout"


def test_register_links_the_packaged_downstream_and_is_idempotent(s3prl_checkout):
    link = s3prl_checkout / "s3prl" / "downstream" / "emotion_stimulus"
    first = register(s3prl_checkout)  # the checkout's root
    assert first.action == "created" and first.link == link.parent.resolve() / "emotion_stimulus"
    assert link.is_symlink() and link.resolve() == downstream_source()
    # what a plain `python run_downstream.py -d emotion_stimulus` reads, through the link
    assert (link / "expert.py").is_file() and (link / "config.yaml").is_file()
    assert register(s3prl_checkout / "s3prl").action == "unchanged"  # S3PRL's package folder works too
    assert sorted(p.name for p in link.parent.iterdir()) == ["__init__.py", "emotion_stimulus", "runner.py"]


def test_register_replaces_a_stale_link_of_ours(s3prl_checkout, tmp_path):
    old = tmp_path / "old-venv" / "s3prl_stimulus" / "downstream" / "emotion_stimulus"
    link = s3prl_checkout / "s3prl" / "downstream" / "emotion_stimulus"
    os.symlink(old, link)  # dangling: that installation is gone
    assert is_our_link(link)
    assert register(s3prl_checkout).action == "replaced"
    assert link.resolve() == downstream_source()


def test_unregister_removes_only_our_link(s3prl_checkout):
    register(s3prl_checkout)
    link = s3prl_checkout / "s3prl" / "downstream" / "emotion_stimulus"
    result = unregister(s3prl_checkout)
    assert result.action == "removed" and not os.path.lexists(link)
    assert (downstream_source() / "expert.py").is_file()  # the target is untouched
    assert unregister(s3prl_checkout).action == "absent"


def test_a_copied_folder_is_never_overwritten_or_removed(s3prl_checkout):
    copied = s3prl_checkout / "s3prl" / "downstream" / "emotion_stimulus"
    copied.mkdir()
    (copied / "expert.py").write_text("# someone's copy\n")
    with pytest.raises(StimulusError, match="not a link made by s3prl-stimulus"):
        register(s3prl_checkout)
    with pytest.raises(StimulusError, match="left in place"):
        unregister(s3prl_checkout)
    assert (copied / "expert.py").read_text() == "# someone's copy\n"
    # a link to something else is not ours either
    copied.joinpath("expert.py").unlink()
    copied.rmdir()
    os.symlink(s3prl_checkout, copied)
    assert not is_our_link(copied)
    with pytest.raises(StimulusError):
        unregister(s3prl_checkout)
    assert copied.is_symlink()


def test_a_directory_without_s3prl_is_refused(tmp_path):
    with pytest.raises(StimulusError, match="runner.py"):
        s3prl_downstream_dir(tmp_path)
    with pytest.raises(StimulusError, match="no such directory"):
        s3prl_downstream_dir(tmp_path / "missing")


def test_default_is_the_installed_s3prl():
    s3prl = pytest.importorskip("s3prl")
    assert s3prl_downstream_dir() == (Path(s3prl.__file__).parent / "downstream").resolve()


def test_cli_register_and_unregister(s3prl_checkout, capsys):
    assert cli(["register", "--s3prl", str(s3prl_checkout)]) == 0
    assert "registered:" in capsys.readouterr().out
    assert cli(["register", "--s3prl", str(s3prl_checkout)]) == 0
    assert "already registered" in capsys.readouterr().out
    assert cli(["unregister", "--s3prl", str(s3prl_checkout)]) == 0
    assert "unregistered: removed" in capsys.readouterr().out
    assert cli(["register", "--s3prl", str(s3prl_checkout / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_registered_link_imports_as_s3prl_downstream_without_the_alias(s3prl_checkout):
    """The symlink alone (no .pth hook: python -S) makes the downstream a subpackage of S3PRL's."""
    register(s3prl_checkout)
    result = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent("""
            import sys, importlib
            m = importlib.import_module("s3prl.downstream.emotion_stimulus")
            print(m.__name__, m.__file__)
            print(any(getattr(f, "s3prl_stimulus_alias", None) for f in sys.meta_path))
        """)],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(s3prl_checkout), str(REPO)])),
        cwd=s3prl_checkout.parent, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    name, path, hooked = result.stdout.split()
    assert name == "s3prl.downstream.emotion_stimulus" and hooked == "False"
    assert Path(path) == s3prl_checkout / "s3prl" / "downstream" / "emotion_stimulus" / "__init__.py"


# ---------------------------------------------------------------- the .pth hook, in fresh interpreters


def run_with_pth(tmp_path, code: str, with_package: bool = True) -> subprocess.CompletedProcess:
    """A fresh `python -S` that processes the repository's .pth first (as site-packages would), then,
    with_package, the environment's site-packages (where the installed, possibly editable, package is)."""
    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    (site_dir / PTH.name).write_bytes(PTH.read_bytes())
    purelib = sysconfig.get_paths()["purelib"]
    paths = [purelib]
    prologue = f"import site, sys\nsite.addsitedir({str(site_dir)!r})\n"
    if with_package:
        prologue += f"site.addsitedir({purelib!r})\n"
    return subprocess.run(
        [sys.executable, "-S", "-c", prologue + textwrap.dedent(code)],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)), cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )


def test_pth_hook_aliases_the_downstream_in_a_fresh_interpreter(tmp_path):
    pytest.importorskip("s3prl")
    result = run_with_pth(tmp_path, """
        import importlib
        from importlib.machinery import PathFinder
        hooks = [f for f in sys.meta_path if getattr(f, "s3prl_stimulus_alias", None)]
        assert len(hooks) == 1 and sys.meta_path.index(hooks[0]) < sys.meta_path.index(PathFinder), sys.meta_path
        print(hooks[0].s3prl_stimulus_alias, "s3prl_stimulus" in sys.modules)
        alias = importlib.import_module("s3prl.downstream.emotion_stimulus")
        real = importlib.import_module("s3prl_stimulus.downstream.emotion_stimulus")
        print(alias is real, real.__spec__.name)
        from s3prl_stimulus.integration.registration import install_alias
        print(install_alias())  # the launcher sees the hook and adds no second finder
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.split() == [
        "s3prl.downstream.emotion_stimulus", "False",  # installed at start-up, s3prl_stimulus not imported yet
        "True", "s3prl_stimulus.downstream.emotion_stimulus",
        "False",
    ]


def test_pth_hook_never_breaks_start_up_when_the_package_is_gone(tmp_path):
    pytest.importorskip("s3prl")
    result = run_with_pth(tmp_path, """
        print("started")
        sys.modules["s3prl_stimulus"] = None  # uninstalled (or broken): importing it raises ImportError
        try:
            import s3prl.downstream.emotion_stimulus
        except ModuleNotFoundError as error:
            print("missing", error.name)
    """, with_package=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.split() == ["started", "missing", "s3prl.downstream.emotion_stimulus"]


def test_installed_pth_is_the_repository_one():
    """setup.py ships the .pth into site-packages (regular and editable installs)."""
    try:
        dist = importlib.metadata.distribution("s3prl-stimulus")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("s3prl-stimulus is not installed (tests run from a source tree on PYTHONPATH)")
    installed = [f for f in dist.files or [] if f.name == PTH.name]
    assert installed, f"{PTH.name} missing from the installed files of s3prl-stimulus {dist.version}: reinstall with pip"
    assert Path(installed[0].locate()).read_bytes() == PTH.read_bytes()
