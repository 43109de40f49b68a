"""Joining overlapping chunks: our merge against NeMo's own functions, on many token sequences.

NeMo's parallel long-form path (canary-1b-v2) joins chunks with `merge_parallel_chunks`, which leans on
`lcs_alignment_merge_buffer` and `longest_common_subsequence_merge`; both are called here directly, on
random sequences and on the case chunking makes (a chunk that starts by repeating the previous one's end,
with a few tokens changed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nemo.collections.asr.parts.utils.chunking_utils import merge_parallel_chunks
from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis
from nemo.collections.asr.parts.utils.streaming_utils import (
    lcs_alignment_merge_buffer,
    longest_common_subsequence_merge,
)

from canary_convert.model.app.merge import merge_chunk_tokens, overlap, splice
from canary_convert.parity import restore_nemo

PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A small alphabet makes common runs (and NeMo's partial-overlap branch) frequent.
TOKENS = st.lists(st.integers(0, 5), max_size=30)


@PROPERTY
@given(old=TOKENS.filter(bool), new=TOKENS)
def test_overlap_is_nemos(old: list[int], new: list[int]) -> None:
    expected, _ = longest_common_subsequence_merge(old, new)
    assert list(overlap(old, new)) == expected


def _nemo_splice(merged: list[int], head: list[int], frames_per_second: int) -> list[int]:
    return lcs_alignment_merge_buffer(list(merged), list(head), frames_per_second, model=None,
                                      max_steps_per_timestep=2, min_lcs_length=1, parallel_chunking=True)


@PROPERTY
@given(merged=TOKENS, head=st.lists(st.integers(0, 5), max_size=15), frames_per_second=st.sampled_from([6, 12, 25]))
def test_splice_is_nemos(merged: list[int], head: list[int], frames_per_second: int) -> None:
    keep, skip = splice(merged, head, frames_per_second)
    assert merged[:keep] + head[skip:] == _nemo_splice(merged, head, frames_per_second)


@pytest.fixture(scope="module")
def nemo(checkpoints: dict[str, Path]) -> Any:
    """A single-SentencePiece model (canary-1b-v2's layout), whose decoding turns merged tokens into text."""
    return restore_nemo(checkpoints["canary2-bpe-sub16"])


@st.composite
def overlapping_chunks(draw: st.DrawFn) -> list[list[int]]:
    """Windows over one token stream that overlap, each with a few tokens changed: what chunks decode to."""
    stream = draw(st.lists(st.integers(20, 60), min_size=20, max_size=120))
    chunks, start = [], 0
    while start < len(stream):
        size = draw(st.integers(8, 40))
        chunk = list(stream[start : start + size])
        for _ in range(draw(st.integers(0, 3))):
            if chunk:
                chunk[draw(st.integers(0, len(chunk) - 1))] = draw(st.integers(20, 60))
        chunks.append(chunk)
        start += max(size - draw(st.integers(0, 12)), 1)
    return chunks


@PROPERTY
@given(chunks=overlapping_chunks(), subsampling=st.sampled_from([4, 8, 16]))
def test_chunks_merge_as_nemo_merges_them(nemo: Any, chunks: list[list[int]], subsampling: int) -> None:
    hypotheses = [Hypothesis(score=0.0, y_sequence=torch.tensor(chunk, dtype=torch.long)) for chunk in chunks]
    merged = merge_parallel_chunks(hypotheses, encoded_len=torch.tensor([len(c) for c in chunks]), model=nemo,
                                   timestamps=False, subsampling_factor=subsampling, window_stride=0.01,
                                   decoding=nemo.decoding)
    ours, owners = merge_chunk_tokens(chunks, subsampling)
    # NeMo keeps only the text of its merged tokens; the same decoding of ours must give that text.
    assert nemo.decoding.decode_tokens_to_str(ours) == merged.text
    assert torch.cat([h.y_sequence for h in hypotheses]).tolist() == merged.y_sequence.tolist()
    # Every merged token comes from one chunk, in chunk order.
    assert owners == sorted(owners) and len(owners) == len(ours)
