"""Packages and a build hook (metadata and the other options live in setup.cfg).

The S3PRL downstream is the top-level ``downstream/`` folder, laid out as in S3PRL's own tree and readable
on its own; it installs as the subpackage ``s3prl_stimulus.downstream`` (``package_dir``), for regular and
editable installs alike.

The hook ships ``s3prl_stimulus_alias.pth`` at the root of the wheel, i.e. into site-packages, for both
``pip install .`` and ``pip install -e .``. Python runs it at start-up: it lets S3PRL's runner find
``-d emotion_stimulus`` in every process of the environment (see ``s3prl_stimulus/integration/registration.py``).
"""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = "s3prl_stimulus_alias.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # `pip install -e`: setuptools' editable_wheel packs the directory it configured as the
            # install's install_lib, not build_lib (whose modules stay in the source tree).
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib
        self.copy_file(os.path.join(HERE, PTH), os.path.join(target_dir, PTH), preserve_mode=False)


DOWNSTREAM_PACKAGES = ["s3prl_stimulus.downstream", "s3prl_stimulus.downstream.emotion_stimulus"]

setup(
    packages=find_packages(include=["s3prl_stimulus", "s3prl_stimulus.*"]) + DOWNSTREAM_PACKAGES,
    package_dir={"s3prl_stimulus.downstream": "downstream"},
    cmdclass={"build_py": build_py_with_pth},
)
