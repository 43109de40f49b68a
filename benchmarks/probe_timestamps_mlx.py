"""One converted canary-1b-v2 folder with its aligner, timed in its own process: load, then `transcribe(...,
timestamp=True)` of 30 s (the Canary's greedy search held to `--steps` tokens, the aligner, forced alignment).

Prints one JSON object. Run by bench.py (aligner.py); `python benchmarks/probe_timestamps_mlx.py FOLDER` works too.
"""

from __future__ import annotations

import json
import time
import warnings

import canary_convert  # first: it gives MLX its BLAS before mlx.core is loaded
import mlx.core as mx

from canary_convert.model.aed.prompts import PromptOptions, build_prompt
from canary_convert.model.app.transcribe import Transcript
from common import LANGUAGE, best_of, probe_arguments, test_audio
from probe_mlx import fix_steps


def main() -> None:
    args = probe_arguments("folder")
    warnings.simplefilter("ignore")  # every run ends on the length budget, and says so

    started = time.perf_counter()
    model = canary_convert.load_model(args.folder)
    mx.eval(model.parameters(), model.aligner.model.parameters())
    load_seconds = time.perf_counter() - started

    prompt = build_prompt(model.config.prompt_format, model.tokenizer, PromptOptions(source_lang=LANGUAGE))
    fix_steps(model, len(prompt), args.steps)
    audio = test_audio()

    def transcribe() -> Transcript:
        return model.transcribe(audio, source_lang=LANGUAGE, target_lang=LANGUAGE, timestamp=True,
                                strategy="greedy")[0]

    result = transcribe()  # warm-up
    print(json.dumps({
        "load_s": load_seconds,
        "transcribe_s": best_of(transcribe, args.repeats),
        "tokens": len(result.tokens),
        "words": len(result.words),
        "segments": len(result.segments),
    }))


if __name__ == "__main__":
    main()
