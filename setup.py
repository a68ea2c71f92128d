"""Install zo2_deepspeed: `pip install -e .` (CPU) — torch is pinned to a range that 2.13.0 satisfies,
so an installed CPU wheel is kept and no CUDA build is pulled in.

Both `pip install .` and `pip install -e .` put zo2_deepspeed_autopatch.pth into site-packages: it loads
the config switch (zo2_deepspeed_autopatch.py) at interpreter start, see docs/config-switch.md."""
import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

SWITCH_PTH = "zo2_deepspeed_autopatch.pth"


class build_py_with_pth(build_py):
    """Also ship the .pth file at the top of site-packages, for wheels and editable installs alike."""

    def run(self) -> None:
        super().run()
        # An editable wheel takes its top-level files from the install directory it set up, a normal one from
        # build_lib; either way the .pth lands next to the packages in site-packages.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(str(Path(__file__).parent / SWITCH_PTH), os.path.join(target, SWITCH_PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return super().get_outputs(include_bytecode) + ([] if self.editable_mode else
                                                        [os.path.join(self.build_lib, SWITCH_PTH)])


version = {}
exec((Path(__file__).parent / "zo2_deepspeed" / "version.py").read_text(), version)

setup(
    name="zo2_deepspeed",
    version=version["__version__"],
    description="Zeroth-order (ZO2) fine-tuning of LLMs larger than the accelerator, inside DeepSpeed ZeRO-3/Infinity",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zo2_deepspeed", "zo2_deepspeed.*"]),
    py_modules=["zo2_deepspeed_autopatch"],
    cmdclass={"build_py": build_py_with_pth},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.14",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "datasets>=3.0",
        "pydantic>=2.7",  # use_attribute_docstrings: the config reference reads the fields' docstrings
        "safetensors>=0.4",
        "xxhash>=2.0",  # checkpoint checksums (xxh3-128)
        "tqdm>=4.60",
        "numpy",
    ],
    extras_require={
        "train": ["matplotlib>=3.7", "tensorboard"],
        # Triton runs the noise kernels on a GPU (CUDA builds of torch bring it); on a CPU the tests run the
        # same kernels in Triton's interpreter
        # pinned to the releases CI passes with: pytest's logging plugin and pytest-randomly's ordering are part of
        # what the suite is checked against (launch/test.sh reruns the default suite in a random order)
        "test": ["pytest>=9.2,<10", "pytest-randomly==5.1.0",
                 "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        "ecosystem": ["peft>=0.12", "accelerate>=1.0"],
        # the documentation site (mkdocs.yml): pinned, so that `mkdocs build --strict` judges the pages the same way
        # everywhere
        "docs": ["mkdocs==1.6.1", "mkdocs-material==9.8.1", "pymdown-extensions==13.1.2"],
    },
    entry_points={"console_scripts": ["zo2-export=zo2_deepspeed.export:main"]},
)
