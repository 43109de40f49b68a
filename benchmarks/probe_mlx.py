"""One converted MLX folder, timed in its own process: load, encoder on 30 s of audio, greedy decoder steps.

Prints one JSON object. Run by bench.py; `python benchmarks/probe_mlx.py FOLDER --steps 32` alone works too.
"""

from __future__ import annotations

import json
import time

import canary_convert  # first: it gives MLX its BLAS before mlx.core is loaded
import mlx.core as mx
from mlx.utils import tree_flatten

from canary_convert.model.aed.canary import CanaryModel
from canary_convert.model.aed.decoding import decode_greedy
from canary_convert.model.aed.prompts import PromptOptions, build_prompt
from common import AUDIO_SECONDS, LANGUAGE, SAMPLE_RATE, SUPPRESSED_BIAS, best_of, probe_arguments, test_audio


def fix_steps(model: CanaryModel, prompt_length: int, steps: int) -> None:
    """A random decoder may emit EOS at once: take it out of the running so every run makes `steps` steps,
    and bound the search by the sequence length (budget = max_sequence_length - prompt, NeMo's rule)."""
    bias = model.decoder.output_bias
    model.decoder.output_bias = mx.where(mx.arange(bias.shape[0]) == model.tokenizer.eos_id, SUPPRESSED_BIAS, bias)
    model.decoder.max_sequence_length = prompt_length + steps


def main() -> None:
    args = probe_arguments("folder")

    started = time.perf_counter()
    model = canary_convert.load_model(args.folder)
    mx.eval(model.parameters())
    load_seconds = time.perf_counter() - started

    audio = mx.array(test_audio()[None])
    samples = mx.array([SAMPLE_RATE * AUDIO_SECONDS])

    def encode() -> tuple[mx.array, mx.array]:
        features, frames = model.preprocess(audio, samples)
        encoded, lengths = model.encode(features, frames)
        mx.eval(encoded, lengths)
        return encoded, lengths

    encoded, enc_lengths = encode()  # warm-up
    encoder_seconds = best_of(encode, args.repeats)

    tokenizer = model.tokenizer
    prompt = build_prompt(model.config.prompt_format, tokenizer, PromptOptions(source_lang=LANGUAGE))
    fix_steps(model, len(prompt), args.steps)

    def generate() -> None:
        decode_greedy(model, encoded, enc_lengths, [prompt], tokenizer.eos_id, tokenizer.pad_id,
                      max_generation_delta=args.steps)

    generate()  # warm-up
    decoder_seconds = best_of(generate, args.repeats)

    # A step reads every decoder weight once (the head reads the tied embedding) except the cross-attention
    # key/value projections, whose results are cached, plus the cached cross keys/values themselves.
    read = [v for k, v in tree_flatten(model.decoder.parameters())
            if k != "positional_embedding" and ".cross_attn.key." not in k and ".cross_attn.value." not in k]
    cross_cache = 2 * len(model.decoder.blocks) * encoded.shape[1] * encoded.shape[2] * encoded.itemsize
    print(json.dumps({
        "blas": canary_convert.BLAS.describe(),
        "load_s": load_seconds,
        "encoder_s": encoder_seconds,
        "steps": args.steps,
        "decoder_s": decoder_seconds,
        "step_bytes": sum(p.nbytes for p in read) + cross_cache,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }))


if __name__ == "__main__":
    main()
