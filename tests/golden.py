"""Golden loss curves: a fixed seed's first training losses, recorded in tests/golden/.

A change that alters what training computes (a refactor that should not, a new default)
moves these curves and fails the test that checks them. When the change is meant, record
the new curve and say why in the commit:

    VIDGEN_UPDATE_GOLDEN=1 python -m pytest -q -k golden
"""

import json
import os
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).parent / "golden"
# Relative tolerance: float rounding differs between CPUs (vector widths) and grows over
# the steps; a change in what is computed moves the losses by far more.
RTOL = 1e-3


def check_golden(name: str, losses: list[float], rtol: float = RTOL) -> None:
    """Compare ``losses`` with tests/golden/<name>.json, or record them there when
    VIDGEN_UPDATE_GOLDEN=1."""
    path = GOLDEN_DIR / f"{name}.json"
    if os.environ.get("VIDGEN_UPDATE_GOLDEN") == "1":
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps({"losses": losses}, indent=1) + "\n")
        return
    if not path.exists():
        raise AssertionError(f"no golden curve {path}; record it with VIDGEN_UPDATE_GOLDEN=1 (see tests/golden.py)")
    want = json.loads(path.read_text())["losses"]
    assert len(losses) == len(want), f"{name}: {len(losses)} losses, the golden curve has {len(want)}"
    np.testing.assert_allclose(losses, want, rtol=rtol, err_msg=f"{name}: the loss curve moved (tests/golden.py)")
