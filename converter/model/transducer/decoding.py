"""NeMo's default transducer decoding, `greedy_batch` with label looping, for RNNT and TDT, in MLX.

Followed line by line from NeMo 3.0's torch implementations (parts/submodules/transducer_decoding/
rnnt_label_looping.py and tdt_label_looping.py, `torch_impl`): the whole batch advances together; for each
utterance the outer loop finds its next label, the inner loop moves past blanks (RNNT: one frame; TDT: the
predicted duration, at least one frame for a blank) until a label or the end; the prediction network runs once
per outer step for the utterances that found one; after `max_symbols` labels on one frame the frame is left.
Results are kept on the device and read back once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..cpu import label_looping
from .network import Joint, LSTMState, PredictionNetwork


@dataclass(frozen=True)
class TransducerHypothesis:
    """One utterance's greedy result: the labels, the encoder frame each was emitted on, and for TDT the
    duration NeMo stores beside each (what its timestamps' end offsets read)."""

    tokens: list[int]
    frames: list[int]
    durations: list[int]


def _replace_rows(mask: mx.array, new: LSTMState, old: LSTMState) -> LSTMState:
    """NeMo's batch_replace_states_mask: rows where `mask` holds take the new state."""
    rows = mask[None, :, None]
    return mx.where(rows, new[0], old[0]), mx.where(rows, new[1], old[1])


# NeMo's `max_symbols: null` lets one frame take labels without end, which a folder's weights could make a search
# that never ends (`verify` runs folders it does not trust); here a frame takes at most this many, far more than
# a trained model emits on one.
UNBOUNDED_SYMBOLS = 1000


def greedy_batch(prediction: PredictionNetwork, joint: Joint, encoded: mx.array, lengths: mx.array, blank: int,
                 max_symbols: int | None, durations: list[int] | None = None) -> list[TransducerHypothesis]:
    """Greedy label-looping decoding of encoder states (B, T, E) with valid `lengths` (B,).

    `durations` (TDT) are the values of the joint's duration outputs, which follow its V+1 token logits. On an
    x86 CPU the loop runs in C (cpu/label_looping.py) where it can, else in MLX (`greedy_batch_mlx`).
    """
    bound = UNBOUNDED_SYMBOLS if max_symbols is None else max_symbols
    prepared = label_looping.network(prediction, joint, durations or [])
    if prepared is None:
        return greedy_batch_mlx(prediction, joint, encoded, lengths, blank, bound, durations)
    rows = label_looping.decode(prepared, joint.enc(encoded), lengths, blank, bound)
    return [TransducerHypothesis(tokens, frames, stored if durations else []) for tokens, frames, stored in rows]


def greedy_batch_mlx(prediction: PredictionNetwork, joint: Joint, encoded: mx.array, lengths: mx.array, blank: int,
                     max_symbols: int, durations: list[int] | None = None) -> list[TransducerHypothesis]:
    """`greedy_batch` as MLX operations, the batch kept on the device and read back once, at the end."""
    tdt = bool(durations)
    batch = encoded.shape[0]
    lengths = lengths.astype(mx.int32)
    enc = joint.enc(encoded)  # NeMo projects the encoder output once
    tokens = blank + 1  # token logits, blank last; TDT's duration logits follow
    duration_values = mx.array(durations or [1], dtype=mx.int32)
    last_frame = mx.maximum(lengths - 1, 0)
    time = mx.zeros((batch,), dtype=mx.int32)
    safe_time = mx.minimum(time, last_frame)
    active = time < lengths

    state = prediction.initial_state(batch, enc.dtype)
    labels = mx.full((batch,), blank, dtype=mx.int32)  # start of sequence: the blank (a zero embedding)
    output, state = prediction(labels, state)
    pred = joint.pred(output)

    last_label_frame = mx.full((batch,), -1, dtype=mx.int32)
    labels_on_frame = mx.zeros((batch,), dtype=mx.int32)
    stored: list[tuple[mx.array, mx.array, mx.array, mx.array]] = []

    def step(safe: mx.array) -> tuple[mx.array, mx.array]:
        """Best label and (TDT) duration at each utterance's frame, given its last prediction output."""
        frames = mx.take_along_axis(enc, safe[:, None, None], axis=1)[:, 0]
        logits = joint(frames, pred)
        best = mx.argmax(logits[:, :tokens], axis=-1).astype(mx.int32)
        if not tdt:
            return best, mx.zeros_like(best)
        return best, duration_values[mx.argmax(logits[:, tokens:], axis=-1)]

    while mx.any(active).item():
        active_before = active
        labels, duration = step(safe_time)
        blank_mask = labels == blank
        label_time = time
        if tdt:
            # a blank with predicted duration 0 still advances one frame
            duration = mx.where(mx.logical_and(duration == 0, blank_mask), 1, duration)
            time = time + duration * active
        else:
            time = time + blank_mask
        safe_time = mx.minimum(time, last_frame)
        active = time < lengths
        advance = mx.logical_and(active, blank_mask)

        while mx.any(advance).item():
            label_time = mx.where(advance, time, label_time)
            more_labels, more_duration = step(safe_time)
            labels = mx.where(advance, more_labels, labels)
            blank_mask = labels == blank
            if tdt:
                # NeMo takes every row's duration from this call, found labels' rows too (tdt_label_looping.py):
                # what it stores beside a label can come from a later frame when another row was advancing.
                duration = mx.where(mx.logical_and(more_duration == 0, blank_mask), 1, more_duration)
                time = mx.where(advance, time + duration, time)
            else:
                time = time + blank_mask
            safe_time = mx.minimum(time, last_frame)
            active = time < lengths
            advance = mx.logical_and(active, blank_mask)

        # RNNT keeps an utterance with a label active until a blank ends it; TDT's duration may end it at once.
        found = mx.logical_and(active_before, mx.logical_not(blank_mask)) if tdt else active
        stored.append((found, labels, label_time, duration))
        same_frame = last_label_frame == label_time
        labels_on_frame = mx.where(mx.logical_and(found, same_frame), labels_on_frame + 1,
                                   mx.where(found, 1, labels_on_frame))
        last_label_frame = mx.where(found, label_time, last_label_frame)

        new_output, new_state = prediction(labels, state)
        state = _replace_rows(found, new_state, state)
        pred = mx.where(found[:, None], joint.pred(new_output), pred)

        force = mx.logical_and(mx.logical_and(active, mx.logical_not(blank_mask)),
                               mx.logical_and(labels_on_frame >= max_symbols, last_label_frame == time))
        time = time + force
        safe_time = mx.minimum(time, last_frame)
        active = time < lengths
        mx.eval(time, active, safe_time, pred, state)

    return _hypotheses(stored, batch, tdt)


def _hypotheses(stored: list[tuple[mx.array, ...]], batch: int, tdt: bool) -> list[TransducerHypothesis]:
    if not stored:
        return [TransducerHypothesis([], [], []) for _ in range(batch)]
    found, labels, frames, durations = (np.array(mx.stack(column)) for column in zip(*stored))
    results = []
    for row in range(batch):
        keep = found[:, row]
        results.append(TransducerHypothesis(labels[keep, row].tolist(), frames[keep, row].tolist(),
                                            durations[keep, row].tolist() if tdt else []))
    return results
