"""Installs ahcq and the mmdet plugin package ``projects`` (editable: ``pip install -e .``)."""
from setuptools import find_packages, setup

setup(
    name="ahcq",
    version="0.1.0",
    description="Post-training quantization for SAM and SAM2: AHCQ-SAM, AHCPTQ, PTQ4SAM, SAQ-SAM, QDrop",
    python_requires=">=3.10",
    packages=find_packages(include=["ahcq", "ahcq.*", "projects", "projects.*"]),
    package_data={"ahcq.quantization": ["native_kernels.c"]},
    install_requires=[
        "torch>=2.1",
        "numpy",
        "scipy",
        "scikit-learn",
        "pyyaml",
        "tqdm",
        "pycocotools",
    ],
    entry_points={"console_scripts": ["ahcq-test-quant=ahcq.solver.test_quant:main"]},
)
