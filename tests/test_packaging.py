"""Packaging: `kernels/` installs as `openr1_jax_kernels` and `configs/` as `openr1_jax._configs`, editable and wheel.

pytest puts the repository root on sys.path, which a user's install does not, so every check of what an install
resolves runs in a subprocess whose working directory is outside the repository.
"""

import configparser
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Everything setup.py and pyproject.toml read to build the wheel.
_BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE")
_BUILD_DIRS = ("openr1_jax", "kernels", "configs")

# Prints, as JSON, where the installed packages and the configs resources come from, and the YAML files' texts.
_PROBE = """
import importlib.resources, json, openr1_jax, openr1_jax_kernels.gmm

def walk(node, prefix=""):
    for child in node.iterdir():
        if child.is_dir():
            yield from walk(child, prefix + child.name + "/")
        elif child.name.endswith(".yaml"):
            yield prefix + child.name, child.read_text()

root = importlib.resources.files("openr1_jax._configs")
print(json.dumps({
    "openr1_jax": openr1_jax.__file__,
    "openr1_jax_kernels": openr1_jax_kernels.gmm.__file__,
    "configs": str(root),
    "yaml": dict(walk(root)),
}))
"""


def _python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _pip(*args: str, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"pip {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


def _yaml_texts(configs: Path) -> dict[str, str]:
    return {p.relative_to(configs).as_posix(): p.read_text() for p in sorted(configs.rglob("*.yaml"))}


def _resolved(paths) -> set[Path]:
    return {Path(p).resolve() for p in paths}


def test_kernels_import_as_openr1_jax_kernels():
    import openr1_jax_kernels
    import openr1_jax_kernels.gmm

    assert REPO / "kernels" in _resolved(openr1_jax_kernels.__path__)
    assert Path(openr1_jax_kernels.gmm.__file__).resolve() == REPO / "kernels" / "gmm" / "__init__.py"


@pytest.mark.parametrize("where", ["outside", "repo_root"])
def test_top_level_kernels_is_not_ours(tmp_path, where):
    # `kernels` is a PyPI distribution that transformers imports: our folder must never answer to that name, not
    # even from the repository root, where `python -m pytest` and `python -c` put the working directory first on
    # sys.path (a regular package there once shadowed it and broke `import transformers`).
    probe = """
import json, openr1_jax_kernels
try:
    import kernels
except ModuleNotFoundError:
    found = []
else:
    found = [getattr(kernels, "__file__", None) or "", *getattr(kernels, "__path__", [])]
print(json.dumps({"ours": list(openr1_jax_kernels.__path__), "kernels": found}))
"""
    out = json.loads(_python(probe, cwd=REPO if where == "repo_root" else tmp_path))
    ours = REPO / "kernels"
    assert ours in _resolved(out["ours"])
    for location in out["kernels"]:
        assert ours not in Path(location).resolve().parents and Path(location).resolve() != ours, location


def test_transformers_imports_its_models_from_the_repo_root():
    # What CI's parity tests do first: transformers' model modules import its hub-kernels integration, which imports
    # the `kernels` distribution when one is installed.
    _python("import transformers; transformers.DeepseekV3ForCausalLM; transformers.Qwen2ForCausalLM", cwd=REPO)


def test_configs_package_resolves_to_repo_configs(tmp_path):
    root = importlib.resources.files("openr1_jax._configs")
    assert Path(str(root)).resolve() == REPO / "configs"
    # Same from outside the repository, where only the editable install can find it.
    out = json.loads(_python(_PROBE, cwd=tmp_path))
    assert Path(out["configs"]).resolve() == REPO / "configs"
    assert out["yaml"] == _yaml_texts(REPO / "configs")


@pytest.mark.slow
def test_wheel_contents_and_install(tmp_path):
    # Build from a clean copy so stale build/ or *.egg-info folders in the checkout cannot leak into the wheel.
    src = tmp_path / "src"
    src.mkdir()
    for name in _BUILD_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in _BUILD_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    # Probe presets (in the copy only) so the YAML checks bite even before the repository has any.
    (src / "configs" / "packaging_probe.yaml").write_text("top: 1\n")
    (src / "configs" / "models").mkdir(exist_ok=True)
    (src / "configs" / "models" / "packaging_probe.yaml").write_text("model: 2\n")

    dist = tmp_path / "dist"
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src), cwd=tmp_path)
    (wheel,) = dist.glob("openr1_jax-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        top_level = set(zf.read(f"{dist_info}/top_level.txt").decode().split())

    for required in ("openr1_jax/__init__.py", "openr1_jax_kernels/gmm/__init__.py", "openr1_jax/_configs/__init__.py"):
        assert required in names
    assert "openr1_jax_kernels/__init__.py" not in names, "a namespace package, so it never shadows `kernels`"
    kernel_sources = {
        "openr1_jax_kernels/" + p.relative_to(src / "kernels").as_posix() for p in src.glob("kernels/**/*.py")
    }
    assert kernel_sources <= names
    yaml = _yaml_texts(src / "configs")
    assert {n for n in names if n.endswith(".yaml")} == {"openr1_jax/_configs/" + rel for rel in yaml}
    assert not [n for n in names if n.split("/")[0] in ("kernels", "configs")]
    for folder in ("tokenizer", "base"):
        here = src / "openr1_jax/data/embedded" / folder
        shipped = {f"openr1_jax/data/embedded/{folder}/{p.name}" for p in here.iterdir()}
        assert shipped <= names, f"the embedded default's {folder} must ship in the wheel"
    assert top_level == {"openr1_jax", "openr1_jax_kernels"}

    scripts = configparser.ConfigParser()
    scripts.read_string(entry_points)
    assert scripts["console_scripts"]["openr1-jax"].strip() == "openr1_jax.cli:main"

    site = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = json.loads(_python(_PROBE, cwd=elsewhere, pythonpath=site))
    site = site.resolve()
    assert Path(out["openr1_jax"]).resolve() == site / "openr1_jax" / "__init__.py"
    # A namespace package also gathers the checkout's editable portion, but the wheel's comes first.
    assert Path(out["openr1_jax_kernels"]).resolve() == site / "openr1_jax_kernels" / "gmm" / "__init__.py"
    assert Path(out["configs"]).resolve() == site / "openr1_jax" / "_configs"
    assert out["yaml"] == yaml
