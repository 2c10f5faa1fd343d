"""The layers: ``harness/config`` is the ground floor. It imports nothing of the harness but
``harness.errors`` -- at module level or inside a function -- so every part can import its section
from it without a cycle. Two checks: the import-linter contract of pyproject.toml, and a walk over
every import statement of ``harness/config/*.py`` (function bodies included)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

ALLOWED = ("harness.config", "harness.errors")


def _harness_imports(path) -> list[tuple[int, str]]:
    """``(line, module)`` of every absolute ``harness`` import in the file, wherever it stands;
    a relative import counts as one of its own package (``harness.config``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "harness"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "harness":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "harness" else []
            out += [(node.lineno, n) for n in names or [node.module]]
        elif isinstance(node, ast.ImportFrom) and node.level > 1:
            out.append((node.lineno, "." * node.level + (node.module or "")))  # above harness.config
    return out


def test_config_imports_only_itself_and_errors_anywhere_in_its_files():
    files = sorted((REPO / "harness" / "config").glob("*.py"))
    assert [f.name for f in files] == ["__init__.py", "compose.py", "schema.py", "validate.py"]
    bad = [
        f"harness/config/{f.name}:{line}: {module}"
        for f in files
        for line, module in _harness_imports(f)
        if not any(module == a or module.startswith(a + ".") for a in ALLOWED)
    ]
    assert bad == []


def test_the_import_linter_contract_forbids_every_other_module_and_passes():
    tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = cfg["contracts"]
    modules = {
        p.stem for p in (REPO / "harness").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    others = sorted(f"harness.{m}" for m in modules - {"__init__", "config", "errors"})
    assert (cfg["root_package"], contract["type"], contract["source_modules"]) == (
        "harness",
        "forbidden",
        ["harness.config"],
    )
    assert contract["forbidden_modules"] == others  # a new module is forbidden too
    # in its own process: lint_imports configures logging with dictConfig, which disables every logger
    # that exists (the harness's own: later in-process runs would write no train.log lines)
    cmd = [str(Path(sys.executable).parent / "lint-imports"), "--config", str(REPO / "pyproject.toml")]
    proc = subprocess.run([*cmd, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-2000:] + proc.stderr


def test_validating_a_config_loads_no_part(tmp_path):
    """What the walk and the contract say, at run time: a config with sources, a document mask and
    tensor parallelism validates with only ``harness.config`` and ``harness.errors`` loaded."""
    code = (
        "import sys\n"
        "from harness.config import FSDPConfig, JobConfig, validate\n"
        "cfg = JobConfig()\n"
        "cfg.data.sources, cfg.data.document_mask = {'a': {'path': 'x'}, 'b': {'path': 'y'}}, True\n"
        "cfg.parallel, cfg.train.gradient_accumulation_steps = FSDPConfig(name='fsdp', tp=2), None\n"
        "print(validate(cfg, 4))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'harness'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "BatchSizes(global_batch_size=16, micro_batch_size=4, gradient_accumulation_steps=2, world_size=2)",
        "['harness', 'harness.config', 'harness.config.compose', 'harness.config.schema', "
        "'harness.config.validate', 'harness.errors']",
    ]
