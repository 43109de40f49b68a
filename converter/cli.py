"""Command-line entry points: parse, call the pipeline, render progress and errors.

`canary-convert SOURCE OUT` converts; `canary-convert <subcommand> ...` runs one of `SUBCOMMANDS`, each a
room beside the pipeline. Exit codes: 0 ok, 1 error, 2 usage, 3 validation failed (see errors.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import mlx.core as mx
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text
from tqdm.auto import tqdm

from . import BLAS, __version__
from .errors import CanaryConvertError, MissingExtraError, TranscriptWarning, UsageError
from .parity import ParityError, ParityReport
from .upload import UploadOptions, require_token, upload

if TYPE_CHECKING:  # the conversion pulls in torch: imported when a conversion runs, never for transcription
    from .convert import Conversion
    from .quantize import QuantizationError

console = Console(stderr=True)
# What the `convert` extra adds to the runtime (pyproject.toml): the converter's own imports.
CONVERT_EXTRA = ("torch", "safetensors", "omegaconf")
DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """`5GB` -> 5_000_000_000, `512MiB` -> 536_870_912, `1000` -> 1000."""
    found = _SIZE.match(text)
    if found is None:
        raise UsageError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1048576")
    number, prefix, binary = float(found.group(1)), found.group(2).lower(), found.group(3)
    return int(number * (1024 if binary else 1000) ** " kmgt".index(prefix or " "))


class _ItemsColumn(ProgressColumn):
    """`12/340 tensors, 85.0/s`: the tensors-per-second half of the progress line."""

    def render(self, task: Task) -> Text:
        done, total = task.fields.get("items", 0), task.fields.get("total_items", 0)
        elapsed = task.elapsed or 0.0
        rate = f", {done / elapsed:.1f}/s" if elapsed > 0 and done else ""
        return Text(f"{done}/{total} tensors{rate}" if total > 1 else "", style="progress.data.speed")


class RichReporter:
    """The pipeline's progress sink, drawn with rich on stderr."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}  # each finished stage's wall time, for the summary line

    @contextmanager
    def task(self, description: str, total_bytes: int, total_items: int) -> Iterator[Callable[[int], None]]:
        task_id = self.progress.add_task(description, total=total_bytes or None, items=0, total_items=total_items)
        counted = {"items": 0}
        started = time.perf_counter()

        def advance(nbytes: int) -> None:
            counted["items"] += 1 if total_items > 1 else 0
            self.progress.update(task_id, advance=nbytes, items=counted["items"])

        yield advance
        self.progress.update(task_id, completed=total_bytes, items=total_items)
        self.seconds[description] = time.perf_counter() - started

    def download_tqdm(self) -> Any:
        progress = self.progress

        class RichTqdm(tqdm):  # huggingface_hub drives a tqdm class; forward it to rich
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                self._rich_task = progress.add_task(
                    "download", total=kwargs.get("total"), completed=kwargs.get("initial", 0), items=0, total_items=1
                )
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                progress.update(self._rich_task, advance=n or 0)
                return None

        return RichTqdm


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:>8}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        _ItemsColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def _plan_rows(plan: Any, quantization: Any) -> list[tuple[str, str, str, str]]:
    from .quantize import module_path

    rows = []
    for tensor in plan.tensors:
        shape = str(tensor.source_shape)
        if tensor.target_shape != tensor.source_shape:
            shape += f" -> {tensor.target_shape}"
        labels = [t.label for t in tensor.transforms]
        if tensor.pinned_dtype is not None:
            labels.append(f"keep {str(tensor.pinned_dtype).removeprefix('torch.')}")
        if tensor.merge is not None:
            labels.append(tensor.merge.describe())
        if quantization is not None and quantization.quantizes(tensor):
            q = quantization.options
            labels.append(f"quantize {q.bits}-bit {q.mode} (group {q.group_size})")
        elif quantization is not None and module_path(tensor.target_key) in quantization.kept_float:
            labels.append(f"float: width {tensor.target_shape[-1]} is not a multiple of {quantization.options.group_size}")
        rows.append((tensor.source_key, tensor.target_key, shape, ", ".join(labels)))
    rows.extend((d.key, "(dropped)", "", d.reason) for d in plan.dropped)
    rows.extend((d.key, "(merged)", "", d.reason) for d in plan.folded)
    return rows


