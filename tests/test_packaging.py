"""Packaging: the base install (torch and triton) imports both packages and runs ``tgr --help``,
only the names and commands that need the ``model`` extra ask for it, there is one version, and a
wheel built from this checkout holds what the package needs.

The base install is simulated without uninstalling anything: a subprocess whose ``sys.modules``
maps every module of the model extra to ``None``, so importing one raises ``ModuleNotFoundError``
as it would where it is not installed.
"""
import ast
import inspect
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import tgr
import tgr_kernels
from tgr._version import __version__

REPO = Path(__file__).resolve().parents[1]
MODEL_EXTRA = sorted(tgr.MODEL_EXTRA_MODULES)


def run_python(code: str, blocked=(), timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter on this checkout, with the modules ``blocked`` absent."""
    prelude = f"import sys\nfor _name in {list(blocked)!r}:\n    sys.modules[_name] = None\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # as the tests run the kernels; importing is what is checked
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def third_party_modules_after(imports: str, blocked=()) -> set:
    """Top-level non-stdlib modules that ``imports`` (Python statements) bring in, in a fresh interpreter."""
    code = (f"import json\nbefore = set(sys.modules)\n{imports}\n"
            "new = {m.partition('.')[0] for m in set(sys.modules) - before}\n"
            "print(json.dumps(sorted(new - set(sys.stdlib_module_names))))")
    proc = run_python(code, blocked)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_model_extra_is_blocked_as_if_not_installed():
    proc = run_python("import transformers", MODEL_EXTRA)
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def test_import_without_the_model_extra():
    proc = run_python("import tgr_kernels, tgr\nprint(tgr.__version__, tgr_kernels.__version__)", MODEL_EXTRA)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [__version__, __version__]


def test_tgr_help_without_the_model_extra():
    # `python -m tgr --help`, which is what the `tgr` console script runs (tgr.cli:main).
    code = "import runpy\nsys.argv = ['tgr', '--help']\nrunpy.run_module('tgr', run_name='__main__')"
    proc = run_python(code, MODEL_EXTRA)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    for command in ("train", "eval", "generate", "demo"):
        assert command in proc.stdout


def test_a_name_that_needs_the_model_extra_says_which_extra():
    code = ("import tgr\ntry:\n    tgr.TGRLlamaModel\nexcept ImportError as err:\n    print(err)\n"
            "else:\n    print('imported')")
    proc = run_python(code, MODEL_EXTRA)
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert "tgr.TGRLlamaModel" in message and "pip install 'tgr[model]'" in message


def test_import_tgr_and_its_command_line_import_no_model_extra():
    # Even where the extra is installed: `import tgr` and `tgr --help` stay light.
    assert third_party_modules_after("import tgr") == {"tgr"}
    assert not third_party_modules_after("import tgr.cli") & set(MODEL_EXTRA)


def test_tgr_kernels_imports_only_torch_triton_and_the_standard_library():
    # What torch and triton bring in themselves (numpy, say, where torch imports it) is theirs.
    theirs = third_party_modules_after("import torch, triton, triton.language")
    ours = third_party_modules_after("import tgr_kernels")
    assert ours - theirs <= {"tgr_kernels", "tgr"}, ours - theirs


def test_lazy_names_all_and_type_checking_imports_agree():
    lazy = dict(tgr._LAZY_NAMES)
    assert sorted(tgr.__all__) == sorted([*lazy, "__version__"])
    tree = ast.parse((REPO / "tgr" / "__init__.py").read_text(encoding="utf-8"))
    (type_checking,) = [node for node in tree.body if isinstance(node, ast.If)
                        and getattr(node.test, "id", None) == "TYPE_CHECKING"]
    statically = {alias.name: stmt.module for stmt in type_checking.body for alias in stmt.names}
    assert statically == lazy
    for name, module in lazy.items():
        value = getattr(tgr, name)
        assert value.__module__ == f"tgr.{module}"
        assert name in dir(tgr)
    with pytest.raises(AttributeError, match="no_such_name"):
        tgr.no_such_name  # noqa: B018


def public_callables(module):
    """The functions of ``module.__all__``, and the constructor and forward of its classes."""
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            for method in ("__init__", "forward"):
                if method in vars(obj):
                    yield f"{name}.{method}", vars(obj)[method]


def test_the_kernels_public_api_is_annotated():
    checked = 0
    for name, fn in public_callables(tgr_kernels):
        signature = inspect.signature(inspect.unwrap(fn))
        missing = [p.name for p in signature.parameters.values()
                   if p.name != "self" and p.annotation is inspect.Parameter.empty]
        assert not missing, f"{name}: parameters without a type hint: {missing}"
        if not name.endswith(".__init__"):
            assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return type hint"
        checked += 1
    assert checked >= 8


def test_one_version_source():
    assert tgr.__version__ == tgr_kernels.__version__ == __version__
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'version = { attr = "tgr._version.__version__" }' in pyproject
    for path in ("setup.py", "tgr/__init__.py", "tgr_kernels/__init__.py"):
        file = REPO / path
        assert not file.exists() or f'"{__version__}"' not in file.read_text(encoding="utf-8"), path


def test_pyproject_metadata():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {req.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for req in project["dependencies"]}
    assert names == {"torch", "triton"}
    (transformers,) = [req for req in project["optional-dependencies"]["model"] if req.startswith("transformers")]
    # from_pretrained(dtype=...) arrived in 4.56; the tests ran at the pinned floor (pyproject.toml).
    assert Version(transformers.partition(">=")[2]) >= Version("4.56")
    assert project["scripts"] == {"tgr": "tgr.cli:main"}
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")
    for package in ("tgr", "tgr_kernels"):
        assert (REPO / package / "py.typed").is_file()


def test_wheel_from_this_checkout_holds_the_packages_data_and_metadata(tmp_path):
    # Offline, with the build backend already installed: what `pip install .` builds.
    pytest.importorskip("setuptools")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    src = tmp_path / "src"
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("tgr-*.whl")
    assert wheel.name.startswith(f"tgr-{__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"tgr-{__version__}.dist-info"
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
    for required in ("tgr/__init__.py", "tgr/py.typed", "tgr_kernels/__init__.py", "tgr_kernels/py.typed",
                     "tgr/resources/wikiqa_sample.jsonl", "tgr/resources/demo-llama/model.safetensors",
                     f"{dist_info}/licenses/LICENSE"):
        assert required in names, required
    assert not any(name.startswith(("tests/", "benchmarks/", "scripts/")) for name in names)
    base = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(line.split()[1].split(">")[0].split("<")[0] for line in base) == ["torch", "triton"]
    assert "Provides-Extra: model" in metadata and "License-Expression: Apache-2.0" in metadata
    assert "tgr = tgr.cli:main" in entry_points
