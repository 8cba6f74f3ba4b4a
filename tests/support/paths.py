"""Where things are: the repository checkout and the interpreter's bin directory (the venv's)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
