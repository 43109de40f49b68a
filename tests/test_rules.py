"""The mapping engine: rule parsing, transforms, and the coverage proof on real NeMo checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from canary_convert.archive import open_archive
from canary_convert.errors import MappingError, RulesFileError
from canary_convert.model.load import parameter_shapes
from canary_convert.presets import derive_config, detect_preset
from canary_convert.rules import load_rules, parse_rules, plan_conversion

MAPPING = load_rules("canary.yaml")


def _source_and_shapes(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    with open_archive(path) as archive:
        config = archive.config()
        with archive.state_dict() as state:
            state = {key: tensor.clone() for key, tensor in state.items()}
        derived = derive_config(detect_preset(config), config, state, archive.artifacts(config))
    return state, parameter_shapes(derived.config)


@pytest.fixture(scope="module")
def tiny(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    return _source_and_shapes(checkpoint)


def test_every_variant_is_fully_accounted_for(checkpoints: dict[str, Path]) -> None:
    for name, path in checkpoints.items():
        state, shapes = _source_and_shapes(path)
        plan = plan_conversion(MAPPING, state, shapes)
        mapped = {t.source_key for t in plan.tensors}
        dropped = {d.key for d in plan.dropped}
        assert mapped | dropped == set(state), name
        assert not mapped & dropped
        assert {t.target_key for t in plan.tensors} == set(shapes), name
        assert all(shapes[t.target_key] == t.target_shape for t in plan.tensors)
        # Dropped: one BatchNorm counter per encoder layer and the tied head weight, nothing else.
        assert sorted(dropped) == sorted(
            [k for k in state if k.endswith("num_batches_tracked")] + ["log_softmax.mlp.layer0.weight"]
        )
        has_proj = "encoder_decoder_proj.weight" in state
        assert has_proj == (name == "canary2-proj-sub4")
        assert plan.notes() == [], name  # only the optional projection rule may go unmatched


def test_conv_weights_are_laid_out_for_mlx(tiny: tuple[dict, dict]) -> None:
    state, shapes = tiny
    plan = {t.source_key: t for t in plan_conversion(MAPPING, state, shapes).tensors}
    conv2d = plan["encoder.pre_encode.conv.0.weight"]
    source = state["encoder.pre_encode.conv.0.weight"]  # torch (O, I, H, W)
    converted = conv2d.convert(source, torch.float32)
    assert converted.shape == (source.shape[0], source.shape[2], source.shape[3], source.shape[1])
    assert converted[3, 1, 2, 0] == source[3, 0, 1, 2]
    depthwise = state["encoder.layers.1.conv.depthwise_conv.weight"]  # torch (d, 1, k)
    converted = plan["encoder.layers.1.conv.depthwise_conv.weight"].convert(depthwise, torch.float32)
    assert converted.shape == (depthwise.shape[0], depthwise.shape[2], 1)
    assert torch.equal(converted[:, :, 0], depthwise[:, 0, :])
    fb = plan["preprocessor.featurizer.fb"]
    assert fb.target_key == "preprocessor.filterbank" and fb.target_shape == tuple(state[fb.source_key].shape[1:])
    assert fb.pinned_dtype == torch.float32  # features stay float32 whatever --dtype says
    assert plan["encoder.pre_encode.conv.0.weight"].pinned_dtype is None


def test_unknown_key_is_named(tiny: tuple[dict, dict]) -> None:
    state, shapes = tiny
    state = dict(state, **{"encoder.layers.0.mystery.weight": torch.zeros(3)})
    with pytest.raises(MappingError, match=r"no rule in canary\.yaml for source key\(s\) encoder\.layers\.0\.mystery\.weight"):
        plan_conversion(MAPPING, state, shapes)


def test_wrong_shape_is_named(tiny: tuple[dict, dict]) -> None:
    state, shapes = tiny
    key = "encoder.layers.1.feed_forward2.linear1.weight"
    state = dict(state, **{key: state[key][:-1]})
    with pytest.raises(MappingError, match=rf"{key} -> {key}: shape \(\d+, \d+\) .* the MLX model expects"):
        plan_conversion(MAPPING, state, shapes)


def test_missing_tensor_is_named(tiny: tuple[dict, dict]) -> None:
    state, shapes = tiny
    state = {k: v for k, v in state.items() if k != "encoder.layers.0.self_attn.pos_bias_u"}
    with pytest.raises(MappingError, match=r"no source key fills: encoder\.layers\.0\.self_attn\.pos_bias_u"):
        plan_conversion(MAPPING, state, shapes)


def test_untied_head_is_refused(tiny: tuple[dict, dict]) -> None:
    state, shapes = tiny
    state = dict(state, **{"log_softmax.mlp.layer0.weight": state["log_softmax.mlp.layer0.weight"] + 1})
    with pytest.raises(MappingError, match="tied copy of transf_decoder._embedding.token_embedding.weight, but the two tensors differ"):
        plan_conversion(MAPPING, state, shapes)


def test_unmatched_rule_is_reported(tiny: tuple[dict, dict]) -> None:
    state, shapes = tiny
    text = b"""name: test
