"""The built wheel carries the mappings and presets, converts from a fresh virtual environment, and its runtime
install (no extra) loads and transcribes with neither torch nor NeMo importable."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from conftest import REPO

EXAMPLE = REPO / "examples" / "tiny-canary"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(REPO)], check=True, capture_output=True)
    return next(dist.glob("canary_convert-*.whl"))


def borrowing_venv(folder: Path, wheel: Path) -> tuple[Path, Path]:
    """A fresh venv that borrows the heavy dependencies (torch, mlx, ...) from this one by a path entry,
    which does not run this venv's editable-install hook: canary_convert can only come from the wheel.
    Returns its python and its site-packages."""
    venv.create(folder, with_pip=False)
    site = next((folder / "lib").glob("python3*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = folder / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    return python, site


def test_wheel_installs_and_converts_in_a_fresh_venv(checkpoint: Path, wheel: Path, tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"canary_convert/mappings/canary.yaml", "canary_convert/configs/aed-base.yaml",
            "canary_convert/configs/canary-1b.yaml", "canary_convert/configs/canary-flash.yaml",
            "canary_convert/configs/canary-1b-v2.yaml", "canary_convert/model/fastconformer/encoder.py",
            "canary_convert/model/aed/decoder.py", "canary_convert/model/app/transcribe.py",
            "canary_convert/model/cpu/widened.py"} <= names
    assert not any(name.startswith("tests/") for name in names)
    if sys.platform == "linux":
        for extension in ("_gemv_forward", "_widen", "_encoder"):
            assert any(name.startswith(f"canary_convert/{extension}.") and name.endswith(".so") for name in names)

    fresh = tmp_path / "venv"
    python, site = borrowing_venv(fresh, wheel)
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


# --- the runtime install -------------------------------------------------------------------------------------

# Installed as a .pth hook in the runtime venv: a top-level module found only in the borrowed site-packages
# (so not the standard library) and not among the modules of the runtime's own requirements (and what they
# require) fails to import as if it were not installed.
_RUNTIME_ONLY = """
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder

ALLOWED = frozenset({allowed!r})
BORROWED = {borrowed!r}


