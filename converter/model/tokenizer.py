"""Canary's tokenizers, rebuilt from the SentencePiece files of a converted folder (no torch, no NeMo).

Two layouts exist (see `TokenizerConfig`): NeMo's `CanaryTokenizer`, an aggregate of one SentencePiece
model per language plus `spl_tokens` for the prompt tokens (canary-1b, canary-1b-flash), and
`CanaryBPETokenizer`, one SentencePiece model holding text and prompt tokens alike (canary-1b-v2).
Every id here is read from the model files; the token *strings* below are the names NeMo's prompt
formats use, which is what ties a checkpoint's ids to their meaning.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import sentencepiece as spm

from canary_convert.errors import UsageError

from .config import TokenizerConfig
from ..untrusted import folder_file

# Token names NeMo's canary_tokenizer.py gives Canary's special roles.
EOS = "<|endoftext|>"
BOS = "<|startoftranscript|>"
PAD = "<pad>"
NOSPEECH = "<|nospeech|>"
START_OF_CONTEXT = "<|startofcontext|>"
# The aggregate entry NeMo's CanaryTokenizer reads prompt tokens from (CANARY_SPECIAL_TOKENIZER).
SPECIAL_TOKENIZER = "spl_tokens"
# NeMo's CanaryTokenizer sends two-letter codes to regional sub-tokenizers when only those exist.
_REGIONAL = {"en": "en-US", "es": "es-ES", "fr": "fr-FR", "de": "de-DE"}
# NeMo's CanaryTokenizer routes text with frame tokens like <|12|> through a training-only path.
_TIMESTAMP = re.compile(r"<\|\d+\|>")
# Language tokens are ISO 639-1 codes, optionally with a region (NeMo's Canary-2 special tokenizer
# script lists them as <|xx|>); the single-model layout has no other record of its languages.
_LANGUAGE_TOKEN = re.compile(r"<\|([a-z]{2}(?:-[A-Z]{2})?)\|>")


def _is_special(piece: str) -> bool:
    """NeMo's CanaryTokenizer rule: a piece is a prompt token if it reads `<|...|>`, or is `<pad>`."""
    return (piece.startswith("<|") and piece.endswith("|>")) or piece == PAD


def _load_piece_model(path: Path) -> spm.SentencePieceProcessor:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} is missing from the converted folder")
    return spm.SentencePieceProcessor(model_file=str(path))


class Tokenizer(ABC):
    """What decoding and prompting need from a Canary tokenizer, whichever layout it has."""

    vocab_size: int
    # Text languages, in the checkpoint's order.
    languages: tuple[str, ...]
    # Every prompt token (`<|...|>` and `<pad>`) with its id in the joint vocabulary.
    special_tokens: Mapping[str, int]
    _special_ids: frozenset[int]

    def special_id(self, token: str) -> int:
        """The id of a prompt token, looked up whole; KeyError names the token when the checkpoint lacks it."""
        try:
            return self.special_tokens[token]
        except KeyError:
            raise KeyError(f"the tokenizer has no special token {token}") from None

    @property
    def eos_id(self) -> int:
        return self.special_id(EOS)

    @property
    def bos_id(self) -> int:
        return self.special_id(BOS)

    @property
    def pad_id(self) -> int:
        return self.special_id(PAD)

    @property
    def nospeech_id(self) -> int:
        return self.special_id(NOSPEECH)

    def is_special(self, token_id: int) -> bool:
        """Whether an id is a prompt token (useful to tell control output from text)."""
        return token_id in self._special_ids

    def _unknown_language(self, lang: str) -> UsageError:
        return UsageError(f"unknown language {lang!r}: this checkpoint knows {', '.join(self.languages)}")

    @abstractmethod
    def encode(self, text: str, lang: str) -> list[int]:
        """Text in `lang` -> ids, as NeMo's `tokenizer.text_to_ids(text, lang)`."""

    @abstractmethod
    def encode_prompt(self, rendered: str, context_lang: str) -> list[int]:
        """A rendered user turn (`<|...|>` tokens with an optional decoder context) -> ids, as NeMo's prompt
        formatter tokenises it; `context_lang` is the language the context text is written in."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Ids (prompt and trailing EOS already removed) -> text, as NeMo's `ids_to_text` for a transcript."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry behind an id."""


