"""The package as it ships: the wheel carries every Hydra config (conf/teacher, a symlink to
conf/student in the checkout, as plain files), and an installed copy of that wheel runs
`python -m distill_cli` from any directory on its own configs (pkg://distill_cli.conf), never
on the checkout's. Offline: no index, no build isolation (setuptools comes from this venv)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "distill_cli" / "conf"
WHEEL_CONF = "distill_cli/conf"


def source_yamls() -> set[str]:
    """Every YAML of the source tree's conf/, named as in the wheel; symlinked groups followed."""
    return {f"{WHEEL_CONF}/{(Path(root) / name).relative_to(CONF).as_posix()}"
            for root, _, files in os.walk(CONF, followlinks=True)
            for name in files if name.endswith(".yaml")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps` of a copy of the working tree (building in place would leave build/
    and *.egg-info in the checkout); the copy keeps symlinks as symlinks, as a git checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "distill_cli", src / "distill_cli", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheelhouse")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                           "--no-build-isolation", str(src), "-w", str(out)],
                          capture_output=True, text=True, cwd=src, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = out.glob("distill_cli-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """(site, cwd): the wheel installed into its own `site` dir, put on PYTHONPATH ahead of this
    venv's editable install (a `venv --system-site-packages` made from this venv's interpreter
    would see the BASE interpreter's packages, not torch and hydra from this venv); `cwd` is a
    directory outside the checkout."""
    root = tmp_path_factory.mktemp("installed")
    site, cwd = root / "site", root / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--target", str(site), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return site, cwd


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled",
           "DISTILL_OUTPUTS": str(cwd / "outputs"), "DISTILL_MULTIRUN": str(cwd / "multirun"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_wheel_carries_every_config(wheel):
    zf = zipfile.ZipFile(wheel)
    infos = {i.filename: i for i in zf.infolist()}
    yamls = {n for n in infos if n.endswith(".yaml")}
    assert {f"{WHEEL_CONF}/config.yaml", f"{WHEEL_CONF}/search.yaml"} <= yamls
    assert f"{WHEEL_CONF}/__init__.py" in infos  # Hydra's pkg:// source needs it
    recipes, teachers = options("recipe"), options("teacher")
    assert "quickstart" in recipes and "resnet8" in teachers
    assert {f"{WHEEL_CONF}/recipe/{r}.yaml" for r in recipes} <= yamls
    assert {f"{WHEEL_CONF}/teacher/{t}.yaml" for t in teachers} <= yamls
    assert yamls == source_yamls()  # nothing missing, nothing extra
    # the teacher group is real files with the student zoo's content, not symlink entries
    for t in teachers:
        info = infos[f"{WHEEL_CONF}/teacher/{t}.yaml"]
        assert not stat.S_ISLNK(info.external_attr >> 16) and info.file_size > 0
        assert zf.read(info) == zf.read(f"{WHEEL_CONF}/student/{t}.yaml")


def test_installed_wheel_runs_from_anywhere_on_its_own_configs(installed):
    site, cwd = installed
    where = run_installed(site, cwd, "-c", "import importlib.resources as r, distill_cli.cli; "
                          "print(distill_cli.cli.__file__); print(r.files('distill_cli.conf'))")
    assert where.returncode == 0, where.stderr[-3000:]
    cli_file, conf_dir = where.stdout.split()
    assert Path(cli_file) == site / "distill_cli" / "cli.py"
    assert Path(conf_dir) == site / "distill_cli" / "conf"

    helped = run_installed(site, cwd, "-m", "distill_cli", "--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    lines = {ln.split(":", 1)[0]: ln.split(":", 1)[1] for ln in helped.stdout.splitlines()
             if ln.startswith(("recipe: ", "teacher: "))}
    assert lines["recipe"].strip().split(", ") == options("recipe")
    assert lines["teacher"].strip().split(", ") == options("teacher")

    # -v: the interpreter names every module file it loads; none may come from the checkout
    job = run_installed(site, cwd, "-v", "-m", "distill_cli", "recipe=quickstart", "--cfg", "job")
    assert job.returncode == 0, job.stderr[-3000:]
    assert f"{site}/distill_cli/conf/__init__.py" in job.stderr
    assert f"{REPO}/distill_cli/" not in job.stderr
    printed = OmegaConf.create(job.stdout)
    recipe = OmegaConf.load(CONF / "recipe" / "quickstart.yaml")
    recipe.pop("defaults", None)
    assert len(recipe) > 0
    # every value the recipe sets is in the composed config (merging it again changes nothing)
    assert (OmegaConf.to_container(OmegaConf.merge(printed, recipe))
            == OmegaConf.to_container(printed))
    assert printed.dataset.limit_train == 6000 and printed.teacher.arch == "cnn"
    assert sorted(p.name for p in cwd.iterdir()) == []  # --cfg job writes no run dir


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_benchmark_scripts_import_and_parse_their_arguments(script):
    """`make bench` must not break silently when the package's modules move (a moved module
    once left bench_speed.py failing at import)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
