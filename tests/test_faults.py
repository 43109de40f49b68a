"""Faults around a conversion, made for real: a full disk, a file-size limit, a source cut while mapped,
two conversions into one OUT, a run killed outright. Each ends in one line and leaves nothing behind."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from canary_convert.writer import staged_output
from conftest import REPO, run_cli

CLI = str(Path(sys.executable).parent / "canary-convert")


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: smaller than a tiny conversion's output (about 1.5 MB), so a write hits ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}; "
                    "test_file_size_limit_is_one_line covers a refused write without it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_and_leaves_nothing(checkpoint: Path, small_disk: Path) -> None:
    result = run_cli(str(checkpoint), str(small_disk / "mlx"))
    assert result.returncode == 1
    assert _one_line_error(result.stderr) == (f"error: {small_disk / 'mlx'}: the disk refused a write "
                                              f"(No space left on device); nothing was left behind")
    assert list(small_disk.iterdir()) == []


def test_full_temporary_folder_for_a_tar_gz_is_one_line(checkpoint: Path, tmp_path: Path, small_disk: Path) -> None:
    # A tar.gz's weights are decompressed into TMPDIR before they are mapped; that disk may be the full one.
    import tarfile

    source = tmp_path / "m.nemo"
    with tarfile.open(checkpoint) as plain, tarfile.open(source, "w:gz") as packed:
        for info in plain:
            packed.addfile(info, plain.extractfile(info) if info.isfile() else None)
    result = run_cli(str(source), str(tmp_path / "mlx"), env=dict(os.environ, TMPDIR=str(small_disk)))
    assert result.returncode == 1
    line = _one_line_error(result.stderr)
    assert line.startswith(f"error: {small_disk}/canary-convert-") and line.endswith(
        f": the disk refused a write while decompressing {source}:model_weights.ckpt (No space left on device); "
        f"set TMPDIR to a folder with room"), line
    assert list(small_disk.iterdir()) == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["disk", "m.nemo"]


def _limit_file_size() -> None:
    # Writes past 100 KB fail with EFBIG instead of raising SIGXFSZ (an ignored signal stays ignored across exec).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


def test_file_size_limit_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlx"
    result = subprocess.run([CLI, str(checkpoint), str(out)], capture_output=True, text=True, cwd=REPO,
                            timeout=600, preexec_fn=_limit_file_size)
    assert result.returncode == 1
    assert _one_line_error(result.stderr) == (f"error: {out}: the disk refused a write (File too large); "
                                              f"nothing was left behind")
    assert list(tmp_path.iterdir()) == []


_TRUNCATE = """
import os, sys
from contextlib import contextmanager
from pathlib import Path
from canary_convert.convert import ConvertOptions, SilentReporter, convert
from canary_convert.errors import CanaryConvertError

source, out, cut = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

class CutsTheSource(SilentReporter):
    @contextmanager
    def task(self, description, total_bytes, total_items):
        if description.startswith("write") and cut.stat().st_size > 1:  # weights mapped, about to be read
            os.truncate(cut, cut.stat().st_size // 2)
        with super().task(description, total_bytes, total_items) as advance:
            yield advance

try:
    convert(str(source), out, ConvertOptions(), CutsTheSource())
except CanaryConvertError as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(exc.exit_code)
"""


def test_source_truncated_while_mapped_is_an_error_not_sigbus(checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "m.nemo"
    source.write_bytes(checkpoint.read_bytes())
    size = source.stat().st_size
    result = subprocess.run([sys.executable, "-c", _TRUNCATE, str(source), str(tmp_path / "mlx"), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])  # not -7 (SIGBUS)
    assert result.stdout.strip().startswith(f"ArchiveError: {source}:model_weights.ckpt: the file shrank to "
                                            f"{size // 2} bytes while being read"), result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.nemo"]


def test_second_conversion_into_a_busy_out_fails_at_once(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlx"
    with staged_output(out, force=False) as staging:
        (staging / "mine.txt").write_text("first run")
        started = time.monotonic()
        result = run_cli(str(checkpoint), str(out), "--force")
        assert result.returncode == 1
        assert _one_line_error(result.stderr) == (f"error: {out}: another canary-convert (pid {os.getpid()}) is "
                                                  f"writing it; wait for it to finish or choose another OUT")
        assert time.monotonic() - started < 60
        assert staging.is_dir()  # the loser touched nothing of the winner's
    assert [path.name for path in out.iterdir()] == ["mine.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mlx"]  # the lock file went with the run


def test_two_conversions_started_together_one_wins(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlx"
    runs = [subprocess.Popen([CLI, str(checkpoint), str(out)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = _one_line_error(next(stderr for code, stderr in results if code == 1))
    assert loser.startswith(f"error: {out}: another canary-convert (pid ") or loser == (
        f"error: {out}: exists and is not empty; pass --force to replace it"), loser
    record = json.loads((out / "conversion.json").read_text())
    assert sorted(record["manifest"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*")
                                                if p.is_file() and p.name != "conversion.json")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mlx"]


def test_partial_folders_of_killed_runs_are_removed_by_the_next(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlx"
    killed = subprocess.Popen([CLI, str(checkpoint), str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".mlx.partial-*")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert killed.poll() is None, "the conversion finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    left = sorted(path.name for path in tmp_path.iterdir())
    assert [name for name in left if name.startswith(".mlx.partial-")], left  # what SIGKILL leaves
    # Another OUT's partial folder, and one whose name only starts like ours, are not this run's to remove.
    (tmp_path / ".other.partial-0123abcd").mkdir()
    (tmp_path / ".mlx.partial-0123abcd.keep").mkdir()
    result = run_cli(str(checkpoint), str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == [".mlx.partial-0123abcd.keep",
                                                                 ".other.partial-0123abcd", "mlx"]


def test_salm_weights_truncated_while_mapped_are_an_error_not_sigbus(tmp_path: Path) -> None:
    # canary-qwen's source kind: a folder of safetensors, mapped without a copy (converter/salm.py).
    from salm_factory import VARIANTS as SALM_VARIANTS
    from salm_factory import build as build_salm

    folder, llm_folder = build_salm(SALM_VARIANTS["salm-tied-r8"], tmp_path / "salm")
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    result = subprocess.run([sys.executable, "-c", _TRUNCATE, str(folder), str(tmp_path / "mlx"), str(weights)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])  # not -7 (SIGBUS)
    assert result.stdout.strip() == (f"ArchiveError: {weights}: the file shrank to {size // 2} bytes while being "
                                     f"read (the checkpoint ends at byte {size}); was it overwritten or truncated?")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["salm", "salm-llm"]
