"""The light install: the core (torch, numpy, ninja) runs the layer side; the experiment side names its extra."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import l2bn
from l2bn.cli import EXTRA_OF_PACKAGE

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_PACKAGES = ("sklearn", "matplotlib", "scipy", "tqdm", "librosa", "soundfile", "torchvision")
LAYER_SIDE = (
    "l2bn", "l2bn.layers", "l2bn.functional", "l2bn.kernels", "l2bn.kernels.algebra", "l2bn.kernels.cpp",
    "l2bn.kernels.dispatch", "l2bn.kernels.fused", "l2bn.kernels.overflow", "l2bn.kernels.reference",
    "l2bn.kernels.sync", "l2bn.kernels.triton_l2bn", "l2bn.convert", "l2bn.surgery", "l2bn.distributed",
    "l2bn.metrics", "l2bn.norms", "l2bn.norm_spread", "l2bn.bench", "l2bn.geometry", "l2bn.cli",
)

# A fresh interpreter in which the blocked packages are missing as if never installed.
BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv.pop(1).split(","))
    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Missing())
""")


def run_without(blocked: tuple[str, ...], code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", BLOCKER + code, ",".join(blocked)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_are_torch_numpy_ninja():
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip() for dep in pyproject()["dependencies"]}
    assert names == {"torch", "numpy", "ninja"}


def test_every_optional_package_names_an_existing_extra():
    extras = pyproject()["optional-dependencies"]
    for package, extra in EXTRA_OF_PACKAGE.items():
        assert extra in extras, (package, extra)
    assert {"experiments", "audio", "tensorboard", "timm", "onnx", "lightning", "cuda", "test", "slurm"} <= set(extras)


def test_layer_side_imports_without_the_experiment_packages(tmp_path):
    code = textwrap.dedent(f"""
        import importlib, sys, torch
        for name in {LAYER_SIDE!r}:
            importlib.import_module(name)
        import l2bn
        model = l2bn.convert_to_l2bn(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
        model(torch.randn(2, 3, 5, 5)).sum().backward()
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({EXPERIMENT_PACKAGES!r}))
        print("loaded:", loaded)
    """)
    result = run_without(EXPERIMENT_PACKAGES + ("timm", "tensorboard"), code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout


@pytest.mark.parametrize("argv", [
    ["compare", "--out", "runs"], ["train", "--out", "runs"], ["study", "list"], ["analyze", "best.pt"],
    ["geometry", "--out", "figures"],
])
def test_experiment_commands_without_their_extra_end_in_one_line(tmp_path, argv):
    result = run_without(EXPERIMENT_PACKAGES, f"from l2bn.cli import main; raise SystemExit(main({argv!r}))", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert 'pip install "l2bn[experiments]"' in result.stderr
    assert not any(tmp_path.iterdir())


def test_a_missing_experiment_package_found_mid_run_is_one_line_too(tmp_path):
    argv = ["train", "--dataset", "digits", "--model", "resnet20", "--epochs", "1", "--out", "runs"]
    result = run_without(("sklearn",), f"from l2bn.cli import main; raise SystemExit(main({argv!r}))", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1:] == [
        'error: this command needs sklearn, which is not installed: pip install "l2bn[experiments]"']
    assert "Traceback" not in result.stderr


def test_the_l2bn_script_enters_as_python_m_does():
    """Both through ``l2bn.cli.run``, which ends an interrupted command by SIGINT (test_cli_runner)."""
    from l2bn.cli import run

    assert pyproject()["scripts"] == {"l2bn": "l2bn.cli:run"} and callable(run)


def test_l2bn_exposes_its_version():
    assert l2bn.__version__ == pyproject()["version"]


def readme_extras(marker: str) -> set[str]:
    readme = (ROOT / "README.md").read_text()
    command = readme.split(f"<!-- {marker} -->", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    return set(command.split('pip install -e ".[', 1)[1].split("]", 1)[0].split(","))


def test_readme_commands_install_what_each_needs():
    assert readme_extras("main-command") == {"experiments"}
    assert readme_extras("test-command") == set(pyproject()["optional-dependencies"]) - {"cuda"}
