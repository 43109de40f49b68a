"""Tokenizer and prompt parity with NeMo on every tiny variant.

Each expected value comes from NeMo itself: the restored EncDecMultiTaskModel's tokenizer, its prompt
formatter, the lhotse prompt function file inputs go through, and `transcribe()` caught in the act.
Ours are loaded from the MLX folder the converter writes from the same `.nemo`.
"""

from __future__ import annotations

import itertools
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from canary_convert.convert import ConvertOptions, convert
from canary_convert.errors import UsageError
from canary_convert.model.config import ModelConfig
from canary_convert.model.aed.prompts import PromptOptions, build_prompt
from canary_convert.model.tokenizer import Tokenizer, load_tokenizer
from factory import LANGS, TEXT, VARIANTS

VARIANT_NAMES = list(VARIANTS)
CANARY1 = [name for name, spec in VARIANTS.items() if spec.prompt_format == "canary"]
CANARY2 = [name for name, spec in VARIANTS.items() if spec.prompt_format == "canary2"]
LANG_PAIRS = list(itertools.product(LANGS, LANGS))
CONTEXTS = ["", "the cat sat", " Hello, World! eins zwei"]
FIXED_TEXTS = [
    *TEXT["en"], *TEXT["de"], "", " ", "  the  cat  ", "The Cat SAT.", "Hello, World!",
    "Die Katze sitzt auf der Matte.", "fünf, Fünf; FÜNF?", "x<|en|>y", "the cat<|endoftext|>", "<|endoftext|>",
    "über 1,5 Mio. €", "tab\tand\nnewline",
    "naïve café", "数字", "it's a 'quoted' \"word\"",
]

WORDS = sorted({word for lang in LANGS for line in TEXT[lang] for word in line.split()})
_word = st.sampled_from(WORDS).flatmap(lambda w: st.sampled_from([w, w.capitalize(), w.upper()]))
_separator = st.sampled_from([" ", "  ", ", ", ". ", "! ", "? ", "-", "'", ": ", "\t", " \n", ""])
_sentence = st.lists(st.tuples(_word, _separator), max_size=12).map(lambda parts: "".join(w + s for w, s in parts))
# No `|`: NeMo's aggregate tokenizer treats <|digits|> in text as training-only frame tokens.
_alphabet = sorted(set("".join(WORDS)) | set(string.ascii_letters) | set(string.digits) | set(".,;:!?'\"-()[]<> \t")
                   | set("äöüßÄÖÜéè€"))
TEXTS = st.one_of(
    _sentence,
    st.tuples(st.sampled_from(["", " ", "  "]), _sentence, st.sampled_from(["", " ", ".", "!"])).map("".join),
    st.text(alphabet=_alphabet, max_size=40),
    st.text(max_size=20).filter(lambda t: "|" not in t),
)
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def nemo(checkpoints: dict[str, Path]) -> dict[str, Any]:
    """Each variant restored by NeMo, once for the module."""
    from nemo.collections.asr.models import EncDecMultiTaskModel

    models = {}
    for name, path in checkpoints.items():
        model = EncDecMultiTaskModel.restore_from(str(path), map_location="cpu")
        model.eval()
        models[name] = model
    return models


@pytest.fixture(scope="module")
def ours(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tokenizer, str]]:
    """Each variant converted to an MLX folder, and our tokenizer and prompt format loaded from it."""
    loaded = {}
    for name, path in checkpoints.items():
        folder = tmp_path_factory.mktemp("mlx") / name
        convert(str(path), folder, ConvertOptions())
        config = ModelConfig.from_file(folder / "config.json")
        loaded[name] = (load_tokenizer(folder, config.tokenizer), config.prompt_format)
    return loaded


def nemo_encode(model: Any, text: str, lang: str) -> list[int]:
    """Text -> ids the way NeMo's datasets call the tokenizer (the language only reaches an aggregate one)."""
    from nemo.collections.common.tokenizers.aggregate_tokenizer import TokenizerWrapper

    return list(TokenizerWrapper(model.tokenizer)(text, lang))


