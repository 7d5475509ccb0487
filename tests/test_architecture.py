"""docs/architecture.md stays true: every import of avi_scale and data_tools points down the map."""

import ast
from pathlib import Path

from helpers import REPO

# room -> the rooms it may import (besides itself); see docs/architecture.md
ALLOWED = {
    "config": set(),
    "plots": set(),
    "data": {"config"},
    "model": {"config"},
    "engine": {"config", "data", "model", "plots"},
    "evaluate": {"config", "data", "model", "engine", "plots"},
    "tune": {"config", "data", "model", "engine", "plots"},
    "cli": {"config", "data", "model", "engine"},
    "data_tools": {"config", "data"},
    "package": set(),  # avi_scale/__init__.py
}


def _room(path: Path) -> str:
    rel = path.relative_to(REPO)
    if rel.parts[0] == "data_tools":
        return "data_tools"
    if len(rel.parts) == 2:  # avi_scale/<module>.py
        return {"__init__.py": "package"}.get(rel.name, rel.stem)
    return rel.parts[1]


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level:  # relative: inside the same room
            continue
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "data_tools":
                rooms.add("data_tools")
            elif parts[0] == "avi_scale":
                rooms.add(parts[1] if len(parts) > 1 else "package")
    return rooms


def test_imports_point_down_the_map():
    wrong = []
    for path in sorted([*(REPO / "avi_scale").rglob("*.py"), *(REPO / "data_tools").rglob("*.py")]):
        room = _room(path)
        assert room in ALLOWED, f"{path}: a room docs/architecture.md does not name"
        for other in _imported_rooms(path) - {room, "package"}:
            if other not in ALLOWED[room]:
                wrong.append(f"{path.relative_to(REPO)} ({room}) imports {other}")
    assert not wrong, "imports that point up the map:\n" + "\n".join(wrong)
