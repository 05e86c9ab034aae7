"""tests/zoo: the drop-in contract (tests/drop_in.py) on the peer model libraries; runs in .venv-zoo only."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/drop_in.py, as the tests beside it import it
