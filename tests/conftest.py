"""Shared test settings: CPU DeepSpeed, a reused extension cache, small thread counts."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the venv's tools first on PATH (deepspeed, torchrun, avi-*, and its ninja: DeepSpeed's op cache is
# keyed by the ninja version, so mixing the system's and the venv's rebuilds it again and again)
_venv_bin = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _venv_bin:
    os.environ["PATH"] = _venv_bin + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
