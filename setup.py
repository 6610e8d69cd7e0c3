from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="deepretrieval",
    version="0.1.0",
    description="Train LLM query writers with reinforcement learning on search-engine recall",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": "code"},
    packages=find_packages("code"),
    include_package_data=True,
    package_data={"deepretrieval": ["trainer/config/*.yaml", "models/assets/**/*"]},
    install_requires=requirements,
    extras_require={
        "gpu": [
            line.strip()
            for line in (here / "requirements-gpu.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ],
    },
    entry_points={"console_scripts": ["deepretrieval=deepretrieval.cli:main"]},
)
