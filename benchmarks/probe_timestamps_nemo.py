"""NeMo itself on one canary-1b-v2 `.nemo` with its aligner, timed in its own process: restore (both models),
then `transcribe(timestamps=True)` of 30 s, the same work as probe_timestamps_mlx.py. Prints one JSON object.
"""

from __future__ import annotations

import json

import torch

from common import LANGUAGE, best_of, probe_arguments, test_audio
from probe_nemo import fix_steps, prompt_ids, prompt_slots, restore


@torch.inference_mode()
def main() -> None:
    args = probe_arguments("nemo")
    model, load_seconds = restore(args.nemo)
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
