"""Which packages the wheel holds: seal_agent and its subpackages, and the repository's
policies/ as seal_agent/_policies (the folder stays at the top, where users edit it;
pyproject.toml's package finder only finds folders inside the package)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["seal_agent", "seal_agent.*"]), "seal_agent._policies"],
    package_dir={"seal_agent._policies": "policies"},
)
