"""`moejax generate`: continuations of prompts from a checkpoint (or the built-in model), with model.generate."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from moejax.commands.options import MESH_HELP, STEERING_HELP, check_options, option
from moejax.data.corpus import read_lines
from moejax.data.tokenize import byte_level_tokenizer, transformers_tokenizer
from moejax.errors import DataError, SettingsError
from moejax.io import refuse_unsafe, write_file
from moejax.models.builtin import NAME as BUILTIN


@dataclasses.dataclass(frozen=True)
class GenerateSettings:
    model: Path | None = option(None, "Hugging Face checkpoint directory (or an Orbax one from `moejax convert`) "
                                "with its tokenizer files; default: the built-in demonstration model (byte-level, "
                                "random weights: its text is noise)", kind=Path, metavar="DIR")
    prompt: str | None = option(None, "the prompt to continue", metavar="TEXT")
    prompts: Path | None = option(None, "a UTF-8 text file of prompts, one per line (blank lines skipped)",
                                  kind=Path, metavar="FILE")
    max_new_tokens: int = option(64, "tokens to generate at most per prompt", kind=int, minimum=1)
    chat: bool = option(False, "wrap each prompt as a user turn in the model's chat template (from its own "
                        "tokenizer files) before generating", kind=bool)
    sample: bool = option(False, "sample instead of greedy decoding (temperature, then top-k, then top-p)",
                          kind=bool)
    temperature: float = option(1.0, "sampling temperature (with --sample)", kind=float, above=0)
    top_k: int | None = option(None, "sample among the K most likely tokens only (with --sample)", kind=int,
                               minimum=1, metavar="K")
    top_p: float | None = option(None, "sample among the most likely tokens whose probability reaches P (with "
                                 "--sample)", kind=float, above=0, maximum=1, metavar="P")
    seed: int = option(0, "sampling seed: the same seed gives the same text", kind=int, minimum=0)
    batch_size: int = option(8, "prompts generated together", kind=int, minimum=1)
    steering: Path | None = option(None, STEERING_HELP, kind=Path, metavar="FILE")
    dtype: str = option("float32", "parameter dtype", choices=("float32", "bfloat16"))
    mesh: str | None = option(None, MESH_HELP, metavar="AXIS=N,...")
    stream: bool = option(False, "print each continuation as its tokens come, with the time to the first token "
                          "and the tokens per second at the end (the default when the output is a terminal); "
                          "prompts then run one at a time", kind=bool)
    no_stream: bool = option(False, "print each continuation whole once its batch is done (the default when the "
                             "output is not a terminal)", kind=bool)
    out: Path | None = option(None, "also write the prompts and continuations to this JSON file (replaced only if "
                              "`moejax generate` wrote it)", kind=Path, metavar="FILE")
    allow_nonfinite: bool = option(False, "load a checkpoint holding NaN or infinite weights instead of refusing it",
                                   kind=bool)

    def __post_init__(self):
        check_options(self)
        if (self.prompt is None) == (self.prompts is None):
            raise SettingsError("give exactly one of --prompt TEXT and --prompts FILE")
        if not self.sample and (self.top_k is not None or self.top_p is not None or self.temperature != 1.0):
            raise SettingsError("--temperature, --top-k and --top-p apply to sampling: add --sample")
        if self.stream and self.no_stream:
            raise SettingsError("give --stream or --no-stream, not both")

    @property
    def streaming(self) -> bool:
        """--stream, --no-stream, or by default whether standard output is a terminal."""
        return self.stream or (not self.no_stream and sys.stdout.isatty())


def read_prompts(settings: GenerateSettings) -> list[str]:
    if settings.prompt is not None:
        if not settings.prompt:
            raise DataError("--prompt is empty")
        return [settings.prompt]
    lines = read_lines(settings.prompts, "--prompts")  # a byte-order mark dropped, any line end
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"--prompts {settings.prompts}: no prompts (one per line)")
    return prompts


def generate(settings: GenerateSettings) -> list[dict]:
    """[{"prompt", "continuation"}] per prompt, in order."""
    import jax.numpy as jnp

    from moejax.loading import generation_defaults, load_config
    from moejax.models.steering import Steering
    from moejax.opening import model_files, open_model
    from moejax.parallel.mesh import make_mesh

    prompts = read_prompts(settings)
    if settings.out is not None:
        refuse_unsafe(settings.out, [p for p in (settings.model, settings.prompts, settings.steering)
                                     if p is not None], "--out")
    steering = None if settings.steering is None else Steering.from_json(settings.steering)
    mesh = make_mesh(settings.mesh) if settings.mesh else None
    files = model_files(settings.model)
    if files is None:
        tokenizer, eos = byte_level_tokenizer(), [byte_level_tokenizer().eos_token_id]
    else:
        load_config(files)  # config.json first: a wrong field is named by moejax, not by the tokenizer
        tokenizer = transformers_tokenizer(files)  # before the weights: a missing tokenizer fails fast
        eos = generation_defaults(files)
    model = open_model(settings.model, jnp.dtype(settings.dtype), mesh, settings.allow_nonfinite).model
    if steering is not None:
        steering.check(model.config)
    texts = [_chat(tokenizer, p, settings.model) for p in prompts] if settings.chat else prompts
    # A chat template writes its own special tokens.
    encoded = [tokenizer.encode(t, add_special_tokens=not settings.chat) for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    sampling = (dict(do_sample=True, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                     seed=settings.seed) if settings.sample else {})
    results = []
    if settings.streaming:
        for i, (prompt, tokens) in enumerate(zip(prompts, encoded, strict=True), 1):
            print(f"[{i}] {prompt}", flush=True)
            ids = np.asarray([tokens], np.int64)
            stream = Stream(tokenizer, eos)
            model.generate(ids, np.ones_like(ids), max_new_tokens=settings.max_new_tokens, eos_token_id=eos or None,
                           pad_token_id=pad, steering=steering, on_token=stream, **sampling)
            results.append({"prompt": prompt, "continuation": stream.finish()})
    for start in range(0, len(encoded) if not settings.streaming else 0, settings.batch_size):
        batch = encoded[start:start + settings.batch_size]
        width = max(len(e) for e in batch)
        ids = np.full((len(batch), width), pad, np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, tokens in enumerate(batch):
            ids[row, width - len(tokens):], mask[row, width - len(tokens):] = tokens, 1
        out = model.generate(ids, mask, max_new_tokens=settings.max_new_tokens, eos_token_id=eos or None,
                             pad_token_id=pad, steering=steering, **sampling)
        for row, prompt in enumerate(prompts[start:start + len(batch)]):
            results.append({"prompt": prompt,
                            "continuation": tokenizer.decode(out.sequences[row, width:], skip_special_tokens=True)})
    if settings.out is not None:
        given = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
        record = {"written_by": "moejax generate", "model": str(settings.model or BUILTIN), "settings": given,
                  "generations": results}
        write_file(settings.out, json.dumps(record, ensure_ascii=False, indent=2), "generate", "--out")
    return results


class Stream:
    """on_token for one prompt: prints the continuation's new text as each token comes (decoding the whole
    continuation again each time, so tokens that only make text together, such as a character's UTF-8 bytes, print
    once complete), stops at an end-of-sequence token, and at the end says the time to the first token (the
    prefill), the first decode step (both include compiling, on a shape this process has not run) and the decode
    rate after them."""

    def __init__(self, tokenizer, eos: list[int]):
        self.tokenizer, self.eos = tokenizer, set(eos)
        self.tokens: list[int] = []
        self.printed = ""
        self.ended = False
        self.started = time.perf_counter()
        self.times: list[float] = []  # when each token came, from the start

    def __call__(self, token_b: np.ndarray) -> None:
        self.times.append(time.perf_counter() - self.started)
        token = int(token_b[0])
        if self.ended:
            return
        if token in self.eos:
            self.ended = True
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        ready = text.rstrip("\ufffd")  # an incomplete character waits for its next bytes
        if ready.startswith(self.printed) and len(ready) > len(self.printed):
            print(ready[len(self.printed):], end="", flush=True)
            self.printed = ready

    def finish(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.printed):
            print(text[len(self.printed):], end="")
        times = self.times
        said = [f"{len(self.tokens)} tokens"] + ([f"first after {times[0]:.2f} s"] if times else [])
        if len(times) > 1:
            said.append(f"the first decode step {times[1] - times[0]:.2f} s")
        if len(times) > 2:
            said.append(f"then {(len(times) - 2) / (times[-1] - times[1]):.1f} tokens/s")
        print(f"\n({'; '.join(said)}; compiling is included on a shape not run before)\n", flush=True)
        return text


def _chat(tokenizer, prompt: str, model_dir: Path | None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"--chat: the tokenizer of {model_dir or BUILTIN} has no chat template "
                        "(chat_template in tokenizer_config.json or chat_template.jinja)")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