def _stage_times(seconds: Mapping[str, float]) -> str:
    """"write 7.5s, validate 0.5s, goldens 21.0s": the stages that take time apart from reading, which
    spans the whole conversion (the source stays mapped until the end)."""
    return ", ".join(f"{stage} {seconds[stage]:.1f}s" for stage in ("write", "validate", "goldens") if stage in seconds)


def _print_plan(conversion: Conversion) -> None:
    """A rich table on a terminal; one tab-separated line per key when piped, so it greps cleanly. A second
    model in the archive (canary-1b-v2's aligner) gets its own plan after the main one."""
    if not hasattr(conversion, "derived"):  # a speech-LLM: one plan per folder
        for part in conversion.parts:
            _print_plan_table(f"plan: {conversion.source.path} ({conversion.preset.name}, {part.plan.mapping.file} "
                              f"-> {part.folder or '.'}/)", part.plan, part.quantization, ())
        Console(soft_wrap=True).print("dry run: nothing written")
        return
    _print_plan_table(f"plan: {conversion.source.path} ({conversion.derived.preset.name}, {conversion.plan.mapping.file})",
                      conversion.plan, conversion.quantization, conversion.ignored_members)
    if (aligner := conversion.aligner) is not None:  # canary-1b-v2's timestamp model, converted into its folder
        _print_plan_table(f"plan: {conversion.source.path} {aligner.folder}/ ({aligner.derived.preset.name}, "
                          f"{aligner.plan.mapping.file})", aligner.plan, aligner.quantization, ())
    Console(soft_wrap=True).print("dry run: nothing written")


def _print_plan_table(title: str, plan: Any, quantization: Any, ignored: Any) -> None:
    out = Console(soft_wrap=True)
    if out.is_terminal:
        table = Table(title=title)
        for column in ("source key", "target key", "shape", "transform"):
            table.add_column(column, overflow="fold")
        for row in _plan_rows(plan, quantization):
            table.add_row(*row)
        out.print(table)
    else:
        out.print(title, highlight=False)
        for row in _plan_rows(plan, quantization):
            out.print("\t".join(row), highlight=False, markup=False)
    folded = f", {len(plan.folded)} folded into merges" if plan.folded else ""
    out.print(f"{len(plan.tensors)} tensors mapped, {len(plan.dropped)} dropped{folded}")
    for note in plan.notes():
        out.print(f"note: {note}")
    for member in ignored:
        out.print(f"ignored archive member: {member}")


def _fail(exc: CanaryConvertError) -> None:
    console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the half-written output folder is removed on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"canary-convert {__version__}, mlx {importlib.metadata.version('mlx')}")
        typer.echo(f"blas: {BLAS.describe()}")
        raise typer.Exit()


# Plain click help: typer's rich panels show every flag as `<bool>`; click shows `--force`, `--pnc / --no-pnc`.
_HELP_STYLE: dict[str, Any] = {"add_completion": False, "rich_markup_mode": None}
# `canary-convert SOURCE OUT` is the default command, so its --help lists the others (SUBCOMMANDS).
_SUBCOMMAND_HELP = {"verify": "Check a converted folder from the folder alone, or compare two.",
                    "upload": "Publish a converted MLX folder to the Hugging Face Hub."}
_OTHER_COMMANDS = "\b\nOther commands (each with --help):\n" + "\n".join(
    f"  canary-convert {name:<8}{text}" for name, text in _SUBCOMMAND_HELP.items())

convert_app = typer.Typer(help="Convert a NeMo Canary checkpoint to an MLX folder.", **_HELP_STYLE)