def nemo_user_turn(model: Any, **slots: str) -> list[int]:
    """The decoder prompt NeMo's formatter builds from transcribe()'s keyword arguments (tensor inputs)."""
    from nemo.collections.asr.models.aed_multitask_models import parse_multitask_prompt

    return model.prompt.encode_dialog(turns=parse_multitask_prompt(dict(slots)))["context_ids"].tolist()


def nemo_manifest_prompt(model: Any, **custom: str) -> list[int]:
    """The decoder prompt NeMo's lhotse prompt function builds for a manifest entry (file inputs)."""
    from lhotse import MonoCut, SupervisionSegment
    from lhotse.testing.dummies import dummy_recording

    from nemo.collections.common.data import apply_prompt_format_fn

    recording = dummy_recording(0)
    supervision = SupervisionSegment(id="s", recording_id=recording.id, start=0, duration=1.0, text=None)
    cut = MonoCut(id="c", start=0, duration=1.0, channel=0, recording=recording, supervisions=[supervision],
                  custom=dict(custom))
    return apply_prompt_format_fn(cut, model.prompt)["context_ids"].tolist()


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --- vocabulary and special tokens ---------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_vocabulary_and_special_ids(nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str) -> None:
    model, (tokenizer, prompt_format) = nemo[variant], ours[variant]
    reference = model.tokenizer
    assert prompt_format == model.prompt_format
    assert tokenizer.vocab_size == reference.vocab_size
    assert (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id, tokenizer.nospeech_id) == (
        reference.eos_id, reference.bos_id, reference.pad_id, reference.nospeech_id)
    if hasattr(reference, "special_tokens"):  # CanaryTokenizer keeps its own table
        expected = dict(reference.special_tokens)
        assert list(tokenizer.languages) == [lang for lang in reference.langs if lang != "spl_tokens"]
    else:  # CanaryBPETokenizer: NeMo's token_to_id for every <|...|> / <pad> piece of its vocabulary
        expected = {piece: reference.token_to_id(piece) for piece in reference.vocab
                    if (piece.startswith("<|") and piece.endswith("|>")) or piece == "<pad>"}
    assert dict(tokenizer.special_tokens) == expected
    assert {token: tokenizer.special_id(token) for token in expected} == expected
    assert set(tokenizer.languages) == set(LANGS)
    with pytest.raises(KeyError, match="<|nosuchtoken|>"):
        tokenizer.special_id("<|nosuchtoken|>")


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_every_id_names_the_same_piece(
    nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str
) -> None:
    tokenizer = ours[variant][0]
    ids = list(range(nemo[variant].tokenizer.vocab_size))
    assert [tokenizer.id_to_piece(i) for i in ids] == list(nemo[variant].tokenizer.ids_to_tokens(ids))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.id_to_piece(len(ids))


# --- text -> ids -> text ---------------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_encode_and_decode_fixed_texts(
    nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str, lang: str
) -> None:
    model, tokenizer = nemo[variant], ours[variant][0]
    for text in FIXED_TEXTS:
        expected = nemo_encode(model, text, lang)
        assert tokenizer.encode(text, lang) == expected, text
        # decode_ids_to_str is what MultiTaskDecoding turns a hypothesis into its transcript with
        assert tokenizer.decode(expected) == model.decoding.decode_ids_to_str(expected), text


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@PROPERTY
@given(text=TEXTS, lang=st.sampled_from(LANGS))
def test_encode_matches_nemo(
    nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str, text: str, lang: str
) -> None:
    expected = nemo_encode(nemo[variant], text, lang)
    assert ours[variant][0].encode(text, lang) == expected
    assert ours[variant][0].decode(expected) == nemo[variant].decoding.decode_ids_to_str(expected)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@PROPERTY
@given(data=st.data())
def test_decode_any_ids_matches_nemo(
    nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str, data: st.DataObject
) -> None:
    # Any ids at all, prompt tokens and <unk> included: NeMo keeps them in the text, and so must we.
    ids = data.draw(st.lists(st.integers(0, nemo[variant].tokenizer.vocab_size - 1), max_size=30))
    assert ours[variant][0].decode(ids) == nemo[variant].decoding.decode_ids_to_str(ids)


