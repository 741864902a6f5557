"""Self-generated calibration text (Shin et al., "Rethinking pruning LLMs", EMNLP 2024, arXiv 2406.15524).

The dense model writes its own calibration windows: each starts from one random vocabulary token
whose text is ASCII letters (an "English start"), continues with `greedy_tokens` greedy tokens,
then samples at `temperature` up to `seqlen` tokens. The paper adds such windows to the real ones
for reconstruction (e.g. 256 real + 256 generated) while the importance scores keep using the
real windows only.

Generation needs the whole model at once (unlike pruning, which streams one layer), so the memory
is checked before loading, and the windows are cached as a readable JSONL file under
`models.cache_dir() / "selfgen"`, keyed by the model and every setting that changes them.

Determinism: every window draws from its own torch.Generator seeded from (seed, window index),
for its start token and for every sampled token, so a window depends on the seed, its index and
the model, not on the micro-batch. Sampling and greedy choices are made by one logits processor
among the tokenizer's ordinary tokens: special tokens (EOS included) and ids past the tokenizer
(padded embedding rows) are never produced, so every window has exactly `seqlen` tokens.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from transformers import LogitsProcessor

from rcpu_lite.display import PlainReporter, Reporter
from rcpu_lite.models import cache_dir as models_cache_dir

log = logging.getLogger("rcpu_lite")

QUANTS = ("none", "4bit")
FORMAT = "rcpu-lite self-generated calibration"
FORMAT_VERSION = 1
GIB = 2**30
_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
_MAX_START_DRAWS = 10_000


class SelfGenError(ValueError):
    pass


@dataclass(frozen=True)
class GenSettings:
    """Everything that changes the generated windows (besides the model); part of the cache key."""

    n: int
    seqlen: int
    seed: int
    greedy_tokens: int = 5
    temperature: float = 1.0
    quant: str = "none"

    def validate(self) -> "GenSettings":
        if self.n < 1 or self.seqlen < 2:
            raise SelfGenError(
                f"self-generated windows need n >= 1 and seqlen >= 2, got n={self.n}, seqlen={self.seqlen}"
            )
        if not 0 <= self.greedy_tokens <= self.seqlen - 1:
            raise SelfGenError(
                f"greedy_tokens must be in [0, seqlen - 1 = {self.seqlen - 1}], got {self.greedy_tokens}"
            )
        if not self.temperature > 0:
            raise SelfGenError(f"the sampling temperature must be > 0, got {self.temperature}")
        if self.quant not in QUANTS:
            raise SelfGenError(f"--gen-quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        return self


# ---------------------------------------------------------------------------------------------- memory


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    raise SelfGenError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def _tensor_table(model_dir: Path) -> dict[str, tuple[str, int]]:
    """Every tensor of the checkpoint: name -> (safetensors dtype, element count), from the file headers."""
    table = {}
    for path in _safetensors_files(model_dir):
        try:
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
        except (OSError, struct.error, ValueError) as e:
            raise SelfGenError(f"cannot read the safetensors header of {path} ({e})") from None
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                table[name] = (info["dtype"], count)
    return table


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The floating dtype that holds most of the checkpoint's parameters (the one the model loads in)."""
    counts: dict[str, int] = {}
    for dtype, count in _tensor_table(model_dir).values():
        if dtype in _DTYPES:
            counts[dtype] = counts.get(dtype, 0) + count
    if not counts:
        raise SelfGenError(f"{model_dir} has no floating-point tensors")
    return _DTYPES[max(counts, key=counts.get)][0]


def _weights_bytes(model_dir: Path, quant: str) -> tuple[int, int]:
    """(parameter count, bytes of the loaded weights): stored dtype, or 4-bit for the decoder's linear layers.

    bitsandbytes NF4 with double quantisation costs ~0.53 byte per weight; the embeddings, lm_head,
    norms and biases stay in 16 bits.
    """
    params = total = 0
    for name, (dtype, count) in _tensor_table(model_dir).items():
        params += count
        if quant == "4bit":
            linear = name.endswith(".weight") and ".layers." in name and "norm" not in name
            total += count * 0.53 if linear else count * 2
        else:
            total += count * _DTYPES.get(dtype, (None, 4))[1]
    return params, int(total)


