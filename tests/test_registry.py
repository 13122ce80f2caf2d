"""Ready for the Comfy Registry: comfy-cli's own `comfy node validate` (what `comfy node publish` runs first: it parses
pyproject.toml as the registry does, warns about fields it will drop, and runs ruff's exec/eval checks) passes with no
warning, and the icon is a file of this repository at the URL the registry will show.

comfy-cli lives in its own environment (.venv-registry, made by scripts/dev-install.sh: its dependencies would clash
with ComfyUI's pins); $ZTURBO_COMFY_CLI names another `comfy` executable.
"""

import os
import re
import subprocess
import tomllib
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
COMFY_CLI = Path(os.environ.get("ZTURBO_COMFY_CLI") or REPO / ".venv-registry" / "bin" / "comfy")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_comfy_cli_validates_the_pack(tmp_path):
    assert COMFY_CLI.is_file(), f"{COMFY_CLI} is missing: run scripts/dev-install.sh (or set ZTURBO_COMFY_CLI)"
    # no telemetry, no prompt, its settings in a temporary home
    env = dict(os.environ, HOME=str(tmp_path), DO_NOT_TRACK="1")
    proc = subprocess.run([str(COMFY_CLI), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # it exits 0 on bad fields (it drops them) and on exec/eval: each is a line of its output
    assert not re.search(r"warning|error|invalid", output, re.I), output
    assert "All validation checks passed" in output, output


def test_icon_is_a_file_of_this_repository():
    """The registry shows Icon as an image URL as given (comfy-cli sends the string unchanged; a relative path would
    not resolve on registry.comfy.org), so it is the raw URL of a committed file on the Repository's main branch."""
    repository = PYPROJECT["project"]["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", repository).group(1)
    icon = PYPROJECT["tool"]["comfy"]["Icon"]
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert icon.startswith(prefix), (icon, prefix)
    path = icon.removeprefix(prefix)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=REPO, capture_output=True, text=True)
    assert tracked.returncode == 0, f"{path} is not committed: {tracked.stderr}"
    with Image.open(REPO / path) as image:  # the registry's limits: SVG, PNG, JPG or GIF, at most 800 x 400 px
        assert image.format in ("PNG", "JPEG", "GIF") and image.width <= 800 and image.height <= 400


def test_registry_fields():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])  # semantic version X.Y.Z
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert set(project["urls"]) >= {"Repository", "Issues"}  # the keys comfy-cli reads (not "Bug Tracker")
