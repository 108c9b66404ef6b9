"""Build hook (the rest of the packaging is in pyproject.toml): ship the checkout's conf/ inside the wheel as
crackclf/conf, so `crackclf-train` composes its configuration outside a checkout (crackclf.utils.config_dir)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConfig(build_py):
    """build_py, plus conf/ copied into the built package (an editable install reads the checkout's conf/)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "crackclf" / "conf"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(__file__).resolve().parent / "conf", target)


setup(cmdclass={"build_py": BuildWithConfig})