def _activation_bytes(model_dir: Path, seqlen: int, micro_batch: int, act_bytes: int) -> int:
    """The KV cache of one micro-batch at full length, and fp32 logits for it (a few copies)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads", 1)
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // max(heads, 1)
    kv = 2 * cfg.get("num_hidden_layers", 0) * cfg.get("num_key_value_heads", heads) * head_dim
    kv_cache = micro_batch * seqlen * kv * act_bytes
    logits = 4 * micro_batch * cfg.get("vocab_size", 0) * 4
    return kv_cache + logits


def generation_memory_bytes(
    model_dir: Path, device: str | torch.device, quant: str = "none", *, seqlen: int = 2048, micro_batch: int = 8
) -> int:
    """Memory that generating with the whole model needs on `device`, estimated from the checkpoint:
    parameters x bytes per parameter (stored dtype, or ~0.53 for 4-bit), + 10 %, + the KV cache and logits of
    one micro-batch, + 256 MiB. The estimate is the same for either device; `device` says where it must fit."""
    model_dir = Path(model_dir)
    _, weights = _weights_bytes(model_dir, quant)
    act = 2 if quant == "4bit" else stored_dtype(model_dir).itemsize
    return int(weights * 1.1) + _activation_bytes(model_dir, seqlen, micro_batch, act) + 256 * 2**20


def available_memory_bytes(device: torch.device) -> int:
    """Free memory where the model would live: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def check_memory(model_dir: Path, device: torch.device, quant: str, seqlen: int, micro_batch: int) -> int:
    """Refuse up front, in one line with the numbers, when the whole model will not fit; return the need."""
    need = generation_memory_bytes(model_dir, device, quant, seqlen=seqlen, micro_batch=micro_batch)
    have = available_memory_bytes(device)
    if need > have:
        params, _ = _weights_bytes(model_dir, quant)
        where = f"is free on {device}" if device.type == "cuda" else "of RAM is available"
        if device.type == "cuda" and quant == "none":
            four = generation_memory_bytes(model_dir, device, "4bit", seqlen=seqlen, micro_batch=micro_batch)
            alt = f"use --gen-quant 4bit (about {four / GIB:.1f} GiB), or free GPU memory"
        elif device.type == "cuda":
            alt = "free GPU memory, or generate on a larger GPU"
        else:
            alt = "free memory, or generate on a CUDA GPU with --gen-quant 4bit"
        raise SelfGenError(
            f"self-generated calibration loads the whole model ({params / 1e9:.2f} B parameters): it needs about "
            f"{need / GIB:.1f} GiB but {have / GIB:.1f} GiB {where}; {alt} (fewer --self-nsamples does not "
            f"reduce it; a smaller --micro-batch barely does), or calibrate on real text only"
        )
    return need


# ---------------------------------------------------------------------------------------------- generation


def _window_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of one window: a function of (seed, index) only."""
    digest = hashlib.sha256(f"rcpu-lite selfgen {seed} {index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _ordinary_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Mask (vocab_size,) of the ids generation may produce: the tokenizer's, minus its special tokens."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[: min(len(tokenizer), vocab_size)] = True
    special = [i for i in tokenizer.all_special_ids if i is not None and 0 <= i < vocab_size]
    allowed[special] = False
    return allowed


def is_english_start(tokenizer, token_id: int) -> bool:
    """A start token's text, without surrounding blanks, is ASCII letters only."""
    text = tokenizer.decode([token_id]).strip()
    return text.isascii() and text.isalpha()


def start_token(tokenizer, allowed: torch.Tensor, generator: torch.Generator) -> int:
    """Draw ids uniformly from `allowed` with `generator` until one is an English start."""
    pool = allowed.nonzero().flatten()
    for _ in range(_MAX_START_DRAWS):
        token = int(pool[torch.randint(len(pool), (), generator=generator)])
        if is_english_start(tokenizer, token):
            return token
    raise SelfGenError(
        f"no English start token in {_MAX_START_DRAWS} draws: this tokenizer's tokens are almost "
        f"never ASCII letters; self-generated calibration needs a tokenizer with English words"
    )


