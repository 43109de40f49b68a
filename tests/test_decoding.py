"""MLX greedy and beam search against NeMo 3.0's own decoding, token for token, on every tiny variant.

Both decoders get the same input: NeMo's encoder output (after encoder_decoder_proj) for three seeded
random waveforms of different lengths, and the same prompt ids from NeMo's prompt formatter. Expected
tokens always come from NeMo (`decode_predictions_tensor`), never from our own output.

Random tiny decoders barely look at their input (init std 0.02 against a randomised head bias), so besides
the checkpoint as built ("plain"), the same change is applied to both models: decoder weight matrices x5
and head bias x0.1 ("sharp": varied tokens, real beam re-ranking), plus a raised EOS bias ("eos": rows
stop at different steps, so stopping, padding after EOS and the length penalty matter) or a raised pad
bias ("pad": greedy search feeds generated pads back, beam search ends hypotheses on them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
import torch
from lhotse.dataset.collation import collate_vectors
from mlx.utils import tree_flatten, tree_unflatten
from omegaconf import OmegaConf

from canary_convert import load_model
from canary_convert.convert import ConvertOptions, convert
from canary_convert.model.aed.canary import CanaryModel
from canary_convert.model.aed.decoding import (
    Decoded,
    DecodingOptions,
    decode,
    decode_beam,
    decode_greedy,
    length_penalty_factor,
    max_generation_length,
)
from factory import VARIANTS

SAMPLES = (16000, 9000, 12000)  # three utterances of different lengths, so encoder padding is exercised
# scenario: (decoder weight gain, head bias scale, special token whose bias is raised or None)
SCENARIOS = {"plain": (1.0, 1.0, None), "sharp": (5.0, 0.1, None), "eos": (5.0, 0.1, "eos"), "pad": (5.0, 0.1, "pad")}
SHIFTS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)  # bias raises tried in order for "eos" and "pad"
MODES = {  # name: DecodingOptions (NeMo reads beam.length_penalty; the checkpoints' len_pen is ignored)
    "greedy-d20": DecodingOptions("greedy", 1, 0.0, 20),
    "greedy-full": DecodingOptions("greedy", 1, 0.0, -1),
    "beam1-d20": DecodingOptions("beam", 1, 0.0, 20),
    "beam1-full": DecodingOptions("beam", 1, 0.0, -1),
    "beam4-lp0.5-d20": DecodingOptions("beam", 4, 0.5, 20),
    "beam4-lp1.3-full": DecodingOptions("beam", 4, 1.3, -1),
}


@dataclass
class Pair:
    """One variant as a NeMo model and its MLX conversion, with the inputs both decoders share."""

    nemo: Any
    mlx: CanaryModel
    nemo_weights: dict[str, torch.Tensor]  # pristine decoder matrices and head bias, NeMo side
    mlx_weights: dict[str, mx.array]  # the same tensors, MLX side
    encoded: torch.Tensor  # (3, T, H) NeMo encoder output after encoder_decoder_proj
    enc_lengths: torch.Tensor
    enc_mask: torch.Tensor
    prompts: list[list[int]]  # different lengths for canary2 (right-padded in the batch)
    even_prompts: list[list[int]]  # one length for every utterance
    eos: int
    pad: int
    shifts: dict[str, float] = field(default_factory=dict)  # scenario -> bias raise, found from NeMo on first use


def _prompts(nemo: Any, contexts: bool) -> list[list[int]]:
    """Per-utterance prompts from NeMo's own formatter.

    With `contexts`, canary2 prompts carry decoder contexts of different lengths, so the batch needs padding;
    without, every prompt has the same length (only languages and flags differ).
    """
    if nemo.prompt_format == "canary":
        slots = [dict(source_lang="en", task="asr", target_lang="en", pnc="yes"),
                 dict(source_lang="de", task="s2t_translation", target_lang="en", pnc="no"),
                 dict(source_lang="en", task="s2t_translation", target_lang="de", pnc="yes")]
    else:
        common = dict(emotion="<|emo:undefined|>", itn="no", timestamp="no", diarize="no")
        texts = ("", "the cat sat", "hallo") if contexts else ("", "", "")
        slots = [dict(common, decodercontext=texts[0], source_lang="en", target_lang="en", pnc="yes"),
                 dict(common, decodercontext=texts[1], source_lang="en", target_lang="en", pnc="no"),
                 dict(common, decodercontext=texts[2], source_lang="de", target_lang="en", pnc="yes")]
    return [nemo.prompt.encode_dialog(turns=[{"role": "user", "slots": s}])["context_ids"].tolist() for s in slots]


def _nemo_matrices(nemo: Any) -> dict[str, torch.nn.Parameter]:
    """The decoder blocks' weight matrices (attention and feed-forward), NeMo side."""
    return {n: p for n, p in nemo.transf_decoder.decoder.named_parameters() if p.dim() == 2}


