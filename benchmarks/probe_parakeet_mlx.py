"""parakeet-mlx (0.6.0) on a `--layout parakeet-mlx` folder, timed in its own process: its load, its encoder on
the 30 s input's features (ours, which are NeMo's: its own front end differs), its greedy decoding of its encoder
states.

Prints one JSON object. Run by parakeet.py with the features probe_transducer_mlx.py saved.
"""

from __future__ import annotations

import argparse
import json
import os
import time

# from_pretrained asks the Hub first and falls back to the folder: offline, that ask fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"

import canary_convert  # noqa: E402,F401  first: MLX gets the same BLAS as our model's probe
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from parakeet_mlx import from_pretrained  # noqa: E402

from common import best_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--features", required=True, help="log-mel features (.npy, (T, n_mels))")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="no warm-up runs (for bfloat16 on x86: minutes each)")
    args = parser.parse_args()

    started = time.perf_counter()
    model = from_pretrained(args.folder, dtype=getattr(mx, args.dtype))
    mx.eval(model.parameters())
    load_seconds = time.perf_counter() - started

    # In its dtype, as its transcribe() computes features from audio loaded in the model's dtype.
    mel = mx.array(np.load(args.features))[None].astype(getattr(mx, args.dtype))
    count = mx.array([mel.shape[1]])

    last: list[tuple[mx.array, mx.array]] = []

    def encode() -> None:
        encoded, lengths = model.encoder(mel, count)
        mx.eval(encoded, lengths)
        last[:] = [(encoded, lengths)]

    if not args.cold:
        encode()  # warm-up
    encoder_seconds = best_of(encode, args.repeats)
    encoded, lengths = last[0]
    hypotheses, _ = model.decode(encoded, lengths)  # warm-up
    decode_seconds = best_of(lambda: model.decode(encoded, lengths), args.repeats)
    print(json.dumps({
        "load_s": load_seconds,
        "encoder_s": encoder_seconds,
        "frames": int(lengths[0]),
        "symbols": len(hypotheses[0]),
        "decode_s": decode_seconds,
    }))


if __name__ == "__main__":
    main()