class _Chooser(LogitsProcessor):
    """Logits processor that picks every token itself: greedy for the first `greedy_tokens` new
    tokens, then sampled at `temperature` with one uniform draw per window from its own generator.
    It returns scores that are -inf except at the chosen token, so generate()'s greedy step takes it."""

    def __init__(
        self,
        allowed: torch.Tensor,
        generators: list[torch.Generator],
        greedy_tokens: int,
        temperature: float,
        prompt_len: int = 1,
    ):
        self.allowed = allowed
        self.generators = generators
        self.greedy_tokens = greedy_tokens
        self.temperature = temperature
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed.to(scores.device)
        if allowed.numel() != scores.shape[-1]:  # logits wider than the config's vocab_size
            allowed = torch.nn.functional.pad(allowed, (0, scores.shape[-1] - allowed.numel()))
        logits = scores.float().masked_fill(~allowed, float("-inf"))
        if input_ids.shape[1] - self.prompt_len < self.greedy_tokens:
            choice = logits.argmax(dim=-1)
        else:
            cdf = torch.softmax(logits / self.temperature, dim=-1).cumsum(dim=-1)
            u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(scores.device)
            choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
            choice = choice.clamp_max(scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, choice.unsqueeze(1), 0.0)


def _load_model(model_dir: Path, device: torch.device, quant: str):
    """The whole model for generation: stored dtype, or 4-bit through bitsandbytes on CUDA."""
    from rcpu_lite.loading import load_pruned

    kwargs: dict = {"dtype": stored_dtype(model_dir)}
    if quant == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SelfGenError(
                "--gen-quant 4bit needs bitsandbytes: pip install bitsandbytes (or the package's "
                "gpu extra: pip install 'rcpu-lite[gpu]')"
            ) from None
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs = {
            "dtype": compute,
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
        }
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}
    return load_pruned(model_dir, **kwargs).eval()


def _device(device: str | torch.device, quant: str) -> torch.device:
    from rcpu_lite.runtime import pick_device

    dev = device if isinstance(device, torch.device) else pick_device(device)
    if quant == "4bit" and dev.type != "cuda":
        raise SelfGenError("--gen-quant 4bit needs a CUDA GPU (bitsandbytes 4-bit); on the CPU use --gen-quant none")
    return dev


def _context_length(model_dir: Path) -> int | None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return cfg.get("text_config", cfg).get("max_position_embeddings")


def generate_windows(
    model_dir: Path,
    n: int,
    seqlen: int,
    seed: int,
    device: str | torch.device = "cpu",
    quant: str = "none",
    greedy_tokens: int = 5,
    temperature: float = 1.0,
    micro_batch: int = 8,
    reporter: Reporter | None = None,
) -> torch.Tensor:
    """n self-generated windows of exactly seqlen token ids (n x seqlen, int64, on the CPU).

    Window i starts from an English start token drawn with its own generator (seeded from seed and
    i), takes `greedy_tokens` greedy tokens, then samples at `temperature` to seqlen tokens. The
    model is loaded whole (checked against the free memory first) and freed before returning.
    `reporter` shows the progress (display.py); by default one log line per micro-batch.
    """
    from rcpu_lite.models import load_tokenizer

    model_dir = Path(model_dir)
    settings = GenSettings(n, seqlen, seed, greedy_tokens, temperature, quant).validate()
    if micro_batch < 1:
        raise SelfGenError(f"micro_batch must be at least 1, got {micro_batch}")
    context = _context_length(model_dir)
    if context is not None and seqlen > context:
        raise SelfGenError(
            f"cannot generate windows of {seqlen} tokens: the model's context is {context} "
            f"(max_position_embeddings); use a smaller --seqlen"
        )
    reporter = reporter or PlainReporter()
    dev = _device(device, quant)
    need = check_memory(model_dir, dev, quant, seqlen, min(micro_batch, n))
    tokenizer = load_tokenizer(model_dir)
    log.info(
        "self-generated calibration: loading %s whole on %s (%s, about %.1f GiB)",
        model_dir,
        dev,
        "4-bit" if quant == "4bit" else str(stored_dtype(model_dir)).replace("torch.", ""),
        need / GIB,
    )
    reporter.start("self-generated calibration", n, "windows")
    reporter.phase("loading the model")
    model = _load_model(model_dir, dev, quant)
    reporter.phase("generating")
    try:
        windows = _generate(model, tokenizer, settings, n, micro_batch, dev, reporter)
    finally:
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return torch.cat(windows).to(torch.long)


