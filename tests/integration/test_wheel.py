"""The built wheel works outside a checkout: the console script finds the configuration shipped in the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_crackclf_train_help_runs_from_an_installed_wheel_outside_the_checkout(tmp_path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy of the tracked files: nothing is written into the checkout (setuptools builds in ./build).
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True,
                   cwd=tmp_path, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("crackclf-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300,
                   capture_output=True)
    # The installed copy, not the checkout's editable install, answers (PYTHONPATH comes first on sys.path).
    env = {**os.environ, "PYTHONPATH": str(target)}
    which = subprocess.run([sys.executable, "-c", "import crackclf.utils as u; print(u.__file__, u.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True, timeout=60).stdout
    assert which.split() == [str(target / "crackclf" / "utils.py"), str(target / "crackclf" / "conf")]
    result = subprocess.run([str(target / "bin" / "crackclf-train"), "--help"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "experiment: adapt, backbone_bench, cpu_fast, cpu_scratch, gpu_transfer" in result.stdout
    assert "backbone: convnext_atto," in result.stdout and "model:\n  _target_: crackclf.models.module" in result.stdout
