"""The built wheel carries the mappings and presets, and converts from a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_installs_and_converts_in_a_fresh_venv(checkpoint: Path, tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("canary_convert-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"canary_convert/mappings/canary.yaml", "canary_convert/configs/aed-base.yaml",
            "canary_convert/configs/canary-1b.yaml", "canary_convert/configs/canary-flash.yaml",
            "canary_convert/configs/canary-1b-v2.yaml", "canary_convert/model/fastconformer/encoder.py",
            "canary_convert/model/aed/decoder.py", "canary_convert/model/app/transcribe.py",
            "canary_convert/model/cpu/widened.py"} <= names
    assert not any(name.startswith("tests/") for name in names)
    if sys.platform == "linux":
        for extension in ("_gemv_forward", "_widen"):
            assert any(name.startswith(f"canary_convert/{extension}.") and name.endswith(".so") for name in names)

    # A fresh venv that borrows the heavy dependencies (torch, mlx, ...) from this one by a path entry,
    # which does not run this venv's editable-install hook: canary_convert can only come from the wheel.
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    site = next((fresh / "lib").glob("python3*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = fresh / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    where = subprocess.run([str(python), "-c", "import canary_convert; print(canary_convert.__file__)"],
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(site))
    if sys.platform == "linux":
        version = subprocess.run([str(fresh / "bin" / "canary-convert"), "--version"], check=True, capture_output=True,
                                 text=True).stdout
        assert "vector products by sgemv" in version, version
        widen = subprocess.run([str(python), "-c", "from canary_convert.extensions import extension_path; "
                                "print(extension_path('_widen'))"], check=True, capture_output=True, text=True)
        assert widen.stdout.strip().startswith(str(site)), widen.stdout
    result = subprocess.run([str(fresh / "bin" / "canary-convert"), str(checkpoint), str(tmp_path / "mlx")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlx" / "model.safetensors").is_file()