rules:
  - match: never.{x}
    to: never.{x}
  - regex: '^(?P<key>.*)$'
    to: '{key}'
"""
    mapping = parse_rules(text, "test.yaml")
    state = {k: v for k, v in state.items() if "num_batches" not in k and not k.startswith(("log_softmax", "pre", "transf"))}
    with pytest.raises(MappingError):
        plan_conversion(mapping, state, shapes)  # renamed keys fit no MLX parameter: refused
    plan = plan_conversion(mapping, {}, {})
    assert plan.notes() == ["rule 1 (never.{x}) matched no key", "rule 2 (^(?P<key>.*)$) matched no key"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"rules: []", "expected 'name' and a list of 'rules'"),
        (b"name: x\nrules: [{match: a, to: b, drop: c}]", "exactly one of 'to'"),
        (b"name: x\nrules: [{to: b}]", "exactly one of 'match'"),
        (b"name: x\nrules: [{match: 'a.{n}', to: 'b.{m}'}]", r"uses \['m'\] that the pattern lacks"),
        (b"name: x\nrules: [{regex: '(', to: b}]", "bad regex"),
        (b"name: x\nrules: [{match: a, to: b, transforms: [rotate]}]", "unknown transform 'rotate'"),
        (b"name: x\nrules: [{match: a, to: b, dtype: int4}]", "dtype 'int4'"),
        (b"name: x\nrules: [{match: a, drop: gone, file: side.tensors}]", "'file' names where a renamed tensor"),
        (b"name: x\nquantize: ['^a\\.bias$']\nrules: []", "must end in"),
        (b"name: x\ncolour: red\nrules: []", "unknown top-level field"),
        (b"name: x\nrules: [{match: a, to: b, colour: red}]", "unknown field"),
        (b"name: x\nrules: [{match: a, drop: ''}]", "a drop needs a reason"),
    ],
)
def test_malformed_rules_are_refused(text: bytes, message: str) -> None:
    with pytest.raises(RulesFileError, match=message):
        parse_rules(text, "bad.yaml")


def test_template_placeholder_is_one_segment() -> None:
    mapping = parse_rules(b"name: x\nrules: [{match: 'a.{n}.w', to: 'b.{n}.w'}]", "t.yaml")
    pattern = mapping.rules[0].pattern
    assert pattern.match("a.12.w").group("n") == "12"
    assert pattern.match("a.1.2.w") is None
    assert pattern.match("aX12.w") is None  # the dot is literal


_TRANSFORMS = parse_rules(
    b"""name: t
rules:
  - {match: c1, to: c1, transforms: [conv1d]}
  - {match: c2, to: c2, transforms: [conv2d]}
  - {match: sq, to: sq, transforms: [{squeeze: 0}]}
  - {match: tr, to: tr, transforms: [{transpose: [2, 0, 1]}]}
