"""Make S3PRL find the downstream as ``s3prl.downstream.emotion_stimulus``, with no files copied.

S3PRL's runner imports ``s3prl.downstream.<name>.expert``: a downstream must be reachable inside the
``s3prl.downstream`` package. Two ways, both pointing at this package's own code:

- an **alias finder** on ``sys.meta_path`` that answers every ``s3prl.downstream.emotion_stimulus[.*]``
  import with the module object of ``s3prl_stimulus.downstream.emotion_stimulus[.*]`` (the same object,
  so there is one copy of each module). The ``s3prl_stimulus_alias.pth`` file installed into
  site-packages puts a lazy version of it in every Python process of the environment (torchrun
  workers included); the launcher (:mod:`s3prl_stimulus.integration.launcher`) installs it too. It works with regular
  and editable S3PRL installs because it never touches S3PRL's files.
- :func:`register`: a symlink ``<s3prl>/downstream/emotion_stimulus`` → this installation's downstream
  folder (the top-level ``downstream/emotion_stimulus`` of a checkout), for S3PRL checkouts used as ``python run_downstream.py -d emotion_stimulus`` from an
  environment without the ``.pth`` (e.g. ``pip install --target``). :func:`unregister` removes
  only a link that :func:`register` made.

This module imports only the standard library: the ``.pth`` hook may import it in any process.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ALIAS = "s3prl.downstream.emotion_stimulus"
"""Where S3PRL's runner looks for the downstream (``-d emotion_stimulus``)."""

TARGET = "s3prl_stimulus.downstream.emotion_stimulus"
"""Where the downstream's code lives."""

DOWNSTREAM_NAME = ALIAS.rsplit(".", 1)[1]
_SOURCE_TAIL = ("downstream", DOWNSTREAM_NAME)


# ---------------------------------------------------------------- alias finder


class AliasFinder(importlib.abc.MetaPathFinder):
    """Resolve ``alias[.sub]`` imports to the already-importable modules ``target[.sub]``."""

    def __init__(self, alias: str = ALIAS, target: str = TARGET):
        self.s3prl_stimulus_alias = alias  # marker read by install_alias (and by the .pth hook's twin)
        self.alias = alias
        self.target = target

    def target_name(self, fullname: str) -> str | None:
        """``target[.sub]`` for ``alias[.sub]``; None for any other module name."""
        if fullname == self.alias:
            return self.target
        if fullname.startswith(self.alias + "."):
            return self.target + fullname[len(self.alias):]
        return None

    def find_spec(self, fullname, path=None, target=None):
        real_name = self.target_name(fullname)
        if real_name is None:
            return None
        try:
            real_spec = importlib.util.find_spec(real_name)
        except ModuleNotFoundError:
            real_spec = None
        if real_spec is None:
            return None  # let the normal machinery report "No module named ..."
        return importlib.util.spec_from_loader(
            fullname,
            _AliasLoader(real_name),
            origin=real_spec.origin,
            is_package=real_spec.submodule_search_locations is not None,
        )

    def __repr__(self):
        return f"AliasFinder({self.alias!r} -> {self.target!r})"


class _AliasLoader(importlib.abc.Loader):
    """Hands the import system the real module instead of creating a new one."""

    def __init__(self, real_name: str):
        self.real_name = real_name
        self.real_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.real_name)
        self.real_spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has just stamped the alias spec onto the module; the module stays what
        # it is (reload, pickling and relative imports read __spec__), it is only also known as the alias.
        module.__spec__ = self.real_spec


def install_alias(alias: str = ALIAS, target: str = TARGET) -> bool:
    """Put an :class:`AliasFinder` first on ``sys.meta_path`` unless one for ``alias`` is there.

    First, so that submodules of the alias resolve to the real modules rather than being loaded a
    second time from the real package's ``__path__``. It answers only names under ``alias``.
    Returns whether a finder was added.
    """
    if any(getattr(finder, "s3prl_stimulus_alias", None) == alias for finder in sys.meta_path):
        return False
    sys.meta_path.insert(0, AliasFinder(alias, target))
    return True


# ---------------------------------------------------------------- register / unregister (symlink)


@dataclass(frozen=True)
class Registration:
    link: Path
    source: Path
    action: str
    """created | unchanged | replaced (register); removed | absent (unregister)."""