class AggregateTokenizer(Tokenizer):
    """NeMo's CanaryTokenizer: SentencePiece models stacked in config order, each at its own id offset."""

    def __init__(self, models: Mapping[str, spm.SentencePieceProcessor]):
        if SPECIAL_TOKENIZER not in models:
            raise ValueError(f"an aggregate Canary tokenizer needs a {SPECIAL_TOKENIZER!r} entry")
        self._models = dict(models)
        # NeMo's AggregateTokenizer: each sub-tokenizer starts where the previous vocabulary ends, in
        # dict order (a SentencePieceTokenizer's vocab is its piece list, no extra tokens when not legacy).
        self._offsets: dict[str, int] = {}
        self._ranges: list[tuple[int, int, spm.SentencePieceProcessor]] = []
        offset = 0
        for name, model in self._models.items():
            self._offsets[name] = offset
            self._ranges.append((offset, offset + model.get_piece_size(), model))
            offset += model.get_piece_size()
        self.vocab_size = offset
        self.languages = tuple(name for name in self._models if name != SPECIAL_TOKENIZER)
        # NeMo's CanaryTokenizer collects its special tokens from the `spl_tokens` vocabulary only.
        special = self._models[SPECIAL_TOKENIZER]
        base = self._offsets[SPECIAL_TOKENIZER]
        self.special_tokens = MappingProxyType({
            piece: base + index
            for index in range(special.get_piece_size())
            if _is_special(piece := special.id_to_piece(index))
        })
        self._special_ids = frozenset(self.special_tokens.values())

    def _text_language(self, lang: str) -> str:
        # NeMo's CanaryTokenizer maps a canary-1 code (`en`) onto a regional sub-tokenizer (`en-US`)
        # when the code itself has none.
        if lang in self.languages:
            return lang
        if (regional := _REGIONAL.get(lang)) in self.languages:
            return regional  # type: ignore[return-value]
        raise self._unknown_language(lang)

    def encode(self, text: str, lang: str) -> list[int]:
        lang = self._text_language(lang)
        # NeMo's CanaryTokenizer encodes a trailing <|endoftext|> as the EOS id, not as text.
        if text.endswith(EOS):
            return self.encode(text[: -len(EOS)], lang) + [self.eos_id]
        if _TIMESTAMP.search(text):
            # NeMo interleaves frame tokens word by word here, a training-only format.
            raise ValueError("text with frame tokens like <|12|> is training data; encode plain text")
        # NeMo's AggregateTokenizer: plain SentencePiece ids of the language's model, shifted by its offset.
        model, offset = self._models[lang], self._offsets[lang]
        return [offset + piece for piece in model.encode_as_ids(text)]

    def encode_prompt(self, rendered: str, context_lang: str) -> list[int]:
        # NeMo's prompt formatters tokenise the user turn with `spl_tokens`, which CanaryTokenizer
        # parses token by token (up to each `>`), looking every token up whole.
        ids: list[int] = []
        if rendered.startswith(START_OF_CONTEXT):
            # Canary2: the decoder context between <|startofcontext|> and <|startoftranscript|> is text,
            # encoded with the target language's model (NeMo reads that language off the fourth token
            # after the context, which is the target language slot).
            ids.append(self.special_id(START_OF_CONTEXT))
            rendered = rendered[len(START_OF_CONTEXT):]
            end = rendered.find(BOS)
            if end > 0:
                ids.extend(self.encode(rendered[:end], context_lang))
                rendered = rendered[end:]
        while rendered:
            end = rendered.find(">")
            if end < 0:
                raise ValueError(f"prompt text {rendered!r} is not made of special tokens")
            ids.append(self.special_id(rendered[: end + 1]))
            rendered = rendered[end + 1:]
        return ids

    def _locate(self, token_id: int) -> tuple[spm.SentencePieceProcessor, int]:
        for start, stop, model in self._ranges:
            if start <= token_id < stop:
                return model, token_id - start
        raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")

    def id_to_piece(self, token_id: int) -> str:
        model, local = self._locate(int(token_id))
        return model.id_to_piece(local)

    def decode(self, ids: Sequence[int]) -> str:
        # NeMo's AggregateTokenizer.ids_to_text: concatenate raw pieces from each id's own model and turn
        # `▁` into spaces. Nothing is stripped: special tokens stay as text, the leading space stays,
        # and an unknown piece reads `<unk>`.
        return "".join(self.id_to_piece(token_id) for token_id in ids).replace("▁", " ")


