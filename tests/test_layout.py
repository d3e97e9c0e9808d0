"""The house rules of the package layout, checked on the code itself.

* the trainer's packages (optim, models, data, train) import neither Ray nor MLflow, checked in a
  fresh interpreter on ``sys.modules`` after importing everything a trial runs;
* validating a trial or study config does not load torch (the typed optimizer config is pydantic);
* ``samstudy.analysis`` never imports ``samstudy.study``, not even lazily;
* the module-level imports of ``samstudy`` form no circle;
* no module is longer than about 400 lines without saying why at its top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "samstudy"
MAX_LINES = 400
LONG_REASON = "Long because"


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_trainer_packages_import_neither_ray_nor_mlflow() -> None:
    out = _run(
        "import sys\n"
        "import samstudy.optim, samstudy.models, samstudy.data, samstudy.train\n"
        "from samstudy.optim import create_optimizer, SAM\n"
        "from samstudy.train import run_trial\n"
        "import samstudy.train.cli, samstudy.train.loop, samstudy.train.sharpness\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(loaded & {'ray', 'mlflow'}), 'torch' in loaded)\n"
    )
    # torch must be there: otherwise the check imported less than a trial runs
    assert out == "[] True", out


def test_a_real_trial_imports_neither_ray_nor_mlflow(tmp_path: Path) -> None:
    out = _run(
        "import sys\n"
        "from samstudy.train import run_trial\n"
        "final = run_trial({'epochs': 1, 'max_steps_per_epoch': 2, 'device': 'cpu',\n"
        "                   'optimizer': {'name': 'same', 'scales': [1, 0, 0, 0]}},\n"
        "                  lambda metrics, checkpoint: None)\n"
        "print(final['status'], sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))\n"
    )
    assert out == "completed []", out


def test_validating_configs_does_not_load_torch() -> None:
    out = _run(
        "import sys\n"
        "from samstudy.train.config import TrialConfig\n"
        "from samstudy.optim import parse_optimizer_config\n"
        "TrialConfig.model_validate({'optimizer': {'name': 'saner', 'alpha': 0.5, 'rho': 1e-2}})\n"
        "parse_optimizer_config({'name': 'table', 'coefficients': [[1, 0]] * 4})\n"
        "print('torch' in sys.modules)\n"
    )
    assert out == "False", out


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str, top_level_only: bool, modules: set[str]) -> set[str]:
    """The samstudy modules ``path`` imports (at import time only, or anywhere).

    ``from package import name`` is an import of the submodule ``package.name`` when there is
    one, else of ``package`` itself (a name its ``__init__`` defines): a submodule that takes a
    name from its own package's ``__init__`` depends on it, the classic partial-import circle.
    """
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:  # what runs at import: not function bodies, not `if TYPE_CHECKING:` blocks
        node = todo.pop()
        nodes.append(node)
        lazy = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        guarded = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        if not (top_level_only and (lazy or guarded)):
            todo.extend(ast.iter_child_nodes(node))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules and name != module}


def test_analysis_never_imports_study() -> None:
    modules = _modules()
    offenders = {
        module: sorted(
            i for i in _imports(path, module, False, set(modules)) if i.startswith("samstudy.study")
        )
        for module, path in modules.items()
        if module.startswith("samstudy.analysis")
    }
    assert not {m: i for m, i in offenders.items() if i}, offenders


def test_module_level_imports_form_no_circle() -> None:
    modules = _modules()
    graph = {module: _imports(path, module, True, set(modules)) for module, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target) :] + [target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_long_modules_say_why() -> None:
    long = []
    for module, path in _modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and LONG_REASON not in doc:
            long.append(f"{module} ({lines} lines)")
    assert not long, f"split these or say '{LONG_REASON} ...' in their docstring: {long}"
