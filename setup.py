"""Build hook: the checkout's notebooks/ and configs/ ship inside the wheel as ``nrfm/resources/``.

Everything else about the package is declared in pyproject.toml. An editable install (``make``) reads the
notebooks and configs straight from the checkout (see ``nrfm.pipeline.workspace.resource_dir``).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RESOURCES = {"notebooks": "*.ipynb", "configs": "*.yaml"}


class BuildWithResources(build_py):
    def run(self):
        super().run()
        here = Path(__file__).resolve().parent
        for folder, pattern in RESOURCES.items():
            target = Path(self.build_lib) / "nrfm" / "resources" / folder
            target.mkdir(parents=True, exist_ok=True)
            for source in sorted((here / folder).glob(pattern)):
                shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildWithResources})
