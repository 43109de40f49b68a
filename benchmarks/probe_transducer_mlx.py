"""One converted transducer folder in canary-convert's bundled model, timed in its own process: load, encoder on
30 s of audio, greedy decoding of those encoder states; or, with --minutes, the encoder alone on a long input with
local attention.

Prints one JSON object. Run by parakeet.py; `python benchmarks/probe_transducer_mlx.py FOLDER` alone works too.
"""

from __future__ import annotations

import argparse
import json
import time

import canary_convert  # first: it gives MLX its BLAS before mlx.core is loaded
import mlx.core as mx
import numpy as np

from common import SAMPLE_RATE, best_of, test_audio


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--features-out", help="save the 30 s input's log-mel features here (.npy, (T, n_mels))")
    parser.add_argument("--minutes", type=float, help="time the encoder once on this long an input instead")
    parser.add_argument("--context", type=int, default=128, help="local attention's left = right context")
    args = parser.parse_args()

    started = time.perf_counter()
    model = canary_convert.load_model(args.folder)
    mx.eval(model.parameters())
    load_seconds = time.perf_counter() - started

    def encode(signal: np.ndarray) -> tuple[mx.array, mx.array]:
        features, frames = model.preprocess(mx.array(signal[None]), mx.array([signal.size]))
        encoded, lengths = model.encode(features, frames)
        mx.eval(encoded, lengths)
        return encoded, lengths

    if args.minutes:
        model.use_attention("local", (args.context, args.context))
        encode(test_audio())  # warm-up on 30 s
        signal = test_audio(int(args.minutes * 60))
        started = time.perf_counter()
        encoded, _ = encode(signal)
        print(json.dumps({"long_s": time.perf_counter() - started, "long_frames": encoded.shape[1],
                          "peak_memory_gb": mx.get_peak_memory() / 1e9}))
        return

    audio = test_audio()
    encoded, lengths = encode(audio)  # warm-up
    encoder_seconds = best_of(lambda: encode(audio), args.repeats)
    if args.features_out:
        features, frames = model.preprocess(mx.array(audio[None]), mx.array([audio.size]))
        np.save(args.features_out, np.array(features[0, :, : int(frames[0])].T))

    hypotheses = model.greedy(encoded, lengths)  # warm-up
    decode_seconds = best_of(lambda: model.greedy(encoded, lengths), args.repeats)
    print(json.dumps({
        "blas": canary_convert.BLAS.describe(),
        "load_s": load_seconds,
        "encoder_s": encoder_seconds,
        "frames": int(lengths[0]),
        "symbols": len(hypotheses[0].tokens),
        "decode_s": decode_seconds,
        "audio_s": audio.size / SAMPLE_RATE,
    }))


if __name__ == "__main__":
    main()
