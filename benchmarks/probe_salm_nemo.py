"""NeMo's own SALM on one canary-qwen folder, timed in its own process: the same work as probe_salm_mlx.py
(load, audio embeddings of 30 s, greedy generation from the spliced prompt) on torch's CPU backend.

Prints one JSON object.
"""

from __future__ import annotations

import json
import logging
import time

import torch
from nemo.collections.common.prompts import PromptFormatter
from nemo.collections.speechlm2.models import SALM
from nemo.utils import logging as nemo_logging
from transformers import GenerationConfig

from common import best_of, probe_arguments, test_audio


@torch.inference_mode()
def main() -> None:
    args = probe_arguments("folder")
    nemo_logging.setLevel(logging.ERROR)

    started = time.perf_counter()
    model = SALM.from_pretrained(args.folder).eval()
    load_seconds = time.perf_counter() - started

    signal = torch.from_numpy(test_audio())[None]
    length = torch.tensor([signal.shape[1]])

    def encode() -> None:
        model.perception(input_signal=signal, input_signal_length=length)

    encode()  # warm-up
    encoder_seconds = best_of(encode, args.repeats)

    formatter = PromptFormatter.resolve(model.cfg.prompt_format)(model.tokenizer)
    turns = [{"role": "user", "slots": {"message": f"Transcribe the following: {model.audio_locator_tag}"}}]
    prompt = formatter.encode_dialog(turns=turns)["input_ids"][None]

    def generate(tokens: int) -> None:
        # SALM.generate's default configuration, with min_new_tokens: HF's own suppression of end of sequence,
        # so a random LLM generates every token asked.
        config = GenerationConfig(bos_token_id=model.text_bos_id, eos_token_id=model.text_eos_id,
                                  pad_token_id=model.text_pad_id, max_new_tokens=tokens, min_new_tokens=tokens)
        answer = model.generate(prompts=prompt, audios=signal, audio_lens=length, generation_config=config)
        assert answer.shape[1] == tokens, answer.shape

    generate(2)  # warm-up
    prefill_seconds = best_of(lambda: generate(1), args.repeats)
    generate_seconds = best_of(lambda: generate(args.steps + 1), args.repeats) - prefill_seconds
    print(json.dumps({
        "torch_threads": torch.get_num_threads(),
        "dtype": str(next(model.llm.parameters()).dtype),
        "load_s": load_seconds,
        "encoder_s": encoder_seconds,
        "prefill_s": prefill_seconds,
        "steps": args.steps,
        "generate_s": generate_seconds,
    }))


if __name__ == "__main__":
    main()