@convert_app.command(epilog=_OTHER_COMMANDS)
def convert_command(
    source: Annotated[str, typer.Argument(help="Hugging Face repo id (nvidia/canary-1b), a .nemo file, or an extracted folder.")],
    out: Annotated[Optional[Path], typer.Argument(help="Output folder (created atomically).")] = None,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision: branch, tag or commit.")] = None,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing, non-empty OUT.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors file, e.g. 5GB or 512MiB.")] = DEFAULT_MAX_SHARD_SIZE,
    quantize: Annotated[Optional[int], typer.Option(help="Quantize Linear and Embedding weights to 4 or 8 bits.")] = None,
    q_group_size: Annotated[Optional[int], typer.Option(help="Weights per scale: 32, 64 or 128 for affine [default: 64, or the mode's own].")] = None,
    q_mode: Annotated[str, typer.Option(help="MLX quantization mode: affine, mxfp4, mxfp8 or nvfp4.")] = "affine",
    license: Annotated[Optional[str], typer.Option("--license", help="Licence for the model card (e.g. cc-by-4.0) when the source's card cannot say.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="The Hub repo a local SOURCE came from, for the model card.")] = None,
    parity: Annotated[bool, typer.Option("--parity", help="Also compare with NeMo itself (needs nemo-toolkit).")] = False,
    parity_audio: Annotated[Optional[list[Path]], typer.Option(help="Extra audio for --parity (repeatable).")] = None,
    layout: Annotated[str, typer.Option(help="Whose parameter names: mlx (canary-convert's), mlx-audio (Canary; loads in mlx-audio too) or parakeet-mlx (Parakeet TDT, RNN-T, TDT/CTC, CTC; loads in parakeet-mlx 0.6.0 too).")] = "mlx",
    upload_repo: Annotated[Optional[str], typer.Option(metavar="ORG/NAME", help="After a successful conversion, publish OUT to this Hub repo.")] = None,
    private: Annotated[bool, typer.Option("--private", help="With --upload-repo: create the repo private.")] = False,
    upload_revision: Annotated[Optional[str], typer.Option(help="With --upload-repo: commit to this branch.")] = None,
    llm_source: Annotated[Optional[str], typer.Option(metavar="PATH", help="A speech-LLM's LLM config and tokenizer folder (default: its pretrained_llm, from the Hub cache).")] = None,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and the BLAS MLX uses, and exit.")] = False,
) -> None:
    """Convert SOURCE into the MLX folder OUT, then validate it (strict load and exact round trip)."""
    try:
        from .convert import ConvertOptions, convert, plan_only
        from .quantize import quantize_options
    except ModuleNotFoundError as exc:
        if exc.name not in CONVERT_EXTRA:
            raise
        _fail(MissingExtraError(f"converting needs {exc.name}, which is not installed (the runtime alone loads and "
                                "transcribes converted folders): pip install 'canary-convert[convert]'"))

    _exit_on_sigterm()
    try:
        options = ConvertOptions(dtype=dtype, revision=revision, force=force, max_shard_bytes=parse_size(max_shard_size),
                                 parity=parity, parity_audio=tuple(parity_audio or ()),
                                 quantize=quantize_options(quantize, q_group_size, q_mode), license=license,
                                 base_model=base_model, upload_repo=upload_repo, layout=layout, llm_source=llm_source)
        publishing = _upload_options(upload_repo, private, upload_revision, dry_run)
        if dry_run:
            with _progress() as progress:
                conversion = plan_only(source, options, RichReporter(progress))
            _print_plan(conversion)
            return
        if out is None:
            raise UsageError("missing OUT: canary-convert SOURCE OUT (or --dry-run)")
        started = time.perf_counter()
        with _progress() as progress:
            reporter = RichReporter(progress)
            conversion = convert(source, out, options, reporter)
    except ParityError as exc:
        _print_parity(exc.report)
        _fail(exc)
    except CanaryConvertError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/bold red] nothing was written")
        raise typer.Exit(130) from None
    seconds = time.perf_counter() - started
    validation = conversion.validation
    assert validation is not None
    if not hasattr(conversion, "derived"):  # a speech-LLM (convert_salm.py)
        _print_speech_llm(source, out, conversion, options.dtype, seconds)
        if publishing is not None:
            try:
                publish(out, publishing)
            except CanaryConvertError as exc:
                _fail(exc)
        return
    precision = options.dtype
    if conversion.quantization is not None:
        q = conversion.quantization
        precision += (f", {q.options.bits}-bit {q.options.mode} (group {q.options.group_size}): "
                      f"{len(q.quantized)} layers quantized, {len(q.kept_float)} kept in float")
    typer.echo(
        f"converted {source} ({conversion.derived.preset.name}) -> {out}: {len(conversion.plan.tensors)} tensors, "
        f"{precision}, {len(conversion.files)} file(s) in {seconds:.1f}s ({_stage_times(reporter.seconds)}); "
        "strict load ok, round trip exact"
    )
    _print_quantization_errors(validation.quantization_errors)
    for note in conversion.plan.notes():
        typer.echo(f"note: {note}")
    if conversion.parity is not None:
        _print_parity(conversion.parity)
    if publishing is not None:
        try:
            publish(out, publishing)
        except CanaryConvertError as exc:
            _fail(exc)


