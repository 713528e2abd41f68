"""The built wheel is the whole product: installed into a fresh virtual environment, away from this
checkout, it lists the bundled recipes and trains from the quickstart recipe with its shipped data.

The wheel goes in with ``--no-deps`` and the fresh environment sees this environment's packages
(a ``.pth`` line, after its own site-packages) for the dependencies: installing them again would
download about 300 MB each run, and `.ci/run` already installs them from the same pyproject.toml.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from macft.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow


def run(*args, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict, set[str]]:
    """A fresh venv with the wheel built from a copy of the checkout's tracked files installed in it;
    also the tracked files under recipes/ (relative to it)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, tracked.split("\0")):
        if name.split("/")[0] in ("macft", "recipes", "pyproject.toml", "README.md"):
            target = source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (PROJECT_ROOT / name).is_symlink():
                target.symlink_to(os.readlink(PROJECT_ROOT / name))
            else:
                shutil.copy2(PROJECT_ROOT / name, target)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MACFT_HOME"] = str(root / "home")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", root / "dist", source, cwd=root, env=env)
    wheel = next((root / "dist").glob("macft-*.whl"))
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root, env=env)  # this pip installs into it: seconds, not half a minute
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel, cwd=root, env=env)
    own = run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=root, env=env)
    # A plain path line: this environment's .pth files (e.g. an editable macft) are not processed.
    Path(own.stdout.strip(), "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    recipes = {name.removeprefix("recipes/") for name in tracked.split("\0") if name.startswith("recipes/")}
    return venv, env, recipes


def test_wheel_ships_the_recipes_and_their_data(installed, tmp_path):
    venv, env, recipes = installed
    where = run(venv / "bin" / "python", "-c", "import macft.paths as p; print(p.RECIPES_DIR)", cwd=tmp_path, env=env).stdout.strip()
    assert where.startswith(str(venv)), where
    listed = json.loads(run(venv / "bin" / "macft", "recipes", "list", "--json", cwd=tmp_path, env=env).stdout)
    assert {row["name"] for row in listed} == {name.removesuffix(".yaml") for name in recipes if "/" not in name}
    # pip byte-compiles every .py it installs (a recipe's reward module too): that cache is not shipped.
    shipped = {p.relative_to(where).as_posix() for p in Path(where).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped == recipes


def test_wheel_trains_two_steps_from_the_bundled_recipe(installed, tiny_model_dir, tmp_path):
    """`macft lora quickstart` on a tiny random model: the recipe's data resolves inside the installed package."""
    venv, env, _ = installed
    run(
        venv / "bin" / "macft", "lora", "quickstart", "--model", tiny_model_dir, "--iters", 2, "--batch-size", 2,
        "--out-dir", tmp_path / "runs", "--name", "wheel", "--set", "train.eval_every=2", "--set", "demo.count=1",
        "--set", "demo.max_tokens=2", cwd=tmp_path, env=env,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "wheel"
    for name in ("adapters.safetensors", "summary.json", "loss.png"):
        assert (run_dir / name).is_file(), name
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["data"]["train"].startswith(str(venv)) and recipe["data"]["train"].endswith("data/quickstart")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
