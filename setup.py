"""Install the TGR kernels library (`tgr_kernels`) and the model package (`tgr`)."""
from setuptools import find_packages, setup

setup(
    name="tgr",
    version="0.1.0",
    description="Fast, differentiable Triton kernels for Temperature-Guided Reasoning, "
    "and a TGR Llama model built on them",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tgr_kernels", "tgr_kernels.*", "tgr", "tgr.*"]),
    package_data={"tgr": ["resources/*", "resources/demo-llama/*"]},
    # torch 2.11 + triton 3.6 on the GPU machine, torch 2.13 (CPU) + triton 3.7.1 here.
    install_requires=[
        "torch>=2.4,<2.15",
        "triton>=3.1,<3.8",
        "numpy",
        "tqdm",
    ],
    entry_points={"console_scripts": ["tgr = tgr.cli:main"]},
    extras_require={
        "model": [
            "transformers>=4.46",
            "bitsandbytes>=0.45",
            "datasets>=3.0",
            "accelerate>=1.0",
            "safetensors",
            "tokenizers",
            "peft",
        ],
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "matplotlib",
        ],
    },
)