# --- prompts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), LANG_PAIRS)
@pytest.mark.parametrize("variant", CANARY1)
def test_canary_prompt_matches_nemo(
    nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str, source: str, target: str
) -> None:
    model, (tokenizer, prompt_format) = nemo[variant], ours[variant]
    expected, ours_ids, manifest = {}, {}, {}
    for task, pnc in itertools.product(("transcribe", "translate"), (True, False)):
        key = (task, pnc)
        expected[key] = nemo_user_turn(model, source_lang=source, target_lang=target, task=task, pnc=yes(pnc))
        # Manifests spell the task `taskname: asr|ast`.
        manifest[key] = nemo_manifest_prompt(model, source_lang=source, target_lang=target,
                                             taskname={"transcribe": "asr", "translate": "ast"}[task], pnc=yes(pnc))
        ours_ids[key] = build_prompt(prompt_format, tokenizer, PromptOptions(source, target, task, pnc=pnc))
        # NeMo's manifest names are accepted as task names too (prompts/canary.py maps them the same way).
        for alias in {"transcribe": ("asr",), "translate": ("ast", "s2t_translation")}[task]:
            assert build_prompt(prompt_format, tokenizer, PromptOptions(source, target, alias, pnc=pnc)) == expected[key]
    assert ours_ids == expected
    assert ours_ids == manifest


@pytest.mark.parametrize(("source", "target"), LANG_PAIRS)
@pytest.mark.parametrize("variant", CANARY2)
def test_canary2_prompt_matches_nemo(
    nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str, source: str, target: str
) -> None:
    model, (tokenizer, prompt_format) = nemo[variant], ours[variant]
    task = "translate" if source != target else "transcribe"
    expected, ours_ids, manifest = {}, {}, {}
    for pnc, itn, timestamp, diarize, context in itertools.product(*[(True, False)] * 4, CONTEXTS):
        key = (pnc, itn, timestamp, diarize, context)
        flags = dict(source_lang=source, target_lang=target, pnc=yes(pnc), itn=yes(itn), timestamp=yes(timestamp),
                     diarize=yes(diarize), decodercontext=context)
        expected[key] = nemo_user_turn(model, emotion="<|emo:undefined|>", **flags)
        manifest[key] = nemo_manifest_prompt(model, **flags)
        options = PromptOptions(source, target, task, pnc=pnc, itn=itn, timestamp=timestamp, diarize=diarize,
                                decoder_context=context)
        ours_ids[key] = build_prompt(prompt_format, tokenizer, options)
    assert ours_ids == expected
    assert ours_ids == manifest


def _transcribe_prompt(model: Any, monkeypatch: pytest.MonkeyPatch, audio: Any, **prompt: str) -> list[int]:
    """Run NeMo's transcribe() and catch the decoder prompt it feeds (first row of the batch)."""
    seen: list[list[int]] = []
    forward = model._transcribe_forward

    def spy(batch: Any, trcfg: Any) -> dict:
        out = forward(batch, trcfg)
        seen.append(out["decoder_input_ids"][0].tolist())
        return out

    monkeypatch.setattr(model, "_transcribe_forward", spy)
    model.transcribe(audio, batch_size=1, verbose=False, **prompt)
    monkeypatch.undo()
    assert len(seen) == 1
    return seen[0]


