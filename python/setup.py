"""Builds kvxfer's shared library with cargo and puts it inside the package, so that
`pip install ./python` gives a self-contained `import kvxfer`. KVX_LIB_PATH=/path/libkvxfer.so
uses an already built library instead of running cargo."""

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class BuildWithLibrary(build_py):
    def run(self):
        lib = os.environ.get("KVX_LIB_PATH")
        if lib is None:
            subprocess.run(
                ["cargo", "build", "--release", "--locked", "-p", "kvxfer", "--lib"],
                cwd=ROOT,
                check=True,
            )
            lib = str(ROOT / "target" / "release" / "libkvxfer.so")
        super().run()
        dest = Path(self.build_lib) / "kvxfer"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest / "libkvxfer.so")


setup(cmdclass={"build_py": BuildWithLibrary})
