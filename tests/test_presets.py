"""Family detection and config.json derivation, checked against the NeMo models themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from canary_convert.archive import open_archive
from canary_convert.errors import UnsupportedModelError
from canary_convert.presets import Derived, derive_config, detect_preset

FAMILIES = {"canary-sub8": "canary-1b", "canary2-proj-sub4": "canary-flash", "canary2-bpe-sub16": "canary-1b-v2"}


def _derive(path: Path, edit=None) -> Derived:
    with open_archive(path) as archive:
        config = archive.config()
        if edit is not None:
            edit(config)
        with archive.state_dict() as state:
            return derive_config(detect_preset(config), config, state, archive.artifacts(config))


@pytest.mark.parametrize("variant", sorted(FAMILIES))
def test_config_matches_the_nemo_model(checkpoints: dict[str, Path], variant: str) -> None:
    from nemo.collections.asr.models import EncDecMultiTaskModel

    derived = _derive(checkpoints[variant])
    nemo = EncDecMultiTaskModel.restore_from(str(checkpoints[variant]), map_location="cpu")
    config = derived.config
    assert derived.preset.name == config.family == FAMILIES[variant]
    assert config.prompt_format == nemo.prompt_format
    featurizer = nemo.preprocessor.featurizer
    assert config.preprocessor.win_length == featurizer.win_length
    assert config.preprocessor.hop_length == featurizer.hop_length
    assert config.preprocessor.fft_size == featurizer.n_fft
    assert config.preprocessor.features == featurizer.nfilt
    assert config.preprocessor.log_zero_guard_value == featurizer.log_zero_guard_value
    assert config.preprocessor.pad_to == featurizer.pad_to
    encoder = nemo.encoder
    assert config.encoder.d_model == encoder.d_model
    assert config.encoder.n_layers == len(encoder.layers)
    assert config.encoder.n_heads == encoder.layers[0].self_attn.h
    assert config.encoder.subsampling_factor == encoder.subsampling_factor
    assert config.encoder.conv_kernel_size == encoder.layers[0].conv.depthwise_conv.kernel_size[0]
    assert config.encoder.xscaling == (encoder.xscale is not None)
    assert config.encoder_decoder_proj == isinstance(nemo.encoder_decoder_proj, torch.nn.Linear)
    decoder = nemo.transf_decoder
    assert config.decoder.hidden_size == decoder.hidden_size
    assert config.decoder.num_layers == len(decoder._decoder.layers)
    assert config.decoder.num_attention_heads == decoder._decoder.layers[0].first_sub_layer.num_attention_heads
    assert config.decoder.inner_size == decoder._decoder.layers[0].third_sub_layer.dense_in.out_features
    assert config.decoder.vocab_size == nemo.log_softmax.mlp.layer0.out_features
    assert config.decoder.vocab_size % 8 == 0 and config.decoder.vocab_size >= nemo.tokenizer.vocab_size
    assert config.decoder.max_sequence_length == decoder._embedding.position_embedding.pos_enc.shape[0]
    assert config.decoding.beam_size == nemo.cfg.decoding.beam.beam_size


def test_aggregate_tokenizer_layout_keeps_config_order(checkpoint: Path) -> None:
    derived = _derive(checkpoint)
    assert derived.config.tokenizer.type == "aggregate"
    assert list(derived.config.tokenizer.langs) == ["spl_tokens", "en", "de"]
    assert derived.config.tokenizer.langs["en"] == "tokenizer/en/tokenizer.model"
    assert set(derived.tokenizer_files) == {
        f"tokenizer/{lang}/{name}" for lang in ("spl_tokens", "en", "de")
        for name in ("tokenizer.model", "tokenizer.vocab", "vocab.txt")
    }


def test_single_bpe_tokenizer_layout(checkpoints: dict[str, Path]) -> None:
    derived = _derive(checkpoints["canary2-bpe-sub16"])
    assert derived.config.tokenizer.type == "bpe"
    assert derived.config.tokenizer.model == "tokenizer/tokenizer.model"
    assert "tokenizer/tokenizer.model" in derived.tokenizer_files


def test_unsupported_setting_is_named(checkpoint: Path) -> None:
    with pytest.raises(UnsupportedModelError, match=r"encoder.subsampling='striding'; the bundled MLX model supports 'dw_striding'"):
        _derive(checkpoint, lambda config: config["encoder"].update(subsampling="striding"))


@pytest.mark.parametrize(("section", "value"), [
    ("transf_decoder", "nemo.collections.asr.modules.transformer.TransformerDecoderNM"),
    ("head", "nemo.collections.asr.parts.submodules.token_classifier.SequenceClassifier"),
])
def test_other_decoder_or_head_classes_are_refused_by_name(checkpoint: Path, section: str, value: str) -> None:
    # NeMo builds these sections from their _target_; any other class would have other weight names.
    with pytest.raises(UnsupportedModelError, match=rf"{section}._target_='{value}'; the bundled MLX model supports"):
        _derive(checkpoint, lambda config: config[section].update(_target_=value))


def test_unknown_model_is_refused(checkpoint: Path) -> None:
    def make_classifier(config: dict) -> None:
        config["target"] = "nemo.collections.asr.models.classification_models.EncDecClassificationModel"

    with pytest.raises(UnsupportedModelError, match=r"no preset matches this checkpoint \(target='nemo.collections.asr.models.classification_models"):
        _derive(checkpoint, make_classifier)


def test_a_family_preset_refuses_what_its_model_cannot_run(checkpoint: Path) -> None:
    # Detected as the CTC family by its class, refused by name for the Canary checkpoint's aggregate tokenizer.
    def make_ctc(config: dict) -> None:
        config["target"] = "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"

    with pytest.raises(UnsupportedModelError, match=r"ctc-bpe: model_config.yaml has tokenizer.type='agg'"):
        _derive(checkpoint, make_ctc)


def test_missing_required_field_is_named(checkpoint: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="model_config.yaml lacks encoder.d_model"):
        _derive(checkpoint, lambda config: config["encoder"].pop("d_model"))
