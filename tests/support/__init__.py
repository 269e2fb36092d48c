"""Test support: fixtures (registered in tests/conftest.py) and the paths tests share."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DEMO = str(CONFIGS / "demo.yaml")