def _generate(
    model, tokenizer, settings: GenSettings, n: int, micro_batch: int, dev: torch.device, reporter: Reporter
) -> list[torch.Tensor]:
    """Generate the n windows a micro-batch at a time (each window with its own generator)."""
    from transformers import GenerationConfig, LogitsProcessorList

    seqlen = settings.seqlen
    vocab = model.get_output_embeddings().weight.shape[0]
    allowed = _ordinary_ids(tokenizer, vocab)
    # A fresh config: the checkpoint's generation_config.json (temperature, top_p, penalties, EOS) must not apply.
    model.generation_config = GenerationConfig(pad_token_id=0)
    windows, t0 = [], time.perf_counter()
    for lo in range(0, n, micro_batch):
        rows = range(lo, min(lo + micro_batch, n))
        generators = [_window_generator(settings.seed, i) for i in rows]
        starts = torch.tensor([[start_token(tokenizer, allowed, g)] for g in generators], device=dev)
        chooser = _Chooser(allowed, generators, settings.greedy_tokens, settings.temperature)
        with torch.inference_mode():
            out = model.generate(
                input_ids=starts,
                attention_mask=torch.ones_like(starts),
                logits_processor=LogitsProcessorList([chooser]),
                do_sample=False,
                max_new_tokens=seqlen - 1,
                min_new_tokens=seqlen - 1,
            )
        if out.shape != (len(rows), seqlen):
            raise SelfGenError(f"generation returned {tuple(out.shape)} token ids, expected {(len(rows), seqlen)}")
        windows.append(out.cpu())
        done, elapsed = rows.stop, time.perf_counter() - t0
        reporter.advance(
            f"self-generated calibration: {done}/{n} windows of {seqlen} tokens, {elapsed:.1f} s, "
            f"ETA {elapsed / done * (n - done):.0f} s",
            steps=len(rows),
        )
    return windows


# ---------------------------------------------------------------------------------------------- cache


