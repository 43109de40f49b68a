"""Conversion and inference figures on a checkpoint shaped like canary-180m-flash (random weights).

Prints wall time, throughput and peak memory; asserts nothing. Run with `make bench`.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from factory import TinySpec, build  # noqa: E402

# canary-180m-flash: 17 encoder layers of 512, 4 decoder layers of 1024, projection 512 -> 1024.
SPEC = TinySpec("bench-180m", prompt_format="canary2", features=128, d_model=512, dec_hidden=1024, enc_layers=17,
                dec_layers=4, enc_heads=8, dec_heads=8, subsampling_factor=8, conv_channels=256, conv_kernel=9,
                ff_expansion=4, max_sequence_length=1024)


def _peak_child_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    work = REPO / "build" / "bench"
    source = work / "bench-180m.nemo"
    if not source.exists():
        started = time.perf_counter()
        build(SPEC, source)
        print(f"built {source.name} with NeMo in {time.perf_counter() - started:.1f}s")
    size_mb = source.stat().st_size / 1e6
    convert = str(Path(sys.executable).parent / "canary-convert")
    for dtype in ("float32", "float16"):
        out = work / f"mlx-{dtype}"
        started = time.perf_counter()
        subprocess.run([convert, str(source), str(out), "--force", "--dtype", dtype], check=True, capture_output=True)
        seconds = time.perf_counter() - started
        print(f"convert {dtype:8s}: {seconds:6.1f}s for {size_mb:.0f} MB ({size_mb / seconds:.0f} MB/s), "
              f"peak RSS so far {_peak_child_rss_mb():.0f} MB")

    from canary_convert import load_model

    model = load_model(work / "mlx-float32")
    audio = (0.1 * np.random.default_rng(0).standard_normal(16000 * 10)).astype(np.float32)
    model.transcribe(audio[:16000], strategy="greedy")  # warm-up
    for strategy, beam in (("greedy", None), ("beam", 4)):
        started = time.perf_counter()
        result = model.transcribe(audio, strategy=strategy, beam_size=beam)[0]
        seconds = time.perf_counter() - started
        print(f"transcribe 10 s, {strategy:6s}: {seconds:5.2f}s (real-time factor {seconds / 10:.3f}), "
              f"{len(result.tokens)} tokens")


if __name__ == "__main__":
    main()