def _print_speech_llm(source: str, out: Path, conversion: Any, dtype: str, seconds: float) -> None:
    audio, llm = conversion.parts
    lora = conversion.lora
    merged = f", LoRA r {lora['r']} merged into {len(llm.plan.merges())} weights" if lora else ""
    typer.echo(f"converted {source} ({conversion.preset.name}) -> {out}: {len(audio.plan.tensors)} audio tensors, "
               f"{len(llm.plan.tensors)} LLM tensors in {llm.folder}/ (mlx-lm){merged}, {dtype} in {seconds:.1f}s; "
               "strict load ok, round trip exact")
    _print_quantization_errors(conversion.validation.quantization_errors)
    for part in conversion.parts:
        for note in part.plan.notes():
            typer.echo(f"note: {note}")


def _upload_options(repo_id: str | None, private: bool, revision: str | None, dry_run: bool) -> UploadOptions | None:
    """--upload-repo and its companions, checked (and the login found) before a long conversion starts."""
    if repo_id is None:
        if private or revision:
            raise UsageError("--private and --upload-revision need --upload-repo ORG/NAME")
        return None
    if dry_run:
        raise UsageError("--upload-repo publishes a conversion; --dry-run writes nothing to publish")
    options = UploadOptions(repo_id, private=private, revision=revision)
    require_token()
    return options


def _print_quantization_errors(errors: list[QuantizationError], shown: int = 5) -> None:
    """The layers quantization moved furthest from their source (all of them are in conversion.json)."""
    if not errors:
        return
    typer.echo(f"quantization error, worst {min(shown, len(errors))} of {len(errors)} layers (relative L2, max |Δ|):")
    for error in errors[:shown]:
        typer.echo(f"  {error.key}: {error.rel_l2:.2e}, {error.max_abs:.2e}")


def _print_parity(report: ParityReport) -> None:
    table = Table(title=f"parity with NeMo ({report.dtype} weights)")
    for column in ("check", "measured", "limit", ""):
        table.add_column(column)
    for check, measured, limit, ok in report.rows():
        table.add_row(check, measured, limit, "[green]ok[/green]" if ok else "[bold red]FAIL[/bold red]")
    Console(width=max(Console().width, 80)).print(table)


transcribe_app = typer.Typer(help="Transcribe or translate audio with a converted MLX folder.", **_HELP_STYLE)


