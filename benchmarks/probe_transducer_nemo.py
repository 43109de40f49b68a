"""NeMo itself on one transducer `.nemo`, timed in its own process: restore, encoder on 30 s of audio, greedy
decoding of those encoder states (the checkpoint's own `greedy_batch`); or, with --minutes, the encoder alone on a
long input with NVIDIA's local-attention recipe.

The same work as probe_transducer_mlx.py, on torch's CPU backend. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np
import torch
from nemo.collections.asr.models import ASRModel
from nemo.utils import logging as nemo_logging

from common import best_of, test_audio


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("nemo")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--minutes", type=float, help="time the encoder once on this long an input instead")
    parser.add_argument("--context", type=int, default=128, help="local attention's left = right context")
    args = parser.parse_args()
    nemo_logging.setLevel(logging.ERROR)

    started = time.perf_counter()
    model = ASRModel.restore_from(args.nemo, map_location="cpu").eval()
    load_seconds = time.perf_counter() - started

    def encode(signal: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        encoded, lengths = model.forward(input_signal=torch.from_numpy(signal)[None],
                                         input_signal_length=torch.tensor([signal.size]))
        return encoded, lengths

    if args.minutes:
        # NVIDIA's recipe for long files: local attention, and the subsampling convolutions in chunks (1: auto).
        model.change_attention_model("rel_pos_local_attn", [args.context, args.context])
        model.change_subsampling_conv_chunking_factor(1)
        encode(test_audio())  # warm-up on 30 s
        signal = test_audio(int(args.minutes * 60))
        started = time.perf_counter()
        encoded, _ = encode(signal)
        print(json.dumps({"long_s": time.perf_counter() - started, "long_frames": encoded.shape[2],
                          "torch_threads": torch.get_num_threads()}))
        return

    audio = test_audio()
    encoded, lengths = encode(audio)  # warm-up
    encoder_seconds = best_of(lambda: encode(audio), args.repeats)

    def decode() -> list:
        return model.decoding.rnnt_decoder_predictions_tensor(encoder_output=encoded, encoded_lengths=lengths,
                                                              return_hypotheses=True)

    hypotheses = decode()  # warm-up
    decode_seconds = best_of(decode, args.repeats)
    print(json.dumps({
        "torch_threads": torch.get_num_threads(),
        "load_s": load_seconds,
        "encoder_s": encoder_seconds,
        "frames": int(lengths[0]),
        "symbols": len(hypotheses[0].y_sequence),
        "decode_s": decode_seconds,
    }))


if __name__ == "__main__":
    main()
