"""`pip install .` anywhere else gives a working seal-agent with its policies.

The repository is built into a wheel, the wheel installed (without its
dependencies) into a fresh virtual environment that reaches the running one's
packages through a .pth file, and the installed `seal-agent` run from a folder
outside the repository, where no policies/ lies next to the config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import ROOT

SOURCES = ("pyproject.toml", "setup.py", "README.md", "seal_agent", "policies")


def run(*args: str | Path, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_a_wheel_installed_elsewhere_carries_the_policies(tmp_path):
    # A copy keeps the build's leftovers (build/, *.egg-info) out of the repository.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                "-w", tmp_path / "dist", src, cwd=tmp_path, env=env)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("seal_agent-*.whl")
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("seal_agent/_policies/")}
    policies = {p.name for p in (ROOT / "policies").iterdir() if p.suffix in (".toml", ".md")}
    assert policies and shipped == policies

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [site] = (venv / "lib").glob("python*/site-packages")
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    # --ignore-installed: the running environment's own seal-agent is neither reused nor touched.
    installed = run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                    wheel, cwd=tmp_path, env=env)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    seal = venv / "bin" / "seal-agent"
    assert "learn" in run(seal, "--help", cwd=elsewhere, env=env).stdout
    listed = run(seal, "--state-dir", elsewhere / "state", "policy", "list", "--json", cwd=elsewhere, env=env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert '"version": 0, "active": true' in listed.stdout
    # An unknown policy is refused naming the ones the package has: every policy of the repository.
    unknown = run(seal, "--state-dir", elsewhere / "state", "--set", "policy.active='nope'", "policy", "list",
                  cwd=elsewhere, env=env)
    assert unknown.returncode == 1
    assert str(site / "seal_agent" / "_policies" / "nope.toml") in unknown.stderr, unknown.stderr
    names = ", ".join(sorted(p.stem for p in (ROOT / "policies").glob("*.toml")))
    assert f"(available: {names})" in unknown.stderr, unknown.stderr
