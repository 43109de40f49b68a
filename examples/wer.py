"""Word error rate: word-level edit distance over the reference word count, summed over utterances."""

from __future__ import annotations

from collections.abc import Sequence


def word_errors(reference: str, hypothesis: str) -> int:
    """Substitutions + insertions + deletions between two whitespace-split word sequences."""
    ref, hyp = reference.split(), hypothesis.split()
    distance = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        diagonal, distance[0] = distance[0], i
        for j, hyp_word in enumerate(hyp, 1):
            diagonal, distance[j] = distance[j], min(distance[j] + 1, distance[j - 1] + 1, diagonal + (ref_word != hyp_word))
    return distance[len(hyp)]


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    words = sum(len(ref.split()) for ref in references)
    return sum(word_errors(r, h) for r, h in zip(references, hypotheses)) / max(words, 1)
