"""`lmkit generate`: continue prompts with a GPT (streaming text to stdout), answer each as a chat
message (--chat), rewrite each line with an encoder-decoder, fill in [MASK]s with a BERT, or label
each line with a classifier."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.options import (
    Beam,
    ChatTemplate,
    CheckpointOpt,
    DeviceOpt,
    Greedy,
    Json,
    LengthPenalty,
    MaxNewTokens,
    NoRepeatNgram,
    ProjectDir,
    Quantize,
    Quiet,
    RepetitionPenalty,
    Seed,
    Stop,
    System,
    Temperature,
    TopP,
    common,
    input_texts,
    user_errors,
)


def generate(
    ctx: typer.Context,
    prompts: Annotated[Optional[list[str]], typer.Argument(
        show_default=False, help="Prompts to continue, or sources to rewrite (default: one per line of stdin).")
    ] = None,
    max_new_tokens: MaxNewTokens = 200,
    temperature: Temperature = None,
    top_k: Annotated[int, typer.Option(
        help="Sample from the k likeliest tokens only (0: all); with --fill-mask, candidates shown (0: 5).",
    )] = 0,
    top_p: TopP = 0.95,
    greedy: Greedy = False,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Answer each prompt as a user's message, with the checkpoint's chat template.")] = False,
    system: System = None,
    chat_template: ChatTemplate = None,
    quantize: Quantize = None,
    compile_model: Annotated[bool, typer.Option(
        "--compile", help="Decode with the model compiled by torch.compile (dynamic shapes; the first call "
        "compiles, ~30 s). Measured on CPU: no gain (0.90x); it is for GPUs.")] = False,
    draft: Annotated[Optional[Path], typer.Option(
        show_default=False, help="Speculative decoding: a smaller checkpoint with the same tokenizer (e.g. a "
        "distilled student) proposes tokens that the model checks in one pass.")] = None,
    draft_tokens: Annotated[int, typer.Option(help="Tokens the draft proposes per round (1 to 32).")] = 4,
    num_samples: Annotated[int, typer.Option(
        "--num-return-sequences", "--num-samples",
        help="Outputs per input: samples, or the best hypotheses of a beam search.")] = 1,
    beam: Beam = 1,
    length_penalty: LengthPenalty = 1.0,
    no_repeat_ngram_size: NoRepeatNgram = 0,
    repetition_penalty: RepetitionPenalty = 1.0,
    stop: Stop = None,
    echo: Annotated[Optional[bool], typer.Option(
        "--echo/--no-echo", show_default=False,
        help="Print the prompt before its continuation (default: yes for GPT, no for seq2seq).")] = None,
    fill_mask: Annotated[bool, typer.Option(
        "--fill-mask", help="Predict each [MASK] in the text (bert checkpoints do this by default).")] = False,
    json_out: Json = False,
    checkpoint: CheckpointOpt = None,
    project: ProjectDir = None,
    device: DeviceOpt = None,
    seed: Seed = None,
    quiet: Quiet = False,
) -> None:
    """Continue each prompt (GPT) or answer it (--chat), rewrite each line (seq2seq), fill in [MASK]s (BERT)
    or label each line (classifier) with the project's latest (or a chosen) checkpoint."""
    from lmkit import checkpoint as ckpt_lib
    from lmkit import device as dev
    from lmkit import generate as gen
    from lmkit import project as proj
    from lmkit import speculative

    opts = common(ctx, project, device, seed, quiet)
    with user_errors():
        p = proj.Project.open(opts.project, create=False)
        ckpt = ckpt_lib.Checkpoint(ckpt_lib.resolve(checkpoint, p))
        mode = gen.generation_mode(ckpt, fill_mask=fill_mask, chat=chat, system=system, chat_template=chat_template,
                                   draft=draft is not None)
        sampler = gen.sample_config(  # built (and so checked) before the model loads, whatever the mode
            ckpt.config.model.arch, temperature, max_new_tokens=max_new_tokens, top_k=top_k, top_p=top_p,
            greedy=greedy, num_samples=num_samples, seed=opts.seed, beam=beam, length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
            stop=tuple(stop or ()))
        level = quantize.value if quantize else None
        draft_ckpt = speculative.open_draft(draft, p, ckpt, sampler, draft_tokens, level)
        texts, typed = input_texts(prompts, "prompt")
        where = dev.pick_device(opts.device)
        model, tokenizer = gen.load_for_generation(ckpt, where, level, compile_model=compile_model, log=opts.say)
        job = _Job(ckpt, model, tokenizer, sampler, where, json_out, echo, 1 if typed else 64, top_k, system,
                   chat_template, draft_ckpt, draft_tokens, opts.say)
        _PRINTERS[mode](job, texts)


@dataclass(frozen=True)
class _Job:
    """What `lmkit generate` prints with: the loaded model and the flags of the output."""

    ckpt: Any
    model: Any
    tokenizer: Any
    sampler: Any
    where: Any
    json_out: bool
    echo: Optional[bool]  # None: the mode's default
    chunk: int  # inputs decoded together (1 for lines typed at a terminal: each gets its answer at once)
    top_k: int
    system: Optional[str]
    chat_template: Optional[Path]
    draft: Any  # a checkpoint (speculate)
    draft_tokens: int
    say: Callable[[str], None]


def _sample(job: _Job, prompts: Iterable[str]) -> None:
    """Print samples: streamed as they are decoded (one sample, text), or whole (several, or JSON)."""
    from lmkit import generate as gen

    for prompt in prompts:
        _print_completion(
            lambda on_text, p=prompt: gen.generate(job.model, job.tokenizer, p, job.sampler, job.where, on_text),
            job.sampler, prompt if job.echo is not False else None, job.json_out)


