"""The README's quick start, run as written on generated images, so the README cannot drift from the code.

Every command of the section marked ``<!-- quick-start: ... -->`` runs in a shell whose home folder holds
``~/photos`` (unlabeled colour images), ``~/photos_labeled`` and ``~/photos_test`` (two classes each), with
the tiny budget the README names (``--steps 2``, ``--epochs 1``, ``--draws 1``) added; the Python example
of ``<!-- quick-start-python -->`` runs with the same budgets added to its calls.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: the tiny budget added to each command, as the README says
BUDGET = {"pretrain": ["--steps", "2", "--precision", "fp32"], "eval": ["--epochs", "1", "--draws", "1"]}


def block_after(marker: str, language: str) -> str:
    """The first ```language block after the line holding ``marker`` in the README."""
    text = README.read_text()
    start = text.index(marker)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {language} block after {marker}"
    return match.group(1)


def write_images(folder: Path, count: int, seed: int, classes: int = 0) -> None:
    """``count`` 24 x 20 colour PNGs: bright blobs on dark for class 0, dark on bright for class 1 (in
    ``c0``/``c1`` subfolders when ``classes``), flat in ``folder`` otherwise."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        label = index % 2
        pixels = rng.integers(0, 90, (20, 24, 3)) + (150 if label else 0)
        pixels[5:15, 6:18] = 255 - pixels[5:15, 6:18]
        target = folder / f"c{label}" if classes else folder
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(target / f"{index:03d}.png")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home folder with the README's data and a link to the project's .venv."""
    home = tmp_path_factory.mktemp("home")
    write_images(home / "photos", 48, 0)
    write_images(home / "photos_labeled", 60, 1, classes=2)
    write_images(home / "photos_test", 20, 2, classes=2)
    (home / ".venv").symlink_to(Path(sys.executable).resolve().parent.parent if not (ROOT / ".venv").exists()
                                else ROOT / ".venv")
    return home


def test_quick_start_commands_run_as_written(home: Path) -> None:
    commands = [line for line in block_after("<!-- quick-start:", "bash").splitlines() if line.strip()]
    assert [shlex.split(c)[1] for c in commands] == ["pretrain", "eval", "export"]
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT / "src")}
    for command in commands:
        words = shlex.split(command)
        budget = " ".join(BUDGET.get(words[1], []))
        done = subprocess.run(["bash", "-c", f"{command} {budget} --no-progress" if budget else command],
                              cwd=home, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        if words[1] == "pretrain":
            assert done.stdout.count("auto:") == 2  # the choice, said in two lines
    assert (home / "runs/photos/config.yaml").is_file()
    assert list((home / "runs/photos").glob("compare_*.json"))
    assert {p.name for p in (home / "exported/photos").iterdir()} >= {"model.safetensors", "config.json",
                                                                      "README.md"}


def test_quick_start_python_runs_as_written(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import selfsight

    code = block_after("<!-- quick-start-python -->", "python")
    real_pretrain, real_evaluate = selfsight.pretrain, selfsight.evaluate
    monkeypatch.setattr(selfsight, "pretrain", lambda *a, **k: real_pretrain(
        *a, **{**k, "steps": 2, "precision": "fp32", "progress": False}))
    monkeypatch.setattr(selfsight, "evaluate", lambda *a, **k: real_evaluate(
        *a, **{**k, "epochs": 1, "draws": 1, "progress": False}))
    monkeypatch.setenv("HOME", str(home))
    (home / "py").mkdir()
    monkeypatch.chdir(home / "py")  # the example's relative paths (runs/..., exported/...) land here
    namespace: dict = {}
    exec(compile(code, "README.md (quick-start-python)", "exec"), namespace)
    assert namespace["result"]["rows"] and namespace["model"].num_features > 0
    assert (home / "py/exported/photos/model.safetensors").is_file()
