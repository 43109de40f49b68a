"""Golden outputs of a speech-LLM folder (canary-qwen): what `canary-convert verify` runs again.

On canary-convert's fixed test signals (parity.reference_signals) the conversion records, per signal: a sample
of the projected audio embeddings at fixed frames, the LLM's top log-probs after the spliced prompt, and the
greedy tokens with NeMo's settings (and each step's top-2 gap, so a near tie is advisory, not a failure).
Same file name as a Canary folder's goldens, its own schema.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import __version__
from .model.llm.speechllm import SpeechLLM
from .parity import reference_signals

SCHEMA = "canary-convert/speech-llm-goldens"
SCHEMA_VERSION = 1
MAX_NEW_TOKENS = 24
SAMPLED_FRAMES = 8  # frames of the audio embeddings recorded per signal, spread over the clip
TOP_K = 8
NEAR_TIE = 1e-3
# By stored dtype: the largest |difference| of an embedding sample or a top log-prob that still passes.
TOLERANCES = {"float32": {"embeddings": 1e-4, "logprobs": 1e-3},
              "float16": {"embeddings": 2e-2, "logprobs": 0.1},
              "bfloat16": {"embeddings": 5e-2, "logprobs": 0.25},
              "quantized": {"embeddings": 0.1, "logprobs": 0.5}}


def _precision(model: SpeechLLM) -> str:
    if model.config.quantization is not None:
        return "quantized"
    return str(model.audio.compute_dtype).removeprefix("mlx.core.")


def _run(model: SpeechLLM, signal: np.ndarray) -> dict[str, Any]:
    (frames,) = model.audio_embeddings([signal])
    rows = np.linspace(0, frames.shape[0] - 1, SAMPLED_FRAMES).round().astype(int).tolist()
    ids = model.prompt_ids()
    spliced = model.embed(ids, frames)
    logits = model.logits(spliced)[-1].astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits))
    top = np.argsort(-logprobs)[:TOP_K].tolist()
    tokens, gaps = [], []
    for token, step in _greedy(model, spliced):
        tokens.append(token)
        gaps.append(step)
    return {"frames": int(frames.shape[0]), "rows": rows,
            "embeddings": np.array(frames[mx.array(rows), :TOP_K].astype(mx.float32)).tolist(),
            "top_ids": top, "top_logprobs": logprobs[top].tolist(), "tokens": tokens, "gaps": gaps}


def _greedy(model: SpeechLLM, spliced: mx.array) -> list[tuple[int, float]]:
    """Greedy tokens to the end of sequence (or the budget), with the top-2 gap of each step's log-probs."""
    from mlx_lm.generate import generate_step

    found = []
    prompt = mx.zeros((spliced.shape[0],), dtype=mx.int32)
    for token, logprobs in generate_step(prompt, model.llm, max_tokens=MAX_NEW_TOKENS, input_embeddings=spliced,
                                         sampler=lambda values: mx.argmax(values, axis=-1)):
        best = mx.topk(logprobs.astype(mx.float32), 2)
        found.append((int(token), float(mx.abs(best[1] - best[0]).item())))
        if int(token) == model.tokenizer.eos_token_id:
            break
    return found


def record(model: SpeechLLM) -> dict[str, Any]:
    signals = reference_signals(model.sample_rate)
    goldens = {"schema": SCHEMA, "version": SCHEMA_VERSION, "made_by": {"canary_convert": __version__},
               "precision": _precision(model), "prompt_ids": model.prompt_ids(),
               "signals": [_run(model, signal) for signal in signals]}
    goldens["digest"] = digest(goldens)
    return goldens


def digest(goldens: Mapping[str, Any]) -> str:
    body = {key: value for key, value in goldens.items() if key != "digest"}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write(path: Path, goldens: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(goldens, separators=(",", ":")) + "\n")


def is_speech_llm_goldens(goldens: Any) -> bool:
    return isinstance(goldens, dict) and goldens.get("schema") == SCHEMA


def problems(goldens: Mapping[str, Any], model: SpeechLLM) -> tuple[list[str], list[str]]:
    """(failures, advisories) of the folder's model against its goldens."""
    if goldens.get("version") != SCHEMA_VERSION or goldens.get("digest") != digest(goldens):
        return ["goldens.json: another schema version, or its content does not match its digest"], []
    limits = TOLERANCES[_precision(model)]
    failures, advisories = [], []
    if goldens["prompt_ids"] != model.prompt_ids():
        failures.append("prompt ids differ (the tokenizer changed)")
    for index, (want, signal) in enumerate(zip(goldens["signals"], reference_signals(model.sample_rate))):
        now = _run(model, signal)
        where = f"signal {index}"
        if now["frames"] != want["frames"]:
            failures.append(f"{where}: {now['frames']} audio frames, {want['frames']} recorded")
            continue
        if (gap := _max_difference(now["embeddings"], want["embeddings"])) > limits["embeddings"]:
            failures.append(f"{where}: audio embeddings differ by {gap:.2e} (limit {limits['embeddings']:g})")
        if now["top_ids"][:1] != want["top_ids"][:1] or \
                (gap := _max_difference(now["top_logprobs"], want["top_logprobs"])) > limits["logprobs"]:
            failures.append(f"{where}: the LLM's log-probs after the prompt moved (limit {limits['logprobs']:g})")
        step = next((n for n, (a, b) in enumerate(zip(now["tokens"], want["tokens"])) if a != b), None)
        if step is None and len(now["tokens"]) != len(want["tokens"]):
            step = min(len(now["tokens"]), len(want["tokens"]))
        if step is not None:
            tie = step < len(want["gaps"]) and want["gaps"][step] <= NEAR_TIE
            (advisories if tie else failures).append(f"{where}: greedy tokens differ from step {step}"
                                                     + (" (a near tie when recorded)" if tie else ""))
    return failures, advisories


def _max_difference(now: Sequence[Any], want: Sequence[Any]) -> float:
    return float(np.abs(np.asarray(now, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max())