class RuntimeOnly(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if path is not None or fullname in ALLOWED or fullname in sys.builtin_module_names:
            return None  # a submodule (its package was allowed), or built into the interpreter
        if PathFinder.find_spec(fullname, [entry for entry in sys.path if entry != BORROWED]) is not None:
            return None  # the standard library, or the wheel itself
        raise ModuleNotFoundError(f"No module named {{fullname!r}} (not in the runtime install)", name=fullname)


sys.meta_path.insert(0, RuntimeOnly())
"""


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        fields = Parser().parsestr(archive.read(metadata).decode())
    return [Requirement(text) for text in fields.get_all("Requires-Dist") or []]


def wanted(requirement: Requirement, extras: tuple[str, ...]) -> bool:
    return requirement.marker is None or any(requirement.marker.evaluate({"extra": extra}) for extra in extras)


def top_level_modules(dist: importlib.metadata.Distribution) -> set[str]:
    """The names a distribution's files make importable at the top level."""
    names = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first == ".." or first.endswith((".dist-info", ".data", ".pth")):
            continue
        if len(file.parts) > 1:
            names.add(first)
        elif first.endswith(".py"):
            names.add(first[:-3])
        elif first.endswith(".so"):
            names.add(first.split(".")[0])
    return names


def runtime_modules(requirements: list[Requirement]) -> set[str]:
    """Every top-level module of the requirements' closure, as installed here (extras followed)."""
    modules, seen = set(), set()
    pending = [(requirement, tuple(requirement.extras)) for requirement in requirements]
    while pending:
        requirement, extras = pending.pop()
        key = (canonicalize_name(requirement.name), extras)
        if key in seen:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(requirement.name)
        modules |= top_level_modules(dist)
        for text in dist.requires or []:
            needed = Requirement(text)
            if wanted(needed, ("", *extras)):
                pending.append((needed, tuple(needed.extras)))
    return modules


@pytest.fixture(scope="module")
def example_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model converted (here, where the converter's torch is installed)."""
    return convert(str(EXAMPLE / "tiny-canary.nemo"), tmp_path_factory.mktemp("example") / "mlx", ConvertOptions()).out


_TRANSCRIBE = """
import json, sys
from canary_convert import load_model
model = load_model(sys.argv[1])
tokens = [t.tokens for t in model.transcribe(sys.argv[2:], source_lang="en")]
print(json.dumps({"tokens": tokens, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "nemo"))}))
"""


def test_the_runtime_install_transcribes_without_torch(wheel: Path, example_folder: Path, tmp_path: Path) -> None:
    """`pip install canary-convert` requires no torch, safetensors, omegaconf or NeMo; in a venv where only
    the runtime's requirements (and theirs) can be imported, load_model, canary-transcribe and verify work on the
    example's converted folder, with tokens equal to the full install's, and the converter names its extra."""
    requirements = wheel_requirements(wheel)
    runtime = [r for r in requirements if wanted(r, ("",))]
    converter = {canonicalize_name(r.name) for r in requirements if not wanted(r, ("",)) and wanted(r, ("convert",))}
    assert {"torch", "safetensors", "omegaconf"} <= converter
    allowed = runtime_modules(runtime)
    assert not allowed & {"torch", "nemo", "omegaconf", "safetensors", "lightning", "pytorch_lightning"}, allowed
    python, site = borrowing_venv(tmp_path / "venv", wheel)
    borrowed = sysconfig.get_paths()["purelib"]
    (site / "runtime_only.py").write_text(_RUNTIME_ONLY.format(allowed=sorted(allowed), borrowed=borrowed))
    (site / "zz_runtime_only.pth").write_text("import runtime_only\n")
    blocked = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert blocked.returncode == 1 and "No module named 'torch' (not in the runtime install)" in blocked.stderr
    clips = [str(EXAMPLE / "clips" / f"train-en-{index}.wav") for index in range(2)]
    expected = [t.tokens for t in load_model(example_folder).transcribe(clips, source_lang="en")]

    loaded = subprocess.run([str(python), "-c", _TRANSCRIBE, str(example_folder), *clips], capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout) == {"tokens": expected, "heavy": []}
    transcribed = subprocess.run([str(tmp_path / "venv" / "bin" / "canary-transcribe"), *clips, "--model",
                                  str(example_folder), "--source-lang", "en", "--json"], capture_output=True, text=True)
    assert transcribed.returncode == 0, transcribed.stderr
    assert [record["tokens"] for record in json.loads(transcribed.stdout)] == expected
    verified = subprocess.run([str(tmp_path / "venv" / "bin" / "canary-convert"), "verify", str(example_folder)],
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    converting = subprocess.run([str(tmp_path / "venv" / "bin" / "canary-convert"), str(EXAMPLE / "tiny-canary.nemo"),
                                 str(tmp_path / "out")], capture_output=True, text=True)
    assert converting.returncode == 1 and not (tmp_path / "out").exists()
    assert converting.stderr.strip().splitlines() == [
        "error: converting needs torch, which is not installed (the runtime alone loads and transcribes converted "
        "folders): pip install 'canary-convert[convert]'"]


def test_a_speech_llm_folder_without_mlx_lm_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """canary-qwen folders run their LLM in mlx-lm, the `llm` extra: without it, one error naming the extra."""
    from canary_convert.errors import MissingExtraError
    from canary_convert.model.llm.speechllm import load_speech_llm

    monkeypatch.setitem(sys.modules, "mlx_lm", None)  # `import mlx_lm` fails as if it were not installed
    with pytest.raises(MissingExtraError, match=r"needs mlx-lm, which is not installed: pip install 'canary-convert\[llm\]'"):
        load_speech_llm(tmp_path, None, {})  # type: ignore[arg-type]
