"""The package's floors, as issue 18 set them: config at the ground floor (it imports nothing from
`data/` or `objectives/`), the trainer reaching training data through one door (`data.training`),
and each choice list written once (config's `Literal` types), not repeated as a tuple elsewhere."""
from __future__ import annotations

import ast
import typing
from pathlib import Path

from cliplite_dist import config

PACKAGE = Path(config.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports from (the package uses absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_config_imports_nothing_from_data_or_objectives():
    imports = _imported_modules(PACKAGE / "config.py")
    upward = sorted(m for m in imports if m.startswith(("cliplite_dist.data", "cliplite_dist.objectives")))
    assert not upward, upward


def test_the_trainer_reaches_training_data_through_one_module():
    imports = _imported_modules(PACKAGE / "trainer.py")
    data_modules = {m for m in imports if m.startswith("cliplite_dist.data.")} - {"cliplite_dist.data.training"}
    # `from cliplite_dist.data import training` names the package and the module; nothing else.
    assert data_modules == set(), sorted(data_modules)
    assert "cliplite_dist.data.training" in imports


def _choice_lists() -> dict[str, frozenset]:
    return {name: frozenset(typing.get_args(value)) for name, value in vars(config).items()
            if typing.get_origin(value) is typing.Literal and len(typing.get_args(value)) > 1}


def test_each_choice_list_is_written_once():
    """A tuple, list or set of constants equal to one of config's choice lists, anywhere else in the
    package, is the same fact in a second place (it would drift from the `Literal`)."""
    choices = _choice_lists()
    assert {"ObjectiveName", "Negatives", "Precision", "ResizeOn"} <= choices.keys()
    repeated = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        declarations = {id(node.slice) for node in ast.walk(tree)
                        if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "Literal"}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in declarations \
                    and node.elts and all(isinstance(e, ast.Constant) for e in node.elts):
                values = frozenset(e.value for e in node.elts)
                repeated += [f"{path.relative_to(PACKAGE)}:{node.lineno} repeats {name}"
                             for name, choice in choices.items() if values == choice]
    assert not repeated, repeated
