"""A non-editable install works like a library: the wheel carries every package and the configs, and
train.py run outside the clone trains the quickstart from the installed copy."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import TINY_RUN

REPO = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_trains_the_quickstart_outside_the_clone(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*build, "-w", str(wheels)], check=True, capture_output=True, cwd=tmp_path, timeout=300)
    shutil.rmtree(REPO / "build", ignore_errors=True)  # setuptools' staging folder, not ours to keep
    (wheel,) = wheels.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "configs/experiment/titok_quickstart.yaml" in names and "core/hub.py" in names
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel), "-q"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(REPO / "train.py", elsewhere / "train.py")  # the entry point alone, away from the clone
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    check = "import training, configs; print(training.__file__, configs.__file__)"
    located = subprocess.run(
        [sys.executable, "-c", check], env=env, cwd=elsewhere, capture_output=True, text=True
    )
    assert located.stdout.count(str(site)) == 2, located.stdout + located.stderr  # the installed copies
    run = [sys.executable, "train.py", *TINY_RUN, "trainer.max_steps=2", f"paths.run_dir={elsewhere / 'run'}"]
    result = subprocess.run(run, env=env, cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((elsewhere / "run" / "metrics.json").read_text())["steps"] == 2