def model_identity(model_dir: Path) -> dict:
    """What identifies the model for the cache: config.json's content and the names and sizes of its files."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir()) if p.is_file()}
    return {"config": config, "files": files}


def cache_key(model_dir: Path, settings: GenSettings) -> str:
    blob = json.dumps(
        {"model": model_identity(model_dir), "settings": asdict(settings), "format": FORMAT_VERSION}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(model_dir: Path, settings: GenSettings, cache_dir: Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else models_cache_dir() / "selfgen"
    s = settings
    return root / f"{Path(model_dir).name}-n{s.n}-L{s.seqlen}-s{s.seed}-{cache_key(model_dir, s)[:16]}.jsonl"


def write_windows(path: Path, windows: torch.Tensor, header: dict, tokenizer) -> None:
    """JSONL, written atomically: the header object, then {"index", "ids", "text"} per window."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(header, ensure_ascii=False) + "\n")
            for i, row in enumerate(windows.tolist()):
                f.write(json.dumps({"index": i, "ids": row, "text": tokenizer.decode(row)}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_windows(path: Path) -> tuple[dict, torch.Tensor, list[str]]:
    """(header, n x seqlen ids, texts) of a self-generated calibration file."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        header = json.loads(lines[0])
        rows = [json.loads(line) for line in lines[1:]]
        ids, texts = [r["ids"] for r in rows], [r["text"] for r in rows]
        if header.get("format") != FORMAT or not ids:
            raise ValueError("not a self-generated calibration file")
        windows = torch.tensor(ids, dtype=torch.long)
    except (OSError, UnicodeDecodeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise SelfGenError(f"{path} is not a readable self-generated calibration file ({e})") from None
    return header, windows, texts


def cached_windows(
    model_dir: Path,
    n: int,
    seqlen: int,
    seed: int,
    device: str = "auto",
    quant: str = "none",
    greedy_tokens: int = 5,
    temperature: float = 1.0,
    micro_batch: int = 8,
    cache_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> tuple[torch.Tensor, Path]:
    """(windows, their file): read from the cache when this model and these settings were generated
    before, else generated with generate_windows() and written there."""
    model_dir = Path(model_dir)
    settings = GenSettings(n, seqlen, seed, greedy_tokens, temperature, quant).validate()
    path = cache_path(model_dir, settings, cache_dir)
    key = cache_key(model_dir, settings)
    if path.is_file():
        try:
            header, windows, _ = read_windows(path)
            if header.get("key") == key and tuple(windows.shape) == (n, seqlen):
                log.info("self-generated calibration: %d windows read from %s", n, path)
                return windows, path
            log.warning("self-generated calibration: %s does not match these settings; generating again", path)
        except SelfGenError as e:
            log.warning("%s; generating again", e)
    from rcpu_lite.models import load_tokenizer

    dev, t0 = _device(device, quant), time.perf_counter()
    windows = generate_windows(
        model_dir,
        n,
        seqlen,
        seed,
        device=dev,
        quant=quant,
        greedy_tokens=greedy_tokens,
        temperature=temperature,
        micro_batch=micro_batch,
        reporter=reporter,
    )
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": key,
        "model_dir": str(model_dir.resolve()),
        "settings": asdict(settings),
        "device": str(dev),
        "seconds": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_windows(path, windows, header, load_tokenizer(model_dir))
    log.info("self-generated calibration: %d windows written to %s", n, path)
    return windows, path


def self_generated(
    model_dir: Path,
    n: int,
    seqlen: int,
    seed: int,
    *,
    device: str = "auto",
    quant: str = "none",
    greedy_tokens: int = 5,
    temperature: float = 1.0,
    micro_batch: int = 8,
    cache_dir: Path | None = None,
    reporter: Reporter | None = None,
) -> torch.Tensor:
    """The n x seqlen self-generated calibration windows for a prune run (from the cache, or generated).

    For the pipeline (the options are wired in PruneSettings by the pipeline's owner):
    - `--calib self`: every calibration window is generated:
      windows = self_generated(model_dir, settings.nsamples, settings.seqlen, settings.seed, ...);
      scores and reconstruction both use them.
    - `--self-nsamples N` (with a real --calib): N generated windows are appended to the real ones
      for reconstruction only (the statistics that compensation reads); the importance scores keep
      using the real windows only, as in the paper.
    - `--gen-quant {none,4bit}` is `quant`: 4bit loads the model through bitsandbytes on CUDA.
    Call it before any layer is streamed: the whole model is loaded and freed inside, so its memory
    is back before pruning starts. Raises SelfGenError (a ValueError, one line) when memory, device
    or bitsandbytes do not allow generation.
    """
    return cached_windows(
        model_dir,
        n,
        seqlen,
        seed,
        device=device,
        quant=quant,
        greedy_tokens=greedy_tokens,
        temperature=temperature,
        micro_batch=micro_batch,
        cache_dir=cache_dir,
        reporter=reporter,
    )[0]


def show(path: Path, max_windows: int | None = None) -> str:
    """A self-generated calibration file as text: its header, then each window's decoded text."""
    header, windows, texts = read_windows(Path(path))
    lines = [f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in header.items()]
    shown = texts if max_windows is None else texts[:max_windows]
    for i, text in enumerate(shown):
        lines += ["", f"--- window {i} ({windows.shape[1]} tokens) ---", text]
    if len(shown) < len(texts):
        lines += ["", f"... {len(texts) - len(shown)} more windows"]
    return "\n".join(lines)