def downstream_folder() -> Path:
    """Where this installation's downstream code is: the top-level ``downstream/emotion_stimulus`` of a
    checkout (editable install) or ``s3prl_stimulus/downstream/emotion_stimulus`` in site-packages."""
    try:
        spec = importlib.util.find_spec(TARGET)  # imports only the (empty) parent packages
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _error(f"{TARGET} is not importable: this s3prl-stimulus installation is incomplete; reinstall it")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def downstream_source() -> Path:
    """This installation's downstream folder (the link target)."""
    source = downstream_folder()
    if not (source / "expert.py").is_file():
        raise _error(f"{source} has no expert.py: this s3prl-stimulus installation is incomplete; reinstall it")
    return source


def s3prl_downstream_dir(s3prl_dir: str | os.PathLike | None = None) -> Path:
    """S3PRL's ``downstream`` folder: in ``s3prl_dir`` (S3PRL's package folder), in ``s3prl_dir/s3prl``
    (a checkout's root), or, by default, in the installed ``s3prl`` package."""
    if s3prl_dir is None:
        try:
            spec = importlib.util.find_spec("s3prl")  # finds the package without importing it (no torch)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise _error(
                f"S3PRL is not installed in {sys.prefix}: pass --s3prl DIR (an S3PRL checkout) or "
                "pip install s3prl==0.4.18 --no-deps"
            )
        candidates = [Path(location) for location in spec.submodule_search_locations]
    else:
        root = Path(s3prl_dir).expanduser()
        if not root.is_dir():
            raise _error(f"--s3prl {root}: no such directory; pass S3PRL's package folder or checkout root")
        candidates = [root, root / "s3prl"]
    for candidate in candidates:
        if (candidate / "downstream" / "runner.py").is_file():
            return (candidate / "downstream").resolve()
    tried = ", ".join(str(c / "downstream" / "runner.py") for c in candidates)
    raise _error(f"no S3PRL downstream folder found (looked for {tried}); pass --s3prl with S3PRL's package folder or checkout root")


def is_our_link(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a symlink made by :func:`register`: it points at an s3prl-stimulus downstream
    folder, i.e. ``.../downstream/emotion_stimulus`` inside an installed ``s3prl_stimulus`` or in a checkout
    (beside its ``s3prl_stimulus`` package), or at such a path that no longer exists (a removed installation)."""
    path = Path(path)
    if not path.is_symlink():
        return False
    target = Path(os.readlink(path))
    if target.parts[-len(_SOURCE_TAIL):] != _SOURCE_TAIL:
        return False
    package_root = target.parent.parent
    return package_root.name == "s3prl_stimulus" or (package_root / "s3prl_stimulus").is_dir() or not target.exists()


def register(s3prl_dir: str | os.PathLike | None = None) -> Registration:
    """Link ``<S3PRL>/downstream/emotion_stimulus`` to this package's downstream folder (idempotent)."""
    source = downstream_source()
    link = s3prl_downstream_dir(s3prl_dir) / DOWNSTREAM_NAME
    if os.path.lexists(link):
        if not is_our_link(link):
            raise _error(
                f"{link} exists and is not a link made by s3prl-stimulus (a copied folder?): "
                "remove it, then run `s3prl-stimulus register` again"
            )
        if Path(os.readlink(link)) == source:
            return Registration(link, source, "unchanged")
        action = "replaced"  # a link to another installation (old checkout, other venv)
    else:
        action = "created"
    temporary = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        os.symlink(source, temporary, target_is_directory=True)
        os.replace(temporary, link)  # atomic: S3PRL never sees a half-made registration
    except OSError as error:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise _error(
            f"cannot create {link}: {error.strerror or error}; use an S3PRL you can write to, or run "
            "`python -m s3prl_stimulus.run_downstream`, which needs no registration"
        ) from error
    return Registration(link, source, action)


def unregister(s3prl_dir: str | os.PathLike | None = None) -> Registration:
    """Remove the link made by :func:`register`; anything else at that path is left alone."""
    link = s3prl_downstream_dir(s3prl_dir) / DOWNSTREAM_NAME
    if not os.path.lexists(link):
        return Registration(link, downstream_folder(), "absent")
    if not is_our_link(link):
        raise _error(f"{link} is not a link made by s3prl-stimulus register: left in place; remove it yourself if it is stale")
    target = Path(os.readlink(link))
    try:
        os.unlink(link)
    except OSError as error:
        raise _error(f"cannot remove {link}: {error.strerror or error}") from error
    return Registration(link, target, "removed")


def _error(message: str) -> Exception:
    from s3prl_stimulus.errors import StimulusError

    return StimulusError(message)