""",
    "t.yaml",
).rules


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_transforms_round_trip_exactly(data: st.DataObject) -> None:
    dims = st.integers(1, 5)
    shapes = {"c1": (data.draw(dims), data.draw(dims), data.draw(dims)),
              "c2": tuple(data.draw(dims) for _ in range(4)),
              "sq": (1, data.draw(dims), data.draw(dims)),
              "tr": tuple(data.draw(dims) for _ in range(3))}
    for rule in _TRANSFORMS:
        tensor = torch.randn(shapes[rule.written])
        forward = tensor
        for transform in rule.transforms:
            forward = transform.forward(forward)
        back = forward
        for transform in reversed(rule.transforms):
            back = transform.inverse(back)
        assert torch.equal(back, tensor)


_FILES = {
    "enc.yaml": b"name: enc\nquantize: ['^enc[.]lin\\.weight$']\nrules:\n"
                b"  - {match: 'enc.lin.{p}', to: 'enc.lin.{p}'}\n"
                b"  - {regex: '^enc\\.n(?P<i>\\d)$', drop: never}\n",
    "loop.yaml": b"name: loop\nrules: [{include: loop.yaml}]\n",
}


def test_include_splices_rules_under_a_prefix_and_digests_the_included_file() -> None:
    text = b"name: top\nrules:\n  - include: enc.yaml\n    prefix: outer.\n  - {match: head.w, to: head.w}\n"
    mapping = parse_rules(text, "top.yaml", read=_FILES.__getitem__)
    source = {"outer.enc.lin.weight": torch.ones(2, 3), "outer.enc.lin.bias": torch.ones(2), "head.w": torch.ones(1)}
    plan = plan_conversion(mapping, source, {"enc.lin.weight": (2, 3), "enc.lin.bias": (2,), "head.w": (1,)})
    assert {t.source_key: t.target_key for t in plan.tensors} == {
        "outer.enc.lin.weight": "enc.lin.weight", "outer.enc.lin.bias": "enc.lin.bias", "head.w": "head.w"}
    assert mapping.is_quantizable("enc.lin.weight") and not mapping.is_quantizable("head.w")
    # The included file's rules are named by their own file and place; the unprefixed key fits none of them.
    assert plan.notes() == ["enc.yaml rule 2 (^enc\\.n(?P<i>\\d)$) matched no key"]
    with pytest.raises(MappingError, match="no rule in top.yaml for source key.s. enc.lin.weight"):
        plan_conversion(mapping, {"enc.lin.weight": torch.ones(2, 3)}, {})
    changed = dict(_FILES, **{"enc.yaml": _FILES["enc.yaml"] + b"\n"})
    assert parse_rules(text, "top.yaml", read=changed.__getitem__).digest != mapping.digest


def test_include_loops_and_prefixed_unanchored_regexes_are_refused() -> None:
    with pytest.raises(RulesFileError, match="loop"):
        parse_rules(b"name: t\nrules: [{include: loop.yaml}]", "t.yaml", read=_FILES.__getitem__)
    files = {"r.yaml": b"name: r\nrules: [{regex: 'a', to: b}]"}
    with pytest.raises(RulesFileError, match="must start with"):
        parse_rules(b"name: t\nrules: [{include: r.yaml, prefix: p.}]", "t.yaml", read=files.__getitem__)


_LORA = parse_rules(
    b"""name: lora
rules:
  - regex: '^m\\.(?P<n>\\d+)\\.(?P<proj>q|v)\\.base\\.weight$'
    to: 'layers.{n}.{proj}.weight'
    lora: {a: 'm.{n}.{proj}.A', b: 'm.{n}.{proj}.B', scale: lora_scale}
  - regex: '^m\\.\\d+\\.(q|v|k)\\.(A|B)$'
    folded: a LoRA factor, merged into its base weight
  - {match: 'm.{n}.k.weight', to: 'layers.{n}.k.weight'}
