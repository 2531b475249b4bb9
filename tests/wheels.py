"""Real wheels of the test plugin packages (tests/plugin_pkg, tests/provider_pkg), written from
their pyproject so pip needs no build backend, and installed with pip offline."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path


def dist_files(pkg_dir: Path, module: str) -> dict[str, bytes]:
    """The files an installer would put on sys.path for the package in ``pkg_dir``."""
    project = tomllib.loads((pkg_dir / "pyproject.toml").read_text())["project"]
    name, version = project["name"].replace("-", "_"), project["version"]
    info = f"{name}-{version}.dist-info"
    eps = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in table.items()) + "\n"
                  for group, table in project["entry-points"].items())
    return {
        f"{module}.py": (pkg_dir / f"{module}.py").read_bytes(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {project['name']}\n"
                            f"Version: {version}\n".encode(),
        f"{info}/entry_points.txt": eps.encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }


def build_wheel(pkg_dir: Path, module: str, dest: Path) -> Path:
    """A py3-none-any wheel of the package, with its RECORD."""
    files = dist_files(pkg_dir, module)
    info = next(k.split("/")[0] for k in files if k.endswith("/METADATA"))
    record = "".join(
        f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()}"
        f",{len(d)}\n" for p, d in files.items()) + f"{info}/RECORD,,\n"
    wheel = dest / f"{info.removesuffix('.dist-info')}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for p, d in files.items():
            zf.writestr(p, d)
        zf.writestr(f"{info}/RECORD", record)
    return wheel


def pip_install(wheel: Path, target: Path) -> None:
    """``pip install --target`` offline, as a user installing a third-party package would."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
