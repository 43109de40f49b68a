"""The checkpoint's prompt_defaults: what NeMo's transcribe() does when the caller names no language or flag."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.parity import reference_signals, restore_nemo
from factory import VARIANTS, build

SIGNALS = reference_signals(16000)
# NeMo's own spellings: canary-1b's plain words, the flash models' tokens. (NeMo 3.0's canary2 defaults path
# cannot serve an aggregate tokenizer: its default slots leave out `prompt_language`; the single-BPE variant it can.)
DEFAULTS = {
    "canary-sub8": [{"role": "user", "slots": {"source_lang": "de", "target_lang": "de", "task": "asr",
                                                "pnc": "no"}}],
    "canary2-bpe-sub16": [{"role": "user", "slots": {
        "decodercontext": "", "emotion": "<|emo:undefined|>", "source_lang": "<|de|>", "target_lang": "<|en|>",
        "pnc": "<|pnc|>", "itn": "<|noitn|>", "timestamp": "<|notimestamp|>", "diarize": "<|nodiarize|>"}}],
}


@pytest.mark.parametrize("variant", sorted(DEFAULTS))
def test_transcribe_without_prompt_options_follows_the_checkpoint(tmp_path: Path, variant: str) -> None:
    source = build(replace(VARIANTS[variant], prompt_defaults=DEFAULTS[variant]), tmp_path / "defaults.nemo")
    nemo = restore_nemo(source)
    decoding = OmegaConf.merge(nemo.cfg.decoding, {"strategy": "greedy"})
    nemo.change_decoding_strategy(decoding)
    reference = [h.y_sequence.tolist() for h in nemo.transcribe(list(SIGNALS), batch_size=4, verbose=False)]
    folder = convert(str(source), tmp_path / "mlx", ConvertOptions()).out
    assert json.loads((folder / "config.json").read_text())["prompt_defaults"] == DEFAULTS[variant]
    model = load_model(folder)
    ours = model.transcribe(list(SIGNALS), strategy="greedy")
    assert [result.tokens for result in ours] == reference
    # The defaults are German (and, for the canary2 one, translation into English), not the tokenizer's first
    # language; a source given alone still means "in that language".
    options = model.prompt_options()
    assert options.source_lang == "de" and options.target_lang == DEFAULTS[variant][0]["slots"]["target_lang"].strip("<|>")
    assert model.prompt_options("en").target_lang == "en" and model.prompt_options("en").task == "transcribe"
    assert options.pnc is (variant != "canary-sub8")
