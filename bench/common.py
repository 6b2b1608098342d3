"""What the benchmark scripts share: running the installed `lmkit` command as a user would."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "sample_data"


def lmkit(*args: str) -> dict:
    """Run `lmkit ARGS --json`; its last stdout line, parsed. Stops the benchmark on failure."""
    done = subprocess.run(["lmkit", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lmkit {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])
