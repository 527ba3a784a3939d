"""The pinned Python environment of the transformers-based golden scripts.

`ensure(script)` re-executes `script` inside a venv holding PINS (default
tests/golden/.venv-embed, or $GOLDEN_VENV), creating and populating it with pip when it is
missing or a version differs. Shared by make_embedding_goldens.py and make_family_goldens.py,
so both judge tessera against the same reference versions.
"""

import os
import subprocess
import sys
import venv

PINS = {
    "torch": "2.15.0",
    "transformers": "5.25.0",
    "sentence-transformers": "6.3.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
}
HERE = os.path.dirname(os.path.abspath(__file__))

PROBE = """
import sys, importlib.metadata as md
names = sys.argv[1:]
sys.stdout.write(" ".join(md.version(n).split("+")[0] for n in names))
"""


def ensure(script):
    """Re-run `script` (a path) under the venv that has PINS, unless this is that venv."""
    env_dir = os.environ.get("GOLDEN_VENV") or os.path.join(HERE, ".venv-embed")
    py = os.path.join(env_dir, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(env_dir):
        return
    if not os.path.exists(py):
        print(f"creating venv {env_dir}", file=sys.stderr)
        venv.create(env_dir, with_pip=True)
    probe = subprocess.run([py, "-c", PROBE, *PINS], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.split() != list(PINS.values()):
        specs = [f"{name}=={version}" for name, version in PINS.items()]
        print(f"installing {' '.join(specs)} (torch from PyPI: a large download)", file=sys.stderr)
        subprocess.run([py, "-m", "pip", "install", *specs], check=True)
    os.execv(py, [py, os.path.abspath(script), *sys.argv[1:]])