class BPETokenizer(Tokenizer):
    """NeMo's CanaryBPETokenizer: one SentencePiece model whose user-defined symbols are the prompt tokens."""

    def __init__(self, model: spm.SentencePieceProcessor):
        self._model = model
        self.vocab_size = model.get_piece_size()
        pieces = [model.id_to_piece(index) for index in range(self.vocab_size)]
        # The same discovery rule as the aggregate layout, over the single vocabulary; NeMo's
        # CanaryBPETokenizer finds these with SentencePiece's piece_to_id.
        self.special_tokens = MappingProxyType(
            {piece: index for index, piece in enumerate(pieces) if _is_special(piece)}
        )
        self._special_ids = frozenset(self.special_tokens.values())
        self.languages = tuple(
            match.group(1) for piece in pieces if (match := _LANGUAGE_TOKEN.fullmatch(piece))
        )

    def encode(self, text: str, lang: str) -> list[int]:
        # NeMo ignores the language for a single model (TokenizerWrapper drops it); we still refuse an
        # unknown one. SentencePiece itself matches prompt tokens inside the text (user-defined symbols).
        if lang not in self.languages:
            raise self._unknown_language(lang)
        return list(self._model.encode_as_ids(text))

    def encode_text(self, text: str) -> list[int]:
        """Any text -> ids, as NeMo's SentencePieceTokenizer.text_to_ids (no language: a CTC model's tokenizer)."""
        return list(self._model.encode_as_ids(text))

    def encode_pieces(self, text: str) -> list[str]:
        """Any text -> its pieces, as NeMo's SentencePieceTokenizer.text_to_tokens."""
        return list(self._model.encode_as_pieces(text))

    @property
    def unk_id(self) -> int:
        return int(self._model.unk_id())

    @property
    def unk_piece(self) -> str:
        return self._model.id_to_piece(self.unk_id)

    def encode_prompt(self, rendered: str, context_lang: str) -> list[int]:
        # NeMo's prompt formatter hands the whole rendered turn to SentencePiece, which adds its dummy
        # prefix `▁` in front and encodes any decoder context next to the tokens around it.
        return list(self._model.encode_as_ids(rendered))

    def id_to_piece(self, token_id: int) -> str:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._model.id_to_piece(int(token_id))

    def decode(self, ids: Sequence[int]) -> str:
        # NeMo's SentencePieceTokenizer.ids_to_text (non-legacy) is SentencePiece's own decoding: prompt
        # tokens come out verbatim, an unknown piece as ` ⁇ `, the dummy-prefix space is dropped.
        ids = [int(token_id) for token_id in ids]
        for token_id in ids:
            self.id_to_piece(token_id)  # the aggregate layout's error for a bad id, not SentencePiece's
        return self._model.decode_ids(ids)

    def decode_pieces(self, pieces: Sequence[str]) -> str:
        """Pieces -> text, SentencePiece's own (NeMo's tokens_to_text)."""
        return self._model.decode_pieces(list(pieces))


def tokenizer_files(config: TokenizerConfig) -> list[str]:
    """The folder-relative files of the tokenizer `config.json`'s `tokenizer` section names."""
    if config.type == "aggregate":
        if not config.langs or not isinstance(config.langs, Mapping):
            raise ValueError("an aggregate tokenizer config lists no `langs`")
        return list(config.langs.values())
    if config.type == "bpe":
        if not config.model:
            raise ValueError("a bpe tokenizer config names no `model`")
        return [config.model]
    raise ValueError(f"unknown tokenizer type {config.type!r} (expected aggregate or bpe)")


def load_tokenizer(folder: Path, config: TokenizerConfig) -> Tokenizer:
    """The tokenizer of a converted MLX folder, as `config.json`'s `tokenizer` section describes it; each
    file a regular file inside the folder (untrusted.py)."""
    folder = Path(folder)
    models = [_load_piece_model(folder_file(folder, name, "config.json tokenizer")) for name in tokenizer_files(config)]
    if config.type == "aggregate":
        return AggregateTokenizer(dict(zip(config.langs, models)))
    return BPETokenizer(models[0])
