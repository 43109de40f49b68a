"""One converted canary-qwen folder, timed in its own process: load, audio embeddings of 30 s (front end,
encoder, projection), and the LLM generating greedily (mlx-lm) from the spliced prompt.

Prints one JSON object. Run by salm.py; `python benchmarks/probe_salm_mlx.py FOLDER --steps 32` alone works too.
"""

from __future__ import annotations

import json
import time

import canary_convert  # first: it gives MLX its BLAS before mlx.core is loaded
import mlx.core as mx
from mlx.utils import tree_flatten

from common import best_of, probe_arguments, test_audio


def main() -> None:
    args = probe_arguments("folder")

    started = time.perf_counter()
    model = canary_convert.load_model(args.folder)
    mx.eval(model.audio.parameters(), model.llm.parameters())
    load_seconds = time.perf_counter() - started

    signal = test_audio()

    def encode() -> mx.array:
        (frames,) = model.audio_embeddings([signal])
        mx.eval(frames)
        return frames

    frames = encode()  # warm-up
    encoder_seconds = best_of(encode, args.repeats)

    # A random LLM may end at once: end of sequence is taken out of the running (as NeMo's min_new_tokens does
    # on the other side), so every run generates the tokens asked for.
    embed = model.llm.model.embed_tokens
    assert model.llm.args.tie_word_embeddings, "the probe suppresses EOS in the tied output layer"
    head = embed.as_linear
    eos = model.tokenizer.eos_token_id
    embed.as_linear = lambda x: mx.where(mx.arange(embed.weight.shape[0]) == eos, -mx.inf, head(x)).astype(x.dtype)
    spliced = model.embed(model.prompt_ids(), frames)

    def generate(tokens: int) -> None:
        generated = model.generate(spliced, tokens)
        assert len(generated.tokens) == tokens and not generated.ended, generated

    generate(2)  # warm-up
    # The prompt (the spliced audio) is run once per generation: a generation of one token is that prefill,
    # and the difference to one of steps + 1 tokens is the steps' own time.
    prefill_seconds = best_of(lambda: generate(1), args.repeats)
    generate_seconds = best_of(lambda: generate(args.steps + 1), args.repeats) - prefill_seconds

    # A step reads every LLM weight once (the tied table as the output layer), plus the key/value cache.
    cache = 2 * len(model.llm.layers) * (spliced.shape[0] + args.steps) * model.llm.args.num_key_value_heads
    cache *= model.llm.args.head_dim * spliced.itemsize
    print(json.dumps({
        "blas": canary_convert.BLAS.describe(),
        "load_s": load_seconds,
        "encoder_s": encoder_seconds,
        "prompt_length": spliced.shape[0],
        "prefill_s": prefill_seconds,
        "steps": args.steps,
        "generate_s": generate_seconds,
        "step_bytes": sum(value.nbytes for _, value in tree_flatten(model.llm.parameters())) + cache,
        "llm_weights": str(model.llm.model.layers[0].mlp.up_proj.weight.dtype),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }))


if __name__ == "__main__":
    main()
