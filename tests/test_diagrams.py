"""docs/architecture.png, kv-cache.png, lora.png and int4-group.png are drawn by tools/draw_diagrams.py; redraw
them in a scratch folder and compare byte for byte, so that a change to the tool (or to the int4 code it draws
from) that is not followed by `python tools/draw_diagrams.py` fails here."""
import os
import subprocess
import sys

import PIL
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIAGRAMS = ("architecture.png", "kv-cache.png", "lora.png", "int4-group.png")


def pinned_pillow() -> str:
    """The pillow version requirements-dev.txt pins: the one the committed PNGs were drawn with (another release
    may rasterise pillow's font, or compress, a little differently)."""
    for line in open(os.path.join(ROOT, "requirements-dev.txt"), encoding="utf-8"):
        if line.lower().startswith("pillow=="):
            return line.split("==")[1].split()[0]
    raise AssertionError("requirements-dev.txt pins no pillow version")


def test_committed_diagrams_are_up_to_date(tmp_path):
    if PIL.__version__ != pinned_pillow():
        pytest.skip(f"the diagrams were drawn with pillow {pinned_pillow()}, this is {PIL.__version__}")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "draw_diagrams.py"), "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in DIAGRAMS:
        with open(tmp_path / name, "rb") as fresh, open(os.path.join(ROOT, "docs", name), "rb") as committed:
            assert fresh.read() == committed.read(), f"docs/{name} is stale: run python tools/draw_diagrams.py"


def test_readme_shows_every_diagram():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for name in DIAGRAMS:
        assert f"docs/{name}" in readme, name


def test_out_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "draw_diagrams.py"), "--out", str(target)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stderr.count("\n") == 1
