"""The decoder prompt: the user turn of NeMo's `canary` and `canary2` prompt formats, as token ids.

NeMo renders the turn as a string of `<|...|>` tokens (plus, for canary2, free decoder-context text)
and hands it to the tokenizer; we render the same string and let `Tokenizer.encode_prompt` tokenise it
the way NeMo's tokenizer of that layout does. Invalid requests fail before any lookup, with a
`UsageError` that names the bad value and what the checkpoint offers instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from canary_convert.errors import UsageError

from ..tokenizer import BOS, START_OF_CONTEXT, Tokenizer

TASKS = ("transcribe", "translate")
# NeMo's manifest names for the two tasks (prompts/canary.py TASK_TRANSCRIBE / TASK_TRANSLATE).
TASK_ALIASES = {"asr": "transcribe", "ast": "translate", "s2t_translation": "translate"}
PROMPT_FORMATS = ("canary", "canary2")
# Task tokens of NeMo's canary format (prompts/canary.py maps "asr"/"ast" onto these).
_TASK_TOKENS = {"transcribe": "<|transcribe|>", "translate": "<|translate|>"}
_EMOTION_PREFIX = "<|emo:"


@dataclass(frozen=True)
class PromptOptions:
    """What to ask the model for.

    `target_lang` None means "same as the source"; `task` may also be one of NeMo's manifest names (asr, ast,
    s2t_translation). Only `canary2` checkpoints understand `itn`,
    `timestamp`, `diarize`, `decoder_context` (text that biases the output) and `emotion`.
    """

    source_lang: str
    target_lang: str | None = None
    task: str = "transcribe"
    pnc: bool = True
    itn: bool = False
    timestamp: bool = False
    diarize: bool = False
    decoder_context: str = ""
    emotion: str = "undefined"


# NeMo's spellings of a yes/no slot (prompts/canary.py BOOL_TRUE, and the slot's own token, e.g. <|pnc|>).
_YES = {"yes", "true", "1"}
_NO = {"no", "false", "0"}
FLAGS = ("pnc", "itn", "timestamp", "diarize")  # the yes/no prompt slots


def _bare(value: str) -> str:
    """`<|en|>` -> `en`: NeMo's prompt defaults spell languages and flags either way."""
    return value[2:-2] if value.startswith("<|") and value.endswith("|>") else value


def _yes_no(name: str, value: object) -> bool:
    word = _bare(str(value)).lower()
    if word in _YES or word == name:
        return True
    if word in _NO or word == f"no{name}":
        return False
    raise ValueError(f"prompt_defaults: {name}={value!r} is neither yes nor no")


def default_slots(prompt_defaults: list[dict] | None) -> dict[str, object]:
    """The user turn of the checkpoint's `prompt_defaults` (NeMo's defaults when a prompt slot is not given),
    as PromptOptions fields: languages, task and the yes/no flags it sets."""
    user = next((turn.get("slots") or {} for turn in prompt_defaults or [] if turn.get("role") == "user"), {})
    slots: dict[str, object] = {}
    for name in ("source_lang", "target_lang"):
        if user.get(name):
            slots[name] = _bare(str(user[name]))
    task = user.get("task", user.get("taskname"))
    if task:
        task = _bare(str(task))
        slots["task"] = TASK_ALIASES.get(task, task)
    for name in FLAGS:
        if user.get(name) is not None:
            slots[name] = _yes_no(name, user[name])
    return slots


def _flag(name: str, value: bool) -> str:
    # NeMo's canary/canary2 formats spell a yes/no slot as <|name|> or <|noname|>.
    return f"<|{name}|>" if value else f"<|no{name}|>"


def _language_token(tokenizer: Tokenizer, lang: str) -> str:
    if lang not in tokenizer.languages:
        raise UsageError(f"unknown language {lang!r}: this checkpoint knows {', '.join(tokenizer.languages)}")
    # NeMo's prompt formats wrap a language code as <|code|> and look it up as a special token.
    return f"<|{lang}|>"


