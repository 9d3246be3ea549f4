"""Sizes, seeds, split sizes and file locations of the bundled demo models: the one place to change them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from generator.demo.shapes import CLASS_NAMES, IMAGE_SIZE

SEED = 20240630  # every split, initialisation and shuffle derives from this

# Data set splits: (kind, split) -> (seed offset, number of images).
SPLITS: dict[tuple[str, str], tuple[int, int]] = {
    ("t2i", "train"): (0, 16000),
    ("t2i", "heldout"): (1, 400),
    ("c2i", "train"): (2, 8000),
    ("c2i", "heldout"): (3, 240),
}

VQ_ARGS: dict[str, object] = {
    "codebook_size": 1024,
    "codebook_embed_dim": 8,
    "ch": 16,
    # Downsample 8: 64x64 px -> 8x8 codes. 32 channels at every level: the decoder's norms keep two channels
    # per group (with one, a flat region loses its colour), and the middle levels are wide enough to draw
    # corners (16 channels there, (2, 1, 1, 2), kept the shapes in 70% of held-out reconstructions; this 91%).
    "ch_mult": (2, 2, 2, 2),
    "z_channels": 32,
    "num_res_blocks": 1,
    "norm_groups": 16,
    # Each code is encoded from its own 8x8 patch, so a shape gets the same codes whatever else is in the scene
    # (with the official whole-image encoder, 64% of one half's codes changed when only the other half did).
    "encoder_context": "patch",
}
GRID = IMAGE_SIZE // 8
MINILM_MAX_LEN = 24  # caption tokens kept (the t2i prefix length); the longest shapes caption has 21
# Caption features are MiniLM's token states after its first 2 of 6 layers. The last layer's states mix the
# whole sentence (a linear probe reads the first phrase's colour off the second phrase's colour word), and the
# t2i GPT then gave one of two shapes the other's colour or kind. Held-out t2i, same schedule (2026-12-03):
# all 6 layers 0.655 (two shapes 0.27), 2 layers 0.895 (0.795), the embeddings alone 0.72 (0.39).
MINILM_LAYERS = 2

_GPT_COMMON: dict[str, object] = {
    "dim": 192,
    "n_head": 3,  # head_dim 64, as in every official preset
    "vocab_size": VQ_ARGS["codebook_size"],
    "block_size": GRID * GRID,
    "token_dropout_p": 0.0,
    "resid_dropout_p": 0.0,
    "ffn_dropout_p": 0.0,
}
C2I_ARGS: dict[str, object] = {
    **_GPT_COMMON,
    "n_layer": 3,
    "task": "c2i",
    "num_classes": len(CLASS_NAMES),
    "cls_token_num": 1,
}
T2I_ARGS: dict[str, object] = {
    **_GPT_COMMON,
    "n_layer": 4,
    "task": "t2i",
    "caption_dim": 384,
    "caption_len": MINILM_MAX_LEN,
    "cls_token_num": MINILM_MAX_LEN,
    # Unrotated caption tokens: each image token can attend to the words of its own shape. With the official
    # zero rows every caption token weighs the same, and two-shape scenes bind colours to the wrong shape.
    "prefix_rotary": "identity",
}


@dataclass(frozen=True)
class TrainSchedule:
    """Warm-up + cosine learning-rate schedule over `steps`; `stop_at` ends training early on that curve."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float = 0.0
    checkpoint_every: int = 100
    stop_at: int | None = None
    bf16: bool = False  # CPU autocast to bfloat16 (1.4x faster GPT steps on an AVX-512 BF16 CPU)

    @property
    def last_step(self) -> int:
        return min(self.steps, self.stop_at or self.steps)

    def trajectory(self) -> dict[str, float | int]:
        """The fields that decide what each step computes (a resumed run must match them)."""
        fields: dict[str, float | int] = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup": self.warmup,
            "weight_decay": self.weight_decay,
        }
        if self.bf16:  # absent when False, so runs saved before the field existed still resume
            fields["bf16"] = True
        return fields


VQ_SCHEDULE = TrainSchedule(steps=4000, batch_size=8, lr=2e-3, warmup=20, checkpoint_every=250)
VQ_FOREGROUND_WEIGHT = 3.0  # extra pixel-loss weight where an image differs from its border colour
VQ_AE_WARMUP = 2000  # steps trained as a plain autoencoder before the codebook is initialised (k-means)
VQ_CROP: int | None = None  # pixels; None trains on whole images (GroupNorm sees test-time statistics)
C2I_SCHEDULE = TrainSchedule(steps=1500, batch_size=32, lr=2e-3, warmup=50, weight_decay=0.05)
# bf16 autocast pays for 2400 steps in the time 1600 float32 steps took. Held-out t2i with the patch tokenizer
# of 16 middle channels (2026-12-02): 0.425 here, 0.395 at 1600 float32 steps, 0.385 with 6 layers at 1600
# bf16 steps, 0.375 with the official zero prefix rows at this schedule. With the 32-channel tokenizer: 0.655;
# with caption features from MiniLM's first 2 layers (MINILM_LAYERS): 0.895 (2026-12-03).
T2I_SCHEDULE = TrainSchedule(steps=2400, batch_size=32, lr=2e-3, warmup=50, weight_decay=0.05, bf16=True)
CLIP_SCHEDULE = TrainSchedule(steps=2000, batch_size=64, lr=1e-3, warmup=25, weight_decay=0.1)

# Sampling defaults written on the cards and used by `evaluate` and `sample-grid`.
# Greedy decoding (top_k 1) without guidance (cfg_scale 1) gave the demo models their most faithful images
# (held-out, 2026-12-02, earlier tokenizer): c2i 1.0 (also 1.0 at cfg 2 with top_k 0, 0.54 at cfg 4), t2i
# 0.37 (0.25 at top_k 0, 0.02 at cfg 4). With the first patch tokenizer (1600 steps) t2i gave 0.395 greedy,
# 0.33 at cfg 2 and 0.005 at cfg 4. The t2i model draws one shape right; with two it often binds a colour,
# shape or size to the wrong place (the first token of each shape, which only the caption decides, is where
# it errs).
# Re-swept on the layer-2 t2i (2026-12-03, held-out 200): greedy 0.895 is still the best; cfg 1.5 greedy 0.885,
# top_p 0.9 at temperature 0.7 0.875, temperature 0.5 0.87, pure sampling (temperature 1) 0.765, cfg 2 0.565-0.72,
# cfg 3 0.095-0.12. Sampling buys little variety: at temperature 1, 4 seeds of one caption give 1.94 distinct
# images (the training renders vary little for a caption); greedy gives 1.
SAMPLING_DEFAULTS: dict[str, float | int] = {"cfg_scale": 1.0, "top_k": 1, "top_p": 1.0, "temperature": 1.0}


@dataclass(frozen=True)
class DemoPaths:
    """Where each artefact lives: models_dir ships in git, work_dir (data, resumable runs) does not."""

    models_dir: Path = Path("models")
    work_dir: Path = Path("var/demo")
    files: dict[str, str] = field(
        default_factory=lambda: {
            "vq": "demo/vq.pt",
            "c2i": "demo/c2i.pt",
            "t2i": "demo/t2i.pt",
            "clip": "demo/clip.pt",
            "clip_config": "demo/clip_config.json",
            "grid": "demo/samples.png",
        }
    )

    def model_file(self, key: str) -> Path:
        return self.models_dir / self.files[key]

    def data_dir(self, kind: str, split: str) -> Path:
        return self.work_dir / "data" / f"{kind}-{split}"

    def run_dir(self, name: str) -> Path:
        return self.work_dir / "runs" / name