def _mlx_matrices(model: CanaryModel) -> dict[str, mx.array]:
    """The same matrices in the MLX decoder (token and position tables are not in `blocks`)."""
    return {n: a for n, a in tree_flatten(model.decoder.parameters()) if n.startswith("blocks.") and a.ndim == 2}


@pytest.fixture(scope="module")
def pairs(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """Every variant restored in NeMo and converted to MLX, with NeMo's encoder output for 3 waveforms."""
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(logging.ERROR)
    result = {}
    for name, path in checkpoints.items():
        nemo = EncDecMultiTaskModel.restore_from(str(path), map_location="cpu").eval()
        out = tmp_path_factory.mktemp("decoding") / name
        convert(str(path), out, ConvertOptions())
        model = load_model(out)
        generator = torch.Generator().manual_seed(1234)
        audio = torch.zeros(len(SAMPLES), max(SAMPLES))
        for row, count in enumerate(SAMPLES):
            audio[row, :count] = 0.1 * torch.randn(count, generator=generator)
        with torch.no_grad():
            _, enc_lengths, encoded, enc_mask = nemo.forward(
                input_signal=audio, input_signal_length=torch.tensor(SAMPLES)
            )
        nemo_weights = {n: p.detach().clone() for n, p in _nemo_matrices(nemo).items()}
        nemo_weights["head.bias"] = nemo.log_softmax.mlp.layer0.bias.detach().clone()
        mlx_weights = dict(_mlx_matrices(model))
        mlx_weights["head.bias"] = model.decoder.output_bias
        assert len(nemo_weights) == len(mlx_weights) > 1
        tokenizer = nemo.tokenizer
        result[name] = Pair(nemo, model, nemo_weights, mlx_weights, encoded, enc_lengths, enc_mask,
                            _prompts(nemo, contexts=True), _prompts(nemo, contexts=False), tokenizer.eos, tokenizer.pad)
    return result


def _tune(pair: Pair, gain: float, bias_scale: float, token: int | None = None, shift: float = 0.0) -> None:
    """Apply one identical change to both models, always starting from the pristine weights."""
    with torch.no_grad():
        for name, param in _nemo_matrices(pair.nemo).items():
            param.copy_(pair.nemo_weights[name] * gain)
        bias = pair.nemo_weights["head.bias"] * bias_scale
        if token is not None:
            bias[token] += shift
        pair.nemo.log_softmax.mlp.layer0.bias.copy_(bias)
    matrices = [(name, pair.mlx_weights[name] * gain) for name in _mlx_matrices(pair.mlx)]
    pair.mlx.decoder.update(tree_unflatten(matrices))
    bias = pair.mlx_weights["head.bias"] * bias_scale
    if token is not None:
        bias = mx.where(mx.arange(bias.shape[0]) == token, bias + shift, bias)
    pair.mlx.decoder.output_bias = bias


def _nemo_decode(
    pair: Pair, options: DecodingOptions, rows: slice | None = None, trim: bool = False,
    prompts: list[list[int]] | None = None,
) -> list[list[int]]:
    """NeMo's y_sequence per utterance, with the strategy set through change_decoding_strategy.

    Prompts are right-padded with lhotse's collate_vectors and the tokenizer's pad id, as NeMo's prompted
    dataset batches them. `trim` decodes a single utterance with its encoder states cut to its own length.
    """
    rows = rows or slice(None)
    cfg = {"strategy": options.strategy,
           "greedy": {"max_generation_delta": options.generation_delta if options.is_greedy else -1},
           "beam": {"beam_size": options.beam_size, "length_penalty": options.length_penalty,
                    "max_generation_delta": options.max_generation_delta}}
    pair.nemo.change_decoding_strategy(OmegaConf.create(cfg))
    encoded, mask = pair.encoded[rows], pair.enc_mask[rows]
    if trim:
        frames = int(pair.enc_lengths[rows].max())
        encoded, mask = encoded[:, :frames], mask[:, :frames]
    batch = collate_vectors([torch.tensor(p) for p in (prompts or pair.prompts)[rows]], padding_value=pair.pad)
    hypotheses = pair.nemo.decoding.decode_predictions_tensor(
        encoder_hidden_states=encoded, encoder_input_mask=mask, decoder_input_ids=batch
    )
    return [h.y_sequence.tolist() for h in hypotheses]


def _decoded(
    pair: Pair, options: DecodingOptions, rows: slice | None = None, trim: bool = False,
    prompts: list[list[int]] | None = None,
) -> list[Decoded]:
    """Our decode() on exactly the input `_nemo_decode` gets."""
    rows = rows or slice(None)
    encoded, lengths = pair.encoded[rows], pair.enc_lengths[rows]
    if trim:
        encoded = encoded[:, : int(lengths.max())]
    return decode(pair.mlx, mx.array(encoded.numpy()), mx.array(lengths.numpy()), (prompts or pair.prompts)[rows],
                  options, pair.eos, pair.pad)


def _ours(pair: Pair, options: DecodingOptions, rows: slice | None = None, trim: bool = False,
          prompts: list[list[int]] | None = None) -> list[list[int]]:
    return [row.tokens for row in _decoded(pair, options, rows, trim, prompts)]


def _budget(pair: Pair, delta: int) -> int:
    return max_generation_length(pair.mlx.decoder.max_sequence_length, pair.encoded.shape[1],
                                 max(len(p) for p in pair.prompts), delta)


def _wanted(pair: Pair, scenario: str, outputs: list[list[int]], budget: int) -> bool:
    """Whether NeMo's greedy rows show what `scenario` is for.

    eos: one row ends with EOS after some real tokens while another runs longer;
    pad: a pad inside a row (greedy search feeds a generated pad back and goes on; beam search stops there).
    """
    if scenario == "eos":
        lengths = [len(y) for y in outputs]
        return any(0 < n < budget for n in lengths) and len(set(lengths)) > 1
    return any(pair.pad in y for y in outputs)


def _setup(pair: Pair, scenario: str) -> None:
    """Put both models in `scenario`; for "eos"/"pad", the smallest bias raise that shows it in NeMo."""
    gain, bias_scale, special = SCENARIOS[scenario]
    if special is None:
        _tune(pair, gain, bias_scale)
        return
    token = pair.eos if special == "eos" else pair.pad
    if scenario not in pair.shifts:
        greedy = MODES["greedy-d20"]  # the smaller budget: what happens within it happens within both
        budget = _budget(pair, greedy.max_generation_delta)
        for shift in SHIFTS:
            _tune(pair, gain, bias_scale, token, shift)
            if _wanted(pair, scenario, _nemo_decode(pair, greedy), budget):
                pair.shifts[scenario] = shift
                break
        else:
            pytest.fail(f"no {special} bias raise in {SHIFTS} shows the {scenario!r} case: tiny checkpoints changed")
    _tune(pair, gain, bias_scale, token, pair.shifts[scenario])


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tokens_match_nemo(pairs: dict[str, Pair], variant: str, scenario: str, mode: str) -> None:
    """Same batch, same prompts: our y_sequence per utterance equals NeMo's, for every strategy."""
    pair = pairs[variant]
    _setup(pair, scenario)
    expected = _nemo_decode(pair, MODES[mode])
    assert _ours(pair, MODES[mode]) == expected
    if scenario in ("eos", "pad") and mode.startswith("greedy"):
        budget = _budget(pair, MODES[mode].max_generation_delta)
        assert _wanted(pair, scenario, expected, budget), f"NeMo's output does not show the {scenario!r} case"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_length_budget_is_nemos(pairs: dict[str, Pair], variant: str) -> None:
    """NeMo's greedy search stops at max_generation_length tokens, beam search one token later."""
    pair = pairs[variant]
    _setup(pair, "sharp")  # rows rarely meet EOS here, so most run into the limit
    for delta in (20, -1):
        budget = _budget(pair, delta)
        greedy = [len(y) for y in _nemo_decode(pair, DecodingOptions("greedy", 1, 0.0, delta))]
        beam = [len(y) for y in _nemo_decode(pair, DecodingOptions("beam", 1, 0.0, delta))]
        assert max(greedy) == budget and max(beam) == budget + 1, (greedy, beam, budget)
        # Ours says which rows the budget cut short: exactly those of NeMo's full length.
        for strategy, full, seen in (("greedy", budget, greedy), ("beam", budget + 1, beam)):
            decoded = _decoded(pair, DecodingOptions(strategy, 1, 0.0, delta))
            assert [not row.ended for row in decoded] == [n == full for n in seen]


@pytest.mark.parametrize("scenario", ["sharp", "eos", "pad"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batched_equals_alone(pairs: dict[str, Pair], variant: str, scenario: str) -> None:
    """Decoding a batch gives, per utterance, what NeMo gives for that utterance alone, where NeMo agrees.

    That needs prompts of one length (padding moves the positions of the shorter ones) and
    max_generation_delta = -1 (the budget otherwise follows the batch's padded encoder length); beam
    size 4 also needs `tile_prompt_cache=False`. Alone, with encoder states cut to their own length, each
    utterance matches NeMo with a delta too.
    """
    pair = pairs[variant]
    _setup(pair, scenario)
    prompts = pair.even_prompts
    encoded, lengths = mx.array(pair.encoded.numpy()), mx.array(pair.enc_lengths.numpy())
    greedy, beam1, beam4 = MODES["greedy-full"], MODES["beam1-full"], MODES["beam4-lp1.3-full"]
    alone = {name: [_nemo_decode(pair, options, slice(i, i + 1), trim=True, prompts=prompts)[0]
                    for i in range(len(SAMPLES))]
             for name, options in (("greedy", greedy), ("beam1", beam1), ("beam4", beam4))}
    def tokens(decoded: list[Decoded]) -> list[list[int]]:
        return [row.tokens for row in decoded]

    assert tokens(decode_greedy(pair.mlx, encoded, lengths, prompts, pair.eos, pair.pad, -1)) == alone["greedy"]
    assert tokens(decode_beam(pair.mlx, encoded, lengths, prompts, pair.eos, pair.pad, -1, 1, 0.0)) == alone["beam1"]
    assert tokens(decode_beam(pair.mlx, encoded, lengths, prompts, pair.eos, pair.pad, -1, 4, 1.3,
                              tile_prompt_cache=False)) == alone["beam4"]
    for options in (MODES["greedy-d20"], MODES["beam4-lp0.5-d20"]):
        for i in range(len(SAMPLES)):
            rows = slice(i, i + 1)
            assert _ours(pair, options, rows, trim=True) == _nemo_decode(pair, options, rows, trim=True)


def test_nemo_beam_batches_mix_prompt_caches(pairs: dict[str, Pair]) -> None:
    """Guard for the quirk `tile_prompt_cache` mirrors: NeMo's batched beam-4 result differs from alone.

    If a NeMo release fixes its cache layout this fails, and the default should then change.
    """
    pair = pairs["canary-sub8"]
    _setup(pair, "sharp")
    options = MODES["beam4-lp1.3-full"]
    batched = _nemo_decode(pair, options)
    alone = [_nemo_decode(pair, options, slice(i, i + 1), trim=True)[0] for i in range(len(SAMPLES))]
    assert batched != alone
    assert _ours(pair, options) == batched


def test_budget_below_prompt(pairs: dict[str, Pair]) -> None:
    """A budget at or below zero: beam search still takes its first step, greedy search takes none.

    NeMo's greedy path then fails in format_hypotheses (it indexes the empty result); we return nothing.
    """
    pair = pairs["canary2-bpe-sub16"]  # 16x subsampling: fewer encoder frames than prompt tokens
    _setup(pair, "sharp")
    assert _budget(pair, 0) <= 0
    beam = DecodingOptions("beam", 4, 0.5, 0)
    expected = _nemo_decode(pair, beam)
    assert all(len(y) <= 1 for y in expected)
    assert _ours(pair, beam) == expected
    with pytest.raises(IndexError):
        _nemo_decode(pair, DecodingOptions("greedy", 1, 0.0, 0))
    assert _ours(pair, DecodingOptions("greedy", 1, 0.0, 0)) == [[]] * len(SAMPLES)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0, -1.0, 0.7, 1.3])
def test_length_penalty_matches_torch(alpha: float) -> None:
    """((5 + len) / 6) ** alpha as NeMo computes it: bit-equal where torch special-cases the exponent."""
    lengths = torch.arange(3, 15, dtype=torch.float32).view(-1, 1)  # a beam's worth of rows
    expected = ((5 + lengths) / 6).pow(alpha).numpy()
    ours = length_penalty_factor(mx.array(lengths.numpy()), alpha)
    if alpha in (0.0, 0.5, 1.0, 2.0, -1.0):
        assert (ours.tolist() == expected.tolist())
    else:
        assert mx.allclose(ours, mx.array(expected), rtol=2e-7, atol=0).item()


def test_options() -> None:
    """DecodingOptions: NeMo's defaults, its strategy names, and each strategy's own length budget."""
    from canary_convert.model.config import DecodingConfig

    assert DecodingOptions() == DecodingOptions("beam", 1, 0.0, -1)
    config = DecodingConfig(strategy="greedy", beam_size=2, length_penalty=0.5, max_generation_delta=50,
                            greedy_max_generation_delta=15)
    options = DecodingOptions.from_config(config)
    assert options == DecodingOptions("greedy", 2, 0.5, 50, 15)
    # NeMo's change_strategy: greedy reads greedy.max_generation_delta, beam reads beam.max_generation_delta.
    assert options.generation_delta == 15
    assert replace(options, strategy="beam").generation_delta == 50
    assert DecodingOptions("greedy_batch", 1, 0.0, 8).generation_delta == 8
    with pytest.raises(ValueError, match="strategy"):
        DecodingOptions("sampling")
    with pytest.raises(ValueError, match="beam_size"):
        DecodingOptions("beam", 0)
