"""Everything else is in pyproject.toml. This only ships scalelab_lmeval.pth at the top of
site-packages (see scalelab/lmeval_plugin.py for why), which pyproject metadata cannot say.
Editable installs (`pip install -e`) do not take build_py's extra files: install.sh copies
the same file there."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "scalelab_lmeval.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildPyWithPth})