class _ChunkProgress:
    """A rich bar per long file, counting its chunks, on stderr and only on a terminal."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, name: str, done: int, total: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(Path(name).name, total=total)
        self.progress.update(self.tasks[name], completed=done, total=total)


def _chunk_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("chunks"), TimeRemainingColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def _write_outputs(results: list[Any], fmt: str, output_dir: Optional[Path]) -> None:
    from .formats import render, to_json

    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        for result in results:
            stem = Path(result.source).stem if not result.source.startswith("<") else "audio"
            (output_dir / f"{stem}.{fmt}").write_text(render(result, fmt), encoding="utf-8")
        return
    if fmt == "json":
        typer.echo(to_json(results))
    elif fmt == "txt":
        for result in results:
            typer.echo(result.text if len(results) == 1 else f"{result.source}\t{result.text}")
    else:
        typer.echo(render(results[0], fmt), nl=False)


def _context(text: Optional[str]) -> Optional[tuple[int, int]]:
    """`--context 128,128` -> (128, 128)."""
    if text is None:
        return None
    try:
        left, right = (int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--context {text!r}: give LEFT,RIGHT frames, such as 128,128") from None
    return left, right


@transcribe_app.command()
def transcribe_command(
    audio: Annotated[list[Path], typer.Argument(help="Audio files (WAV/FLAC; other formats need ffmpeg).")],
    model: Annotated[str, typer.Option("--model", "-m", help="A folder written by canary-convert, or a Hub repo id (ORG/NAME).")],
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of --model: branch, tag or commit.")] = None,
    source_lang: Annotated[Optional[str], typer.Option(help="Spoken language (default: the checkpoint's prompt default, else its first language).")] = None,
    target_lang: Annotated[Optional[str], typer.Option(help="Output language (default: the spoken one given, else the checkpoint's default).")] = None,
    task: Annotated[Optional[str], typer.Option(help="transcribe or translate (or NeMo's asr, ast, s2t_translation); default: from the languages.")] = None,
    pnc: Annotated[Optional[bool], typer.Option("--pnc/--no-pnc", help="Punctuation and capitals (default: the checkpoint's, else on).")] = None,
    timestamps: Annotated[Optional[bool], typer.Option("--timestamps", help="Word and segment times (canary2 models with frame tokens, transducers).")] = None,
    decoder: Annotated[Optional[str], typer.Option(help="A hybrid transducer's head: transducer (NeMo's default) or ctc.")] = None,
    attention: Annotated[str, typer.Option(help="Encoder self-attention: full, or local (NeMo's rel_pos_local_attn, for long inputs).")] = "full",
    context: Annotated[Optional[str], typer.Option(help="Local attention's LEFT,RIGHT frames (equal; NVIDIA's recipe: 128,128).")] = None,
    beam_size: Annotated[Optional[int], typer.Option(help="Beam size (default: the checkpoint's).")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy search instead of beam search.")] = False,
    batch_size: Annotated[int, typer.Option(help="Clips (or chunks of a long file) decoded together.")] = 4,
    chunking: Annotated[str, typer.Option(help="Long audio: nemo (NeMo's rule for the checkpoint), pauses, or off.")] = "nemo",
    chunk_seconds: Annotated[Optional[float], typer.Option(help="Window for long audio (default: NeMo's, 40 s).")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="txt, json, srt or vtt.")] = "txt",
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    output_dir: Annotated[Optional[Path], typer.Option(help="Write one file per input here instead of stdout.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Speech-LLM models (canary-qwen): the user turn, {audio} where the audio goes (default: the model's).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Speech-LLM models: tokens generated per window at most (default: the model's).")] = None,
) -> None:
    """Print one transcript per audio file (prefixed by its path when there are several)."""
    from . import load_model
    from .formats import FORMATS

    fmt = "json" if as_json else fmt
    try:
        if fmt not in FORMATS:
            raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
        if fmt in ("srt", "vtt") and len(audio) > 1 and output_dir is None:
            raise UsageError(f"--format {fmt} with several inputs needs --output-dir (one subtitle file each)")
        loaded = load_model(model, revision)
        if attention != "full" or context is not None:
            if not hasattr(loaded, "use_attention"):
                raise UsageError("--attention and --context are for FastConformer models, not a speech-LLM")
            loaded.use_attention(attention, _context(context))
        if hasattr(loaded, "llm"):  # a speech-LLM: prompted in words, greedy, in windows of the model's length
            canary_only = {"--source-lang": source_lang, "--target-lang": target_lang, "--task": task, "--pnc": pnc,
                           "--timestamps": timestamps, "--beam-size": beam_size, "--greedy": greedy or None,
                           "--decoder": decoder}
            if given := [flag for flag, value in canary_only.items() if value is not None]:
                raise UsageError(f"{', '.join(given)}: Canary options; a speech-LLM takes --prompt instead")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TranscriptWarning)  # printed below, from the transcripts
                results = loaded.transcribe([str(path) for path in audio], prompt=prompt,
                                            max_new_tokens=max_new_tokens, chunk_seconds=chunk_seconds)
        elif prompt is not None or max_new_tokens is not None:
            raise UsageError("--prompt and --max-new-tokens are for speech-LLM models (canary-qwen)")
        else:
            with _chunk_bar() as bar, warnings.catch_warnings():
                # The warnings are printed below, once each, from the transcripts themselves.
                warnings.simplefilter("ignore", TranscriptWarning)
                # Only the options given: a model without prompts (CTC) refuses prompt options by name.
                given = {name: value for name, value in (
                    ("source_lang", source_lang), ("target_lang", target_lang), ("task", task), ("pnc", pnc),
                    ("timestamp", timestamps), ("strategy", "greedy" if greedy else None), ("beam_size", beam_size),
                    ("chunk_seconds", chunk_seconds), ("decoder", decoder)) if value is not None}
                results = loaded.transcribe(audio, batch_size=batch_size, chunking=chunking,
                                            progress=_ChunkProgress(bar), **given)
    except CanaryConvertError as exc:
        _fail(exc)
    for result in results:
        for message in result.warnings:
            console.print(f"[bold yellow]warning:[/bold yellow] {message}", highlight=False, soft_wrap=True)
    _write_outputs(results, fmt, output_dir)


verify_app = typer.Typer(help=_SUBCOMMAND_HELP["verify"], **_HELP_STYLE)

_STATUS_STYLE = {"pass": "[green]pass[/green]", "fail": "[bold red]FAIL[/bold red]", "error": "[bold red]ERROR[/bold red]",
                 "advisory": "[yellow]advisory[/yellow]", "skipped": "[dim]skipped[/dim]"}


@verify_app.command()
def verify_command(
    target: Annotated[str, typer.Argument(help="A folder written by canary-convert, or a Hub repo id.")],
    revision: Annotated[Optional[str], typer.Option(help="Hub revision of TARGET: branch, tag or commit.")] = None,
    against: Annotated[Optional[str], typer.Option(help="Compare TARGET with this folder (or repo) tensor by tensor.")] = None,
    against_revision: Annotated[Optional[str], typer.Option(help="Hub revision of the --against repo.")] = None,
    goldens: Annotated[Optional[Path], typer.Option(help="Golden file to check against (default: TARGET's goldens.json).")] = None,
    audio: Annotated[Optional[list[Path]], typer.Option(help="The --parity-audio clips of the goldens (repeatable).")] = None,
    device: Annotated[str, typer.Option(help="cpu (reproducible anywhere) or gpu.")] = "cpu",
    update: Annotated[bool, typer.Option("--update", help="Record TARGET's goldens again and say what changed.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON (schema canary-convert/verify-report v1).")] = None,
    junit_xml: Annotated[Optional[Path], typer.Option(help="Write one JUnit test case per check.")] = None,
    tol_features: Annotated[Optional[float], typer.Option(help="Override the features tolerance (max |Δ|).")] = None,
    tol_encoder: Annotated[Optional[float], typer.Option(help="Override the encoder tolerance (relative L2).")] = None,
    tol_logprobs: Annotated[Optional[float], typer.Option(help="Override the log-prob tolerance (max |Δ|).")] = None,
    near_tie: Annotated[Optional[float], typer.Option(help="Top-2 gap below which a token difference is advisory.")] = None,
) -> None:
    """Manifest, strict load and golden outputs of TARGET; exit 0 pass, 3 regression, 1 error, 2 usage."""
    from .source import repo_files, resolve_folder
    from .verify import compare_folders, update_goldens, verify_folder

    try:
        if update and (against or goldens):
            raise UsageError("--update rewrites TARGET's own goldens; it takes no --against or --goldens")
        if against_revision and not against:
            raise UsageError("--against-revision is the revision of --against ORG/NAME; give --against too")
        folder = resolve_folder(target, revision)
        if update:
            for change in update_goldens(folder, device, tuple(audio or ())):
                typer.echo(change)
            typer.echo(f"goldens of {target} recorded again")
            return
        if against:
            report = compare_folders(folder, resolve_folder(against, against_revision), f"{target} against {against}", device)
        else:
            overrides = {"features_max_abs": tol_features, "encoder_rel_l2": tol_encoder,
                         "logprobs_max_abs": tol_logprobs, "near_tie": near_tie}
            report = verify_folder(folder, target, device, goldens, overrides, tuple(audio or ()),
                                   repo_files(target, folder))
    except CanaryConvertError as exc:
        _fail(exc)
    if json_path:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if junit_xml:
        junit_xml.write_bytes(report.to_junit())
    table = Table(title=f"verify {report.target} ({report.device}, MLX {mx.__version__}, {platform.platform()})")
    for column in ("check", "", "detail"):
        table.add_column(column, overflow="fold")
    for check in report.checks:
        where = " ".join(part for part in (check.file and f"[{check.file}]", check.stage and f"<{check.stage}>") if part)
        table.add_row(escape(check.name), _STATUS_STYLE[check.status], escape(f"{check.detail} {where}".strip()))
    Console(width=max(Console().width, 120)).print(table)
    raise typer.Exit(report.exit_code)


upload_app = typer.Typer(help=_SUBCOMMAND_HELP["upload"], **_HELP_STYLE)


@upload_app.command()
def upload_command(
    out: Annotated[Path, typer.Argument(help="A folder written by canary-convert.")],
    repo_id: Annotated[str, typer.Argument(metavar="ORG/NAME", help="The Hub model repo; created when absent.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private; refuse an existing public one.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Commit to this branch, created from main when absent.")] = None,
) -> None:
    """Upload OUT to ORG/NAME in one commit, once OUT matches its manifest, passed validation and names a licence."""
    _exit_on_sigterm()
    try:
        publish(out, UploadOptions(repo_id, private=private, revision=revision))
    except CanaryConvertError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted:[/bold red] the upload to {repo_id} did not finish")
        raise typer.Exit(130) from None


def publish(folder: Path, options: UploadOptions) -> None:
    """Upload `folder` with its steps on stderr and the commit on stdout; raises UploadError (see upload.py).

    The convert command calls this for `--upload-repo` once the conversion succeeded.
    """
    result = upload(folder, options, on_step=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))
    typer.echo(f"uploaded {folder} -> {result.repo_id}@{result.revision}: {len(result.files)} files over "
               f"{result.transport}, commit {result.commit[:12]} ({result.commit_url})")


# `canary-convert NAME ...` for these names runs the subcommand; anything else is a SOURCE to convert
# (a local folder that happens to share a subcommand's name is reached as ./NAME).
SUBCOMMANDS: dict[str, typer.Typer] = {"upload": upload_app, "verify": verify_app}


def main() -> None:
    """The `canary-convert` entry point: a subcommand by name, else the conversion itself."""
    args = sys.argv[1:]
    if args and args[0] in SUBCOMMANDS:
        SUBCOMMANDS[args[0]](args[1:], prog_name=f"canary-convert {args[0]}")
    else:
        convert_app(args, prog_name="canary-convert")
