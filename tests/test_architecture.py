"""docs/architecture.md stays true of the tree: every module of the package has its place in the
layers table (a package's modules named in its row as `name`, a base module as `name.py`), the
each row's layer is the one tests/test_layers.py enforces."""

import ast
import re
from typing import Dict, List, Set, Tuple

from tests.support import REPO
from tests.test_layers import LAYERS

PACKAGE = REPO / "side4video"
DOC = REPO / "docs" / "architecture.md"


def _table() -> List[Tuple[int, List[str], str]]:
    """(layer, the units of the row (`engine/` -> engine, `config.py` -> config), what it owns)."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].isdigit():
            units = [u.rstrip("/").removesuffix(".py") for u in re.findall(r"`([\w/.]+)`", cells[1])]
            rows.append((int(cells[0]), units, cells[2]))
    return rows


def _modules() -> Dict[str, Set[str]]:
    """unit -> its modules: {'engine': {'train', ...}, 'config': {'config'}}."""
    found: Dict[str, Set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            continue
        found.setdefault(parts[0], set()).add(parts[-1])
    return found


def test_every_module_has_a_row():
    rows = _table()
    assert rows, f"no layers table found in {DOC}"
    by_unit = {unit: owns for _, units, owns in rows for unit in units}
    modules = _modules()
    missing = [u for u in modules if u not in by_unit]
    assert not missing, f"{DOC.name}: no row for {missing}"
    for unit, names in modules.items():
        if len(names) == 1 and unit in names and (PACKAGE / f"{unit}.py").is_file():
            continue  # a base module: its row names it
        named = set(re.findall(r"`(\w+)`", by_unit[unit]))
        assert not names - named, f"{DOC.name}: the {unit}/ row does not name {sorted(names - named)}"


def test_each_row_is_on_the_layer_the_import_check_enforces():
    for layer, units, _ in _table():
        for unit in units:
            expected = LAYERS.get(unit)
            assert expected == layer, f"{DOC.name}: {unit} is on layer {layer}, tests/test_layers.py says {expected}"


CONFIG_PARAMETERS = ("cfg", "data_cfg", "train_cfg")


def test_config_parameters_say_their_type():
    """A function taking the config (or one of its sections) says which in its signature."""
    untyped = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                untyped += [
                    f"{path.relative_to(REPO)}:{node.lineno} {node.name}({arg.arg})"
                    for arg in a.posonlyargs + a.args + a.kwonlyargs
                    if arg.arg in CONFIG_PARAMETERS and arg.annotation is None
                ]
    assert not untyped, untyped
