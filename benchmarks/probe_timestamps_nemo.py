"""NeMo itself on one canary-1b-v2 `.nemo` with its aligner, timed in its own process: restore (both models),
then `transcribe(timestamps=True)` of 30 s, the same work as probe_timestamps_mlx.py. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from nemo.collections.asr.models import EncDecMultiTaskModel
from nemo.utils import logging as nemo_logging

from common import LANGUAGE, best_of, test_audio
from probe_nemo import fix_steps, prompt_ids, prompt_slots


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("nemo")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    nemo_logging.setLevel(logging.ERROR)

    started = time.perf_counter()
    model = EncDecMultiTaskModel.restore_from(args.nemo, map_location="cpu").eval()
    load_seconds = time.perf_counter() - started
    assert model.timestamps_asr_model is not None, "NeMo restored no aligner from the archive"

    fix_steps(model, len(prompt_ids(model, LANGUAGE)), args.steps)
    slots = prompt_slots(model, LANGUAGE)
    slots.pop("timestamp")  # transcribe(timestamps=True) sets it ("no": the aligner gives the times)
    audio = test_audio()

    def transcribe():  # noqa: ANN202 (a NeMo Hypothesis)
        return model.transcribe([audio], batch_size=1, timestamps=True, return_hypotheses=True, verbose=False,
                                **slots)[0]

    result = transcribe()  # warm-up
    print(json.dumps({
        "torch_threads": torch.get_num_threads(),
        "load_s": load_seconds,
        "transcribe_s": best_of(transcribe, args.repeats),
        "tokens": len(result.y_sequence),
        "words": len(result.timestamp.get("word", [])),
        "segments": len(result.timestamp.get("segment", [])),
    }))


if __name__ == "__main__":
    main()