def _chat(job: _Job, texts: Iterable[str]) -> None:
    """Answer each text as a user's message (after the --system message)."""
    from lmkit import chat as chat_lib
    from lmkit import generate as gen

    form = chat_lib.chat_format(job.tokenizer, job.chat_template)
    start = [{"role": "system", "content": job.system}] if job.system else []
    for text in texts:
        messages = [*start, {"role": "user", "content": text}]
        _print_completion(lambda on_text, m=messages: gen.reply(job.model, form, m, job.sampler, job.where, on_text),
                          job.sampler, None, job.json_out)


def _speculate(job: _Job, prompts: Iterable[str]) -> None:
    """Each prompt continued with the draft's help; the acceptance rate on stderr (and in --json)."""
    from lmkit import speculative
    from lmkit.quantize import model_for_decoding

    draft_model = model_for_decoding(job.draft, job.where)
    found: dict[str, Any] = {}  # the last prompt's figures
    for prompt in prompts:
        def run(on_text: Any, p: str = prompt) -> Any:
            completion, found["stats"] = speculative.generate_with_draft(
                job.model, draft_model, job.tokenizer, p, job.sampler, job.where, draft_tokens=job.draft_tokens,
                on_text=on_text)
            return completion

        _print_completion(run, job.sampler, prompt if job.echo is not False else None, job.json_out,
                          extra=lambda: found["stats"].to_dict())
        stats = found["stats"]
        job.say(f"draft: {stats.accepted}/{stats.proposed} proposed tokens accepted ({stats.acceptance_rate:.0%}), "
                f"{stats.rounds} model passes")


def _print_completion(run: Any, sampler: Any, echo: Optional[str], json_out: bool, extra: Any = None) -> None:
    """RUN(on_text) the generation and print it: streamed as it is decoded (one sample, text),
    or whole (several, or JSON); after ECHO, the prompt, when given."""
    stream = sampler.num_samples == 1 and sampler.beam == 1 and not json_out
    if stream and echo:
        sys.stdout.write(echo)
    on_text = (lambda i, text: (sys.stdout.write(text), sys.stdout.flush())) if stream else None
    completion = run(on_text)
    if json_out:
        sys.stdout.write(json.dumps({**completion.to_dict(), **(extra() if extra else {})}) + "\n")
    elif stream:
        sys.stdout.write("\n")
    else:
        sys.stdout.write("\n".join((echo or "") + s.text + "\n" for s in completion.samples))
    sys.stdout.flush()


def _rewrite(gen: Any, model: Any, tokenizer: Any, sources: Iterable[str], sampler: Any, where: Any, echo: bool,
             json_out: bool, chunk_size: int) -> None:
    """Print each source's output(s), a line each (after `source<TAB>` with --echo; a newline inside an
    output is written as \\n so that lines stay aligned with the input), or a JSON object per source."""
    lines = iter(sources)
    while chunk := list(itertools.islice(lines, chunk_size)):
        for completion in gen.translate(model, tokenizer, chunk, sampler, where):
            if json_out:
                sys.stdout.write(json.dumps(completion.to_dict()) + "\n")
                continue
            for s in completion.samples:
                text = s.text.replace("\n", "\\n")
                sys.stdout.write((f"{completion.prompt}\t" if echo else "") + text + "\n")
        sys.stdout.flush()


def _classify(model: Any, tokenizer: Any, labels: list[str], texts: Iterable[str], where: Any,
              json_out: bool, chunk_size: int) -> None:
    """Print `label<TAB>probability` (or a JSON object) per input; a tab inside one splits a text pair."""
    from lmkit import evaluate as ev
    from lmkit import finetune_data

    lines = iter(texts)
    while chunk := list(itertools.islice(lines, chunk_size)):
        examples = [finetune_data.LabelledText(a, "", b or None)
                    for a, _, b in (text.partition("\t") for text in chunk)]
        for example, pred in zip(examples, ev.predict_labels(model, tokenizer, examples, labels, where)):
            if json_out:
                sys.stdout.write(json.dumps(pred.record(example)) + "\n")
            else:
                sys.stdout.write(f"{pred.label}\t{pred.prob:.4f}\n")
        sys.stdout.flush()


def _print_fill(result: Any, json_out: bool) -> None:
    """The filled text, then one line per mask: its candidates with probabilities."""
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
        return
    typer.echo(result.filled)
    for k, mask in enumerate(result.masks, start=1):
        typer.echo(f"  [MASK] {k}: " + " | ".join(f"{text!r} {p:.1%}" for text, _, p in mask.candidates))


def _fill(job: _Job, texts: Iterable[str]) -> None:
    from lmkit import generate as gen

    for text in texts:
        _print_fill(gen.fill_mask(job.model, job.tokenizer, text, job.top_k or 5, job.where), job.json_out)


def _rewrite_job(job: _Job, sources: Iterable[str]) -> None:
    from lmkit import generate as gen

    _rewrite(gen, job.model, job.tokenizer, sources, job.sampler, job.where, bool(job.echo), job.json_out, job.chunk)


# What each of lmkit.generate.generation_mode's modes prints.
_PRINTERS: dict[str, Callable[[_Job, Iterable[str]], None]] = {
    "classify": lambda job, texts: _classify(job.model, job.tokenizer, job.ckpt.labels, texts, job.where,
                                             job.json_out, job.chunk),
    "fill-mask": _fill,
    "rewrite": _rewrite_job,
    "speculate": _speculate,
    "chat": _chat,
    "continue": _sample,
}
