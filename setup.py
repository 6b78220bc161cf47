"""Everything is in pyproject.toml except one file: moejax-lm-eval.pth, installed next to the packages (in editable
installs too), which lets `lm_eval --model moejax` find moejax (see moejax/evaluation/lm_eval_plugins.py)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "moejax-lm-eval.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        # An editable install builds into a throwaway folder and installs from `install_lib`; a wheel from build_lib.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(target, PTH))


setup(cmdclass={"build_py": BuildWithPth})