TRANSCRIBE_CASES = {
    "canary": [
        (dict(source_lang="en", target_lang="de", task="translate", pnc="no"),
         PromptOptions("en", "de", "translate", pnc=False)),
        (dict(source_lang="de", target_lang="de", task="transcribe", pnc="yes"), PromptOptions("de")),
    ],
    "canary2": [
        (dict(source_lang="en", target_lang="de", pnc="no", itn="yes", timestamp="no", diarize="yes",
              decodercontext="the cat", emotion="<|emo:undefined|>"),
         PromptOptions("en", "de", "translate", pnc=False, itn=True, diarize=True, decoder_context="the cat")),
        (dict(source_lang="de", target_lang="de", pnc="yes", itn="no", timestamp="yes", diarize="no",
              decodercontext="", emotion="<|emo:undefined|>"),
         PromptOptions("de", timestamp=True)),
    ],
}


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_transcribe_feeds_our_prompt(
    nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    model, (tokenizer, prompt_format) = nemo[variant], ours[variant]
    audio = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    for kwargs, options in TRANSCRIBE_CASES[prompt_format]:
        caught = _transcribe_prompt(model, monkeypatch, audio, **kwargs)
        assert build_prompt(prompt_format, tokenizer, options) == caught
    # File inputs go through a manifest that keeps only source/target language, `taskname`, pnc, context
    # and timestamp: canary2's itn/diarize/decodercontext keyword arguments and canary's `task=` never
    # reach it. Defaults plus pnc and the languages do.
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, audio, 16000)
    kwargs: dict[str, str] = dict(source_lang="en", target_lang="de", pnc="no")
    if prompt_format == "canary":
        kwargs["taskname"] = "ast"  # the manifest's spelling of the task
    options = PromptOptions("en", "de", "translate", pnc=False)
    caught = _transcribe_prompt(model, monkeypatch, [str(wav)], **kwargs)
    assert build_prompt(prompt_format, tokenizer, options) == caught


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_unknown_language_is_a_usage_error(
    nemo: dict[str, Any], ours: dict[str, tuple[Tokenizer, str]], variant: str
) -> None:
    tokenizer, prompt_format = ours[variant]
    known = ", ".join(LANGS)
    for options in (PromptOptions("fr"), PromptOptions("en", "fr", "translate")):
        with pytest.raises(UsageError, match=f"'fr'.*{known}"):
            build_prompt(prompt_format, tokenizer, options)
    with pytest.raises(UsageError, match=f"'fr'.*{known}"):
        tokenizer.encode("the cat", "fr")
    if VARIANTS[variant].tokenizer == "agg":
        # NeMo's aggregate tokenizer refuses too (the bpe one silently spells <|fr|> out of text pieces).
        with pytest.raises(KeyError):
            nemo_user_turn(nemo[variant], source_lang="fr", target_lang="fr", pnc="yes",
                           **({"task": "transcribe"} if prompt_format == "canary" else
                              dict(itn="no", timestamp="no", diarize="no", decodercontext="",
                                   emotion="<|emo:undefined|>")))


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_unknown_task_is_a_usage_error(ours: dict[str, tuple[Tokenizer, str]], variant: str) -> None:
    tokenizer, prompt_format = ours[variant]
    with pytest.raises(UsageError, match="'summarize'.*transcribe, translate"):
        build_prompt(prompt_format, tokenizer, PromptOptions("en", task="summarize"))


@pytest.mark.parametrize("variant", CANARY2)
def test_canary2_task_must_agree_with_languages(ours: dict[str, tuple[Tokenizer, str]], variant: str) -> None:
    tokenizer, prompt_format = ours[variant]
    with pytest.raises(UsageError, match="translate"):
        build_prompt(prompt_format, tokenizer, PromptOptions("en", "en", "translate"))
    with pytest.raises(UsageError, match="transcribe"):
        build_prompt(prompt_format, tokenizer, PromptOptions("en", "de", "transcribe"))
    with pytest.raises(UsageError, match="'happy'.*undefined"):
        build_prompt(prompt_format, tokenizer, PromptOptions("en", emotion="happy"))


@pytest.mark.parametrize("variant", CANARY1)
def test_canary_refuses_canary2_options(ours: dict[str, tuple[Tokenizer, str]], variant: str) -> None:
    tokenizer, prompt_format = ours[variant]
    for options in (PromptOptions("en", itn=True), PromptOptions("en", timestamp=True),
                    PromptOptions("en", diarize=True), PromptOptions("en", decoder_context="the cat")):
        with pytest.raises(UsageError, match="canary prompt format has no"):
            build_prompt(prompt_format, tokenizer, options)


def test_unknown_prompt_format_is_a_usage_error(ours: dict[str, tuple[Tokenizer, str]]) -> None:
    with pytest.raises(UsageError, match="'whisper'.*canary or canary2"):
        build_prompt("whisper", ours[VARIANT_NAMES[0]][0], PromptOptions("en"))


def test_model_package_needs_neither_torch_nor_nemo() -> None:
    code = ("import sys; import canary_convert.model.tokenizer, canary_convert.model.aed.prompts; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'nemo', 'lhotse'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
