"""NeMo itself on one `.nemo`, timed in its own process: restore, encoder on 30 s of audio, greedy decoder steps.

The same work as probe_mlx.py, on torch's CPU backend. Prints one JSON object.
"""

from __future__ import annotations

import json
import logging
import time

import torch
from nemo.collections.asr.models import EncDecMultiTaskModel
from nemo.utils import logging as nemo_logging
from omegaconf import OmegaConf

from common import AUDIO_SECONDS, LANGUAGE, SAMPLE_RATE, SUPPRESSED_BIAS, best_of, probe_arguments, test_audio


def prompt_slots(model: EncDecMultiTaskModel, lang: str) -> dict[str, str]:
    """The slots of NeMo's prompt for plain transcription with punctuation, in either prompt format."""
    slots = dict(source_lang=lang, target_lang=lang, pnc="yes")
    if model.prompt_format == "canary":
        slots.update(task="asr")
    else:
        slots.update(decodercontext="", emotion="<|emo:undefined|>", itn="no", timestamp="no", diarize="no")
    return slots


def prompt_ids(model: EncDecMultiTaskModel, lang: str) -> list[int]:
    return model.prompt.encode_dialog(turns=[{"role": "user", "slots": prompt_slots(model, lang)}])[
        "context_ids"].tolist()


def fix_steps(model: EncDecMultiTaskModel, prompt_length: int, steps: int) -> None:
    """Greedy search, EOS out of the running, `steps` steps (probe_mlx.fix_steps on NeMo's side)."""
    model.log_softmax.mlp.layer0.bias[model.tokenizer.eos] = SUPPRESSED_BIAS
    model.change_decoding_strategy(OmegaConf.create({"strategy": "greedy", "greedy": {"max_generation_delta": steps}}))
    # NeMo's budget: min(max_sequence_length, frames + delta) - prompt length, i.e. `steps` here.
    model.decoding.decoding.greedy_search.max_seq_length = prompt_length + steps


def restore(path: str) -> tuple[EncDecMultiTaskModel, float]:
    """NeMo's model restored on the CPU (its logging quiet), and the seconds that took."""
    nemo_logging.setLevel(logging.ERROR)
    started = time.perf_counter()
    model = EncDecMultiTaskModel.restore_from(path, map_location="cpu").eval()
    return model, time.perf_counter() - started


@torch.inference_mode()
def main() -> None:
    args = probe_arguments("nemo")
    model, load_seconds = restore(args.nemo)

    audio = torch.from_numpy(test_audio())[None]
    samples = torch.tensor([SAMPLE_RATE * AUDIO_SECONDS])

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        _, _, encoded, mask = model.forward(input_signal=audio, input_signal_length=samples)
        return encoded, mask

    encoded, mask = encode()  # warm-up
    encoder_seconds = best_of(encode, args.repeats)

    prompt = prompt_ids(model, LANGUAGE)
    fix_steps(model, len(prompt), args.steps)

    def generate() -> None:
        model.decoding.decode_predictions_tensor(encoder_hidden_states=encoded, encoder_input_mask=mask,
                                                 decoder_input_ids=torch.tensor([prompt]))

    generate()  # warm-up
    decoder_seconds = best_of(generate, args.repeats)
    print(json.dumps({
        "torch_threads": torch.get_num_threads(),
        "load_s": load_seconds,
        "encoder_s": encoder_seconds,
        "steps": args.steps,
        "decoder_s": decoder_seconds,
    }))


if __name__ == "__main__":
    main()