def _require(tokenizer: Tokenizer, tokens: list[str], what: str) -> None:
    for token in tokens:
        if token not in tokenizer.special_tokens:
            raise UsageError(f"{what}: this checkpoint has no {token} token")


def _canary_turn(tokenizer: Tokenizer, options: PromptOptions, source: str, target: str) -> str:
    known = [task for task, token in _TASK_TOKENS.items() if token in tokenizer.special_tokens]
    if options.task not in known:
        raise UsageError(f"unknown task {options.task!r}: this checkpoint knows {', '.join(known)}")
    unsupported = [name for name, used in (
        ("itn", options.itn), ("timestamp", options.timestamp), ("diarize", options.diarize),
        ("decoder_context", bool(options.decoder_context)), ("emotion", options.emotion != "undefined"),
    ) if used]
    if unsupported:
        # NeMo refuses timestamps and context for this format and has no slot for the others.
        raise UsageError(f"the canary prompt format has no {', '.join(unsupported)} option (canary2 has)")
    # NeMo's CanaryPromptFormatter user template: BOS, source, task, target, pnc.
    tokens = [BOS, source, _TASK_TOKENS[options.task], target, _flag("pnc", options.pnc)]
    _require(tokenizer, tokens, "canary prompt")
    return "".join(tokens)


def _canary2_turn(tokenizer: Tokenizer, options: PromptOptions, source: str, target: str) -> str:
    if options.task not in TASKS:
        raise UsageError(f"unknown task {options.task!r}: this checkpoint knows {', '.join(TASKS)}")
    # canary2 has no task token: it translates exactly when the target language differs from the source.
    translating = options.source_lang != (options.target_lang or options.source_lang)
    if options.task == "translate" and not translating:
        raise UsageError(f"task 'translate' needs a target language other than {options.source_lang!r}")
    if options.task == "transcribe" and translating:
        raise UsageError(
            f"task 'transcribe' keeps the source language {options.source_lang!r}; "
            f"target language {options.target_lang!r} means translate"
        )
    emotion = f"{_EMOTION_PREFIX}{options.emotion}|>"
    if emotion not in tokenizer.special_tokens:
        known = [token[len(_EMOTION_PREFIX):-2] for token in tokenizer.special_tokens
                 if token.startswith(_EMOTION_PREFIX)]
        raise UsageError(f"unknown emotion {options.emotion!r}: this checkpoint knows {', '.join(known) or 'none'}")
    # NeMo's Canary2PromptFormatter user template: context marker, context text, BOS, emotion, source,
    # target, then the pnc/itn/timestamp/diarize switches.
    tokens = [BOS, emotion, source, target, _flag("pnc", options.pnc), _flag("itn", options.itn),
              _flag("timestamp", options.timestamp), _flag("diarize", options.diarize)]
    _require(tokenizer, [START_OF_CONTEXT, *tokens], "canary2 prompt")
    return START_OF_CONTEXT + options.decoder_context + "".join(tokens)


def build_prompt(prompt_format: str, tokenizer: Tokenizer, options: PromptOptions) -> list[int]:
    """The decoder prompt ids NeMo's `transcribe()` feeds for these options (the user turn only)."""
    options = replace(options, task=TASK_ALIASES.get(options.task, options.task))
    source = _language_token(tokenizer, options.source_lang)
    target_lang = options.target_lang or options.source_lang
    target = _language_token(tokenizer, target_lang)
    if prompt_format == "canary":
        rendered = _canary_turn(tokenizer, options, source, target)
    elif prompt_format == "canary2":
        rendered = _canary2_turn(tokenizer, options, source, target)
    else:
        raise UsageError(f"unknown prompt format {prompt_format!r}: expected {' or '.join(PROMPT_FORMATS)}")
    # The decoder context is written in the target language (NeMo's CanaryTokenizer picks the target
    # language's model for it).
    return tokenizer.encode_prompt(rendered, context_lang=target_lang)
