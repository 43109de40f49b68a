"""The model card: `README.md` in OUT, with the front matter the Hub reads and a body that says what the
folder holds, how it was made and how it was proven. Built from the conversion's own record, offline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import yaml

from .parity import ParityReport

CARD_FILE = "README.md"
UNKNOWN_LICENCE = "unknown"
_TAGS = ["mlx", "canary", "nemo", "speech", "asr", "automatic-speech-recognition", "speech-translation"]
_CANARY_ONLY_TAGS = ("canary", "speech-translation")  # the other families (CTC, transducers) neither translate


@dataclass(frozen=True)
class Licence:
    """The licence the card declares and where it was found (`id` is the Hub's licence identifier)."""

    id: str
    origin: str

    @property
    def known(self) -> bool:
        return self.id != UNKNOWN_LICENCE


def choose_licence(flag: str | None, source_card: str | None, repo_id: str | None,
                   nvidia_releases: Mapping[str, str]) -> Licence:
    """`--license` first, then the source's own card, then our table of NVIDIA's releases; else unknown."""
    if flag:
        return Licence(flag, "given with --license")
    if source_card:
        return Licence(source_card, f"the model card of {repo_id}")
    if repo_id in nvidia_releases:
        return Licence(nvidia_releases[repo_id], f"NVIDIA's licence for {repo_id} (canary-convert's presets)")
    return Licence(UNKNOWN_LICENCE, "the source is not a Hub repo with a readable card, and none was given; "
                                    "convert again with --license before publishing")


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says that is not in the conversion record itself."""

    record: Mapping[str, Any]  # conversion.json's content (without the manifest)
    config: Mapping[str, Any]  # config.json's content
    folder: str  # the output folder's name
    summary: str  # what the model family is (the preset's summary)
    languages: Sequence[str]
    licence: Licence
    command: str  # the canary-convert command that made the folder
    repo_id: str | None = None  # where the folder will be published, when known
    parity: ParityReport | None = None


def _front_matter(facts: CardFacts) -> dict[str, Any]:
    record = facts.record
    matter: dict[str, Any] = {"library_name": "mlx", "license": facts.licence.id}
    base = record.get("base_model")
    if base:
        matter["base_model"] = base
        if record["options"].get("quantize"):
            matter["base_model_relation"] = "quantized"
    matter["language"] = list(facts.languages)
    matter["pipeline_tag"] = "automatic-speech-recognition"
    tags = _TAGS if facts.config.get("model_type") == "canary" else [tag for tag in _TAGS if tag not in _CANARY_ONLY_TAGS]
    layout = record["options"].get("layout")
    matter["tags"] = tags + [record["family"]] + ([layout] if layout in ("mlx-audio", "parakeet-mlx") else [])
    return matter


def _precision(record: Mapping[str, Any]) -> str:
    options = record["options"]
    quantize = options.get("quantize")
    if not quantize:
        return f"{options['dtype']} weights"
    return (f"{quantize['bits']}-bit {quantize['mode']} quantized Linear and Embedding layers (group size "
            f"{quantize['group_size']}, {options['dtype']} scales), everything else in {options['dtype']}")


def _architecture(record: Mapping[str, Any], facts: CardFacts) -> list[str]:
    config = facts.config
    encoder = config["encoder"]
    prompt = f" ({config['prompt_format']} prompt)" if "prompt_format" in config else ""
    rows = [
        ("family", f"`{record['family']}`{prompt}"),
        ("encoder", f"{encoder['n_layers']} FastConformer layers, width {encoder['d_model']}, {encoder['n_heads']} heads, "
                    f"subsampling x{encoder['subsampling_factor']}, {config['preprocessor']['features']} mel features"),
        *_head(config),
        *_aligner(record),
        ("parameters", f"{record['parameter_count']:,}"),
        ("languages", ", ".join(facts.languages) or "as the tokenizer's text"),
        ("weights", _precision(record)),
    ]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def _head(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The card rows of the family's head: a Transformer decoder (Canary), a transducer (with a hybrid's CTC head)
    or a CTC head."""
    if "decoder" in config:
        decoder = config["decoder"]
        return [("decoder", f"{decoder['num_layers']} Transformer layers, width {decoder['hidden_size']}, "
                            f"{decoder['num_attention_heads']} heads, up to {decoder['max_sequence_length']} positions")]
    rows = []
    if "joint" in config:
        prediction, durations = config["prediction"], config["decoding"]["durations"]
        kind = f"TDT (durations {durations})" if durations else "RNN-T"
        max_symbols = config["decoding"]["max_symbols"]
        per_frame = ("no bound on symbols per frame" if max_symbols is None
                     else f"at most {max_symbols} symbols per frame")
        rows += [("prediction network", f"{prediction['pred_rnn_layers']} LSTM layers, width {prediction['pred_hidden']}, "
                                        f"{prediction['vocab_size']} tokens and the blank"),
                 ("joint", f"{kind}, width {config['joint']['joint_hidden']}, greedy decoding (NeMo's greedy_batch, "
                           f"{per_frame})")]
    if "ctc" in config:
        rows.append(("auxiliary CTC head" if rows else "head",
                     f"CTC over {config['ctc']['num_classes'] - 1} tokens and the blank, greedy decoding"))
    return rows


def _aligner(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """canary-1b-v2's timestamp model, converted into `aligner/` beside the Canary."""
    aligner = record.get("aligner")
    if not aligner:
        return []
    return [("timestamps", f"word and segment times by NeMo's forced alignment with the CTC model in "
                           f"`{aligner['folder']}/` ({aligner['parameter_count']:,} parameters, its own tokenizer; "
                           "`--timestamps`)")]


def _provenance(record: Mapping[str, Any], command: str) -> list[str]:
    source = record["source"]
    lines = ["```sh", command, "```", "",
             f"- canary-convert {record['converter']['version']}, {record['created']}"]
    if source["kind"] == "hub":
        lines.append(f"- source: [{source['id']}](https://huggingface.co/{source['id']}), revision "
                     f"`{source['revision']}`, commit `{source['commit']}`")
    else:
        lines.append(f"- source: the local {source['kind']} `{PurePath(source['path']).name}`")
    lines.append(f"- source sha256: `{source['sha256'].removeprefix('sha256:')}`")
    mapping = record["mapping"]
    lines.append(f"- mapping `{mapping['file']}` ({mapping['digest']}), preset `{record['preset']}`")
    return lines


def _validation(record: Mapping[str, Any]) -> list[str]:
    validation = record["validation"]
    lines = [f"- strict load into canary-convert's MLX model: {validation['parameters']} parameter arrays, every "
             "one present with its shape",
             f"- round trip: each of the {validation['tensors']} stored tensors equals its source exactly (float "
             "tensors transformed back; quantized layers equal `mx.quantize` of their source)"]
    errors = validation.get("quantization_errors")
    if errors:
        lines += ["", "Quantization error of the layers furthest from their source (all of them are in "
                  "`conversion.json`):", "", "| layer | relative L2 | max abs |", "|---|---|---|"]
        lines += [f"| `{e['key']}` | {e['rel_l2']:.2e} | {e['max_abs']:.2e} |" for e in errors[:5]]
    return lines


def _parity(parity: ParityReport | None) -> list[str]:
    if parity is None:
        return ["Not run for this folder (`canary-convert SOURCE OUT --parity` compares with NeMo itself)."]
    lines = [f"NeMo {'and' if parity.passed else 'differs from'} this folder, on canary-convert's test signals "
             f"({parity.dtype} weights):", "", "| check | measured | limit | |", "|---|---|---|---|"]
    lines += [f"| {check} | {measured} | {limit} | {'ok' if ok else 'FAIL'} |"
              for check, measured, limit, ok in parity.rows()]
    return lines


def _usage(facts: CardFacts) -> list[str]:
    """How to run the model: by its repo id once published (fetched and checked against the manifest on first
    use), else by its folder. `pip install canary-convert` is the runtime alone: MLX, no torch."""
    language = facts.languages[0] if facts.languages else "en"
    target = facts.repo_id or facts.folder
    # Only a prompted model (Canary) takes a language.
    prompted = "prompt_format" in facts.config
    option, argument = (f" --source-lang {language}", f', source_lang="{language}"') if prompted else ("", "")
    lines = ["```sh", "pip install canary-convert",
             f"canary-transcribe speech.wav --model {target}{option}", "```", "", "```python",
             "from canary_convert import load_model", "", f'model = load_model("{target}")',
             f'print(model.transcribe("speech.wav"{argument})[0].text)', "```"]
    if (facts.config.get("layout") or {}).get("name") == "mlx-audio":
        lines += ["", "The folder is in mlx-audio's layout too, so mlx-audio loads it as it is:", "", "```python",
                  "import mlx.core as mx", "from mlx_audio.stt import load", "",
                  f'model = load("{target}", strict=True)',
                  f'print(model.generate("speech.wav", source_lang="{language}", target_lang="{language}", '
                  'dtype=mx.float32).text)', "```", "",
                  "mlx-audio's command line passes the model only the options its `generate` names, so it drops "
                  "`--language` for Canary; give the languages with `--gen-kwargs`:", "", "```sh",
                  f"mlx_audio.stt.generate --model {target} --audio speech.wav --output-path speech "
                  f"--gen-kwargs '{{\"source_lang\": \"{language}\", \"target_lang\": \"{language}\"}}'", "```", "",
                  "mlx-audio computes its own mel features and prompt: they differ from NeMo's (see canary-convert's "
                  "README, \"Folders for mlx-audio\"), so its transcripts can differ from NeMo's where "
                  "canary-convert's model gives NeMo's tokens."]
        if facts.record.get("aligner"):
            lines += ["", f"mlx-audio ignores `{facts.record['aligner']['folder']}/` (the timestamp model): word and "
                      "segment times come from canary-convert's model (`canary-transcribe --timestamps`)."]
    if (facts.config.get("layout") or {}).get("name") == "parakeet-mlx":
        lines += ["", "The folder is in parakeet-mlx's layout too, so parakeet-mlx (0.6.0) loads it as it is:", "",
                  "```sh", "pip install parakeet-mlx==0.6.0  # it reads audio files through FFmpeg, which must be on PATH",
                  f"parakeet-mlx speech.wav --model {target} --output-format txt --fp32", "```", "", "```python",
                  "import mlx.core as mx", "from parakeet_mlx import from_pretrained", "",
                  f'model = from_pretrained("{target}", dtype=mx.float32)',
                  'print(model.transcribe("speech.wav", dtype=mx.float32).text)', "```", "",
                  "parakeet-mlx computes its own mel features (its window, padding, magnitude and normalisation "
                  "differ from NeMo's), so its transcripts can differ from NeMo's where canary-convert's model "
                  "gives NeMo's tokens. Given canary-convert's features (NeMo's), its encoder and greedy search "
                  "give NeMo's tokens:", "", "```python", "import mlx.core as mx", "import soundfile",
                  "from canary_convert import load_model", "from parakeet_mlx import from_pretrained", "",
                  f'ours, theirs = load_model("{target}"), from_pretrained("{target}", dtype=mx.float32)',
                  'audio, _ = soundfile.read("speech.wav", dtype="float32")  # mono, at the model\'s sample rate',
                  "features, frames = ours.preprocess(mx.array(audio[None]), mx.array([audio.size]))",
                  "result = theirs.generate(features.transpose(0, 2, 1)[:, : int(frames[0])])[0]",
                  "print(result.text)", "```"]
    return lines


def render_card(facts: CardFacts) -> str:
    """The card's text: YAML front matter, then the body in Markdown."""
    record = facts.record
    source = record["source"]
    title = record.get("base_model") or PurePath(source["path"]).stem
    body = [
        f"# {title} for MLX", "",
        f"{facts.summary}", "",
        f"Converted to [MLX](https://github.com/ml-explore/mlx) with canary-convert {record['converter']['version']}, "
        f"{_precision(record)}.", "",
        "## Use", "", *_usage(facts), "",
        "## Model", "", *_architecture(record, facts), "",
        "## How it was made", "", *_provenance(record, facts.command), "",
        "## Validation", "", *_validation(record), "",
        "### Parity with NeMo", "", *_parity(facts.parity), "",
        "### Check it yourself", "",
        "`goldens.json` holds this model's outputs on canary-convert's fixed test signals; `canary-convert verify` "
        "checks the folder's files against the manifest in `conversion.json`, loads it strictly and runs those "
        "signals again (CPU numbers are the same on any machine):", "",
        "```sh", f"canary-convert verify {facts.repo_id or facts.folder} --device cpu", "```", "",
        "## Licence", "", f"`{facts.licence.id}`: {facts.licence.origin}.", "",
    ]
    matter = yaml.safe_dump(_front_matter(facts), sort_keys=False, allow_unicode=True)
    return f"---\n{matter}---\n\n" + "\n".join(body)