""", "lora.yaml")


def _lora_source(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"m.0.q.base.weight": torch.randn(6, 5, generator=generator),
            "m.0.q.A": torch.randn(3, 5, generator=generator), "m.0.q.B": torch.randn(6, 3, generator=generator),
            "m.0.k.weight": torch.randn(4, 5, generator=generator)}


def test_lora_merge_is_the_float32_sum_of_weight_and_scaled_product() -> None:
    source = _lora_source(torch.Generator().manual_seed(0))
    source = {key: value.to(torch.bfloat16) for key, value in source.items()}
    expected = {"layers.0.q.weight": (6, 5), "layers.0.k.weight": (4, 5)}
    plan = plan_conversion(_LORA, source, expected, values={"lora_scale": 2.5})
    assert [(t.source_key, t.merge.a_key, t.merge.b_key, t.merge.scale) for t in plan.merges()] == [
        ("m.0.q.base.weight", "m.0.q.A", "m.0.q.B", 2.5)]
    assert sorted(entry.key for entry in plan.folded) == ["m.0.q.A", "m.0.q.B"]
    merged = plan.sources(source)["m.0.q.base.weight"]
    wide = {key: value.double() for key, value in source.items()}
    reference = wide["m.0.q.base.weight"] + 2.5 * wide["m.0.q.B"] @ wide["m.0.q.A"]
    assert merged.dtype == torch.float32
    assert torch.allclose(merged.double(), reference, rtol=1e-6, atol=1e-6)
    assert plan.sources(source)["m.0.k.weight"] is source["m.0.k.weight"]  # untouched tensors pass through


@pytest.mark.parametrize(
    ("change", "values", "message"),
    [
        (lambda s: s.update({"m.0.v.A": torch.ones(3, 5), "m.0.v.B": torch.ones(4, 3)}), {"lora_scale": 1.0},
         r"factor\(s\) that no merge consumes .*m\.0\.v\.A, m\.0\.v\.B"),
        (lambda s: s.pop("m.0.q.B"), {"lora_scale": 1.0}, "the checkpoint has no m.0.q.B"),
        (lambda s: s.update({"m.0.q.A": torch.ones(2, 5)}), {"lora_scale": 1.0}, "do not make B @ A"),
        (lambda s: None, {}, "scale 'lora_scale', which the checkpoint's config does not give"),
    ],
)
def test_lora_merges_that_cannot_be_made_are_refused(change, values, message) -> None:
    source = _lora_source(torch.Generator().manual_seed(1))
    change(source)
    with pytest.raises(MappingError, match=message):
        plan_conversion(_LORA, source, {"layers.0.q.weight": (6, 5), "layers.0.k.weight": (4, 5)}, values=values)


_ADD = parse_rules(
    b"""name: add
rules:
  - regex: '^lstm\\.bias_ih_l(?P<n>\\d+)$'
    to: 'lstm.{n}.bias'
    add: 'lstm.bias_hh_l{n}'
  - regex: '^lstm\\.bias_hh_l\\d+$'
    folded: added into the layer's one bias
""", "add.yaml")


def test_add_stores_the_float32_sum_of_a_key_and_its_twin() -> None:
    generator = torch.Generator().manual_seed(2)
    source = {f"lstm.bias_{kind}_l{n}": torch.randn(8, generator=generator).to(torch.bfloat16)
              for kind in ("ih", "hh") for n in (0, 1)}
    plan = plan_conversion(_ADD, source, {"lstm.0.bias": (8,), "lstm.1.bias": (8,)})
    assert [(t.source_key, t.target_key, t.merge.twin_key) for t in plan.merges()] == [
        ("lstm.bias_ih_l0", "lstm.0.bias", "lstm.bias_hh_l0"), ("lstm.bias_ih_l1", "lstm.1.bias", "lstm.bias_hh_l1")]
    assert sorted(entry.key for entry in plan.folded) == ["lstm.bias_hh_l0", "lstm.bias_hh_l1"]
    summed = plan.sources(source)["lstm.bias_ih_l1"]
    assert summed.dtype == torch.float32
    assert torch.equal(summed, source["lstm.bias_ih_l1"].float() + source["lstm.bias_hh_l1"].float())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("lstm.bias_hh_l0"), "adds lstm.bias_hh_l0, which the checkpoint lacks"),
        (lambda s: s.update({"lstm.bias_hh_l0": torch.ones(9)}), r"adds lstm.bias_hh_l0 of another shape \(9,\)"),
        (lambda s: s.update({"lstm.bias_hh_l5": torch.ones(8)}), r"factor\(s\) that no merge consumes .*bias_hh_l5"),
    ],
)
def test_adds_that_cannot_be_made_are_refused(change, message) -> None:
    source = {"lstm.bias_ih_l0": torch.ones(8), "lstm.bias_hh_l0": torch.ones(8)}
    change(source)
    with pytest.raises(MappingError, match=message):
        plan_conversion(_ADD, source, {"lstm.0.bias": (8,)})


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (b"{match: a, drop: why, add: b}", "'add' merges into a renamed tensor"),
        (b"{match: 'a.{n}', to: b, add: 'c.{m}'}", "add 'c.{m}' is not a key template"),
        (b"{match: a, to: b, add: c, lora: {a: x, b: y, scale: s}}", "one merge per rule"),
    ],
)
def test_malformed_adds_are_refused(rule: bytes, message: str) -> None:
    with pytest.raises(RulesFileError, match=message):
        parse_rules(b"name: t\nrules: [" + rule + b"]", "t.yaml")
