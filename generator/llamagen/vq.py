# LlamaGen image tokenizer, written from the facts in docs/llamagen.md section 6.
# Upstream: FoundationVision/LlamaGen tokenizer/tokenizer_image/vq_model.py (arXiv 2406.06525), which follows
# the taming-transformers VQGAN layout. The state_dict keys and shapes are exactly the official ones.
"""VQ tokenizer: encoder, l2-normalised vector quantiser and decoder (VQ-16 / VQ-8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generator.llamagen.fields import check_field_types

# Official codebook_used buffer length (fixed in vq_model.py, independent of codebook_size).
CODEBOOK_USED_LEN = 65536
OFFICIAL_NORM_GROUPS = 32  # every official GroupNorm has 32 groups


@dataclass(frozen=True)
class VQArgs:
    """Tokenizer configuration; defaults are VQ-16.

    Every GroupNorm has `norm_groups` groups (32 in every official tokenizer), so `ch * m` must be divisible
    by it for every m in ch_mult. Fewer groups suit narrow tokenizers: at 32 channels, 32 groups normalise
    each channel on its own and erase the absolute level (the colour) of a flat region. The group count
    has no parameters, so the state_dict is the same either way.
    """

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    dropout_p: float = 0.0
    norm_groups: int = OFFICIAL_NORM_GROUPS
    encoder_context: Literal["global", "patch"] = "global"

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.encoder_context not in ("global", "patch"):
            raise ValueError(f"encoder_context must be 'global' or 'patch'; got {self.encoder_context!r}")
        if self.norm_groups < 1:
            raise ValueError(f"norm_groups must be at least 1; got {self.norm_groups}")
        channels = [self.ch * m for m in self.ch_mult] + [self.ch]
        bad = [c for c in channels if c % self.norm_groups != 0]
        if bad:
            raise ValueError(
                f"GroupNorm({self.norm_groups}) needs channel counts divisible by {self.norm_groups}; "
                f"got {sorted(set(bad))}"
            )
        if not self.ch_mult:
            raise ValueError("ch_mult must have at least one level")

    @property
    def downsample(self) -> int:
        """Image pixels per code along each axis."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> VQArgs:
        """From stored arguments (a card or a checkpoint record), where ch_mult may be a list."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # type: ignore[arg-type]

    @classmethod
    def from_name(cls, name: str) -> VQArgs:
        if name not in VQ_PRESETS:
            raise ValueError(f"unknown VQ preset {name!r}; known: {', '.join(VQ_PRESETS)}")
        return VQ_PRESETS[name]


VQ_PRESETS: dict[str, VQArgs] = {
    "VQ-16": VQArgs(ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": VQArgs(ch_mult=(1, 2, 2, 4)),
}


class PositionNorm(nn.Module):
    """Normalise each position over its channels (statistics never mix positions); GroupNorm's parameters."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


def _norm(channels: int, groups: int, local: bool = False) -> nn.Module:
    if local:
        return PositionNorm(channels)
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


# Feature maps from this side up run their 3x3 convs through NNPACK's Winograd kernels when allowed:
# 2.0-2.3x faster than oneDNN's direct conv here at 64..256 px, slower at 16 px (512 channels).
WINOGRAD_MIN_SIDE = 64


def winograd_available() -> bool:
    """Whether this build has NNPACK; asking also initialises it, which its convolutions need."""
    return torch.backends.nnpack.is_available()


def conv3x3(conv: nn.Conv2d, x: Tensor, winograd: bool) -> Tensor:
    """conv(x) for a 3x3, stride-1, padding-1 conv; with `winograd`, at inference on float32 CPU maps of at
    least WINOGRAD_MIN_SIDE px, NNPACK's Winograd F(6x6, 3x3) instead: max error about 2e-5 of the output
    scale (mean 4e-6) against the direct conv, from the transforms' float32 rounding."""
    if (
        not winograd
        or torch.is_grad_enabled()
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or min(x.shape[-2:]) < WINOGRAD_MIN_SIDE
        or not winograd_available()
    ):
        return conv(x)
    return torch._nnpack_spatial_convolution(x.contiguous(), conv.weight.contiguous(), conv.bias, [1, 1], [1, 1])


class ResnetBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout_p: float = 0.0,
        winograd: bool = False,
        groups: int = OFFICIAL_NORM_GROUPS,
        local: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups, local)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups, local)
        self.dropout = nn.Dropout(dropout_p)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.winograd = winograd  # the decoder's blocks; encoder codes stay on the direct conv

    def forward(self, x: Tensor) -> Tensor:
        inference = not torch.is_grad_enabled()  # in place on fresh tensors: no large allocations
        h = conv3x3(self.conv1, F.silu(self.norm1(x), inplace=inference), self.winograd)
        h = conv3x3(self.conv2, self.dropout(F.silu(self.norm2(h), inplace=inference)), self.winograd)
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(shortcut) if inference else shortcut + h  # the same sum either way


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, scale c**-0.5."""

    def __init__(self, channels: int, groups: int = OFFICIAL_NORM_GROUPS, local: bool = False) -> None:
        super().__init__()
        self.norm = _norm(channels, groups, local)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).flatten(2).transpose(1, 2)
        v = self.v(h).flatten(2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C); default scale is C**-0.5
        y = y.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


def upsample_phase_kernels(weight: Tensor) -> Tensor:
    """A 3x3 kernel [K, C, 3, 3] run after 2x nearest upsampling, as the 2x2 kernels [4K, C, 2, 2] that
    give its output phases directly from the input: block 2a+b makes output rows 2p+a, columns 2q+b.

    Along each axis, phase 0 reads input offsets (-1, 0) with taps (w0, w1 + w2) and phase 1 reads
    (0, +1) with taps (w0 + w1, w2): the upsampled rows 2p-1 .. 2p+2 are input rows p-1, p, p, p+1.
    """
    rows = (
        torch.stack([weight[:, :, 0], weight[:, :, 1] + weight[:, :, 2]], dim=2),  # a = 0: (K, C, 2, 3)
        torch.stack([weight[:, :, 0] + weight[:, :, 1], weight[:, :, 2]], dim=2),  # a = 1
    )
    phases = [
        torch.stack(taps, dim=-1)  # (K, C, 2, 2)
        for r in rows
        for taps in ((r[..., 0], r[..., 1] + r[..., 2]), (r[..., 0] + r[..., 1], r[..., 2]))
    ]
    return torch.cat(phases)  # (4K, C, 2, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        # (weight, bias, their versions, phase kernels, phase bias) for inference; not state.
        self._phases: tuple[Tensor, Tensor, tuple[int, int], Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # the official formulation
        return self._phase_conv(x)

    def _phase_conv(self, x: Tensor) -> Tensor:
        """The same convolution at 4/9 of the multiply-adds, without the upsampled input: one 2x2 conv
        with 4x the output channels on the input, whose phases are interleaved into the 2x output."""
        B, C, H, W = x.shape
        K = self.conv.out_channels
        kernels, bias = self._phase_weights()
        y = F.conv2d(x, kernels, bias, padding=1)  # (B, 4K, H+1, W+1): phase (a, b) at offset (a, b)
        # Phase (a, b) is channel block 2a+b read from spatial offset (a, b): both steps are linear in a
        # and b, so one strided view spans all four phases.
        sb, sc, sh, sw = y.stride()
        phases = y.as_strided((B, 2, 2, K, H, W), (sb, 2 * K * sc + sh, K * sc + sw, sc, sh, sw))
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty(B, K, 2 * H, 2 * W, dtype=y.dtype, device=y.device, memory_format=layout)
        out.view(B, K, H, 2, W, 2).copy_(phases.permute(0, 3, 4, 1, 5, 2))  # one interleaving copy
        return out

    def _phase_weights(self) -> tuple[Tensor, Tensor]:
        """Phase kernels and bias, recomputed when the conv's weight or bias was replaced or changed."""
        w, b = self.conv.weight, self.conv.bias
        assert b is not None
        cached = self._phases
        versions = (w._version, b._version)
        # The cache holds the old tensors, so their addresses cannot be reused by replacements.
        if (
            cached is not None
            and cached[0].data_ptr() == w.data_ptr()
            and cached[1].data_ptr() == b.data_ptr()
            and cached[2] == versions
        ):
            return cached[3], cached[4]
        kernels = upsample_phase_kernels(w.detach())
        if w.is_contiguous(memory_format=torch.channels_last):
            kernels = kernels.contiguous(memory_format=torch.channels_last)
        bias = b.detach().repeat(4)  # (4K,)
        self._phases = (w.detach(), b.detach(), versions, kernels, bias)
        return kernels, bias


class Level(nn.Module):
    """One resolution level (`conv_blocks.i`): res blocks, optional attention, optional resampling."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn) > 0:
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def _mid(channels: int, dropout_p: float, groups: int, local: bool = False) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, dropout_p, groups=groups, local=local),
            AttnBlock(channels, groups, local),
            ResnetBlock(channels, channels, dropout_p, groups=groups, local=local),
        ]
    )


class Encoder(nn.Module):
    def __init__(self, args: VQArgs) -> None:
        super().__init__()
        n = len(args.ch_mult)
        in_mult = (1, *args.ch_mult)
        self.patch = args.downsample if args.encoder_context == "patch" else None
        local = self.patch is not None
        self.conv_in = nn.Conv2d(3, args.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i in range(n):
            level = Level()
            block_in, block_out = args.ch * in_mult[i], args.ch * args.ch_mult[i]
            for _ in range(args.num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, args.dropout_p, groups=args.norm_groups, local=local))
                block_in = block_out
                if i == n - 1:
                    level.attn.append(AttnBlock(block_in, args.norm_groups, local))  # only at the last level
            if i != n - 1:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        top = args.ch * args.ch_mult[-1]
        self.mid = _mid(top, args.dropout_p, args.norm_groups, local)
        self.norm_out = _norm(top, args.norm_groups, local)
        self.conv_out = nn.Conv2d(top, args.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.patch is not None:  # every code's patch on its own: [B, 3, H, W] -> [B*h*w, 3, p, p]
            B, C, H, W = x.shape
            p = self.patch
            patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, 3, h, w, p, p)
            h, w = patches.shape[2:4]
            z = self._run(patches.permute(0, 2, 3, 1, 4, 5).reshape(B * h * w, C, p, p))  # (B*h*w, z, 1, 1)
            return z.view(B, h, w, -1).permute(0, 3, 1, 2)
        return self._run(x)

    def _run(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, args: VQArgs) -> None:
        super().__init__()
        n = len(args.ch_mult)
        block_in = args.ch * args.ch_mult[-1]
        self.conv_in = nn.Conv2d(args.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, args.dropout_p, args.norm_groups)
        self.conv_blocks = nn.ModuleList()
        for i in range(n):  # conv_blocks.0 is the deepest level
            level = Level()
            block_out = args.ch * args.ch_mult[n - 1 - i]
            for _ in range(args.num_res_blocks + 1):
                level.res.append(
                    ResnetBlock(block_in, block_out, args.dropout_p, winograd=True, groups=args.norm_groups)
                )
                block_in = block_out
                if i == 0:
                    level.attn.append(AttnBlock(block_in, args.norm_groups))
            if i != n - 1:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(block_in, args.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class QuantLosses(NamedTuple):
    codebook: Tensor  # ||sg(z) - z_q||^2: moves the codebook towards the encoder outputs
    commitment: Tensor  # beta * ||z - sg(z_q)||^2: keeps the encoder close to its codes


class VectorQuantizer(nn.Module):
    def __init__(self, args: VQArgs) -> None:
        super().__init__()
        self.embedding = nn.Embedding(args.codebook_size, args.codebook_embed_dim)
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USED_LEN))  # persistent, official
        self.codebook_used: Tensor
        self.l2_norm = args.codebook_l2_norm
        self.beta = args.commit_loss_beta

    def codebook(self) -> Tensor:
        """Codebook rows [N, e], l2-normalised at use time as the official code does."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z: Tensor) -> Tensor:
        """Indices [M] of the nearest codes for vectors z [M, e] (normalised first when l2_norm)."""
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        emb = self.codebook()
        d = z.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * z @ emb.t()  # (M, N)
        return d.argmin(dim=1)

    def forward(self, z: Tensor) -> tuple[Tensor, QuantLosses, Tensor]:
        """z [B, e, h, w] -> (straight-through z_q [B, e, h, w], losses, indices [B, h*w])."""
        B, e, h, w = z.shape
        z = z.permute(0, 2, 3, 1)  # (B, h, w, e)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        idx = self.nearest(z.reshape(-1, e))
        z_q = self.codebook()[idx].view(B, h, w, e)
        losses = QuantLosses(
            codebook=torch.mean((z_q - z.detach()) ** 2),
            commitment=self.beta * torch.mean((z_q.detach() - z) ** 2),
        )
        z_q = z + (z_q - z).detach()  # straight-through estimator
        return z_q.permute(0, 3, 1, 2), losses, idx.view(B, h * w)


class VQModel(nn.Module):
    def __init__(self, args: VQArgs) -> None:
        super().__init__()
        self.args = args
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)
        self.quantize = VectorQuantizer(args)
        self.quant_conv = nn.Conv2d(args.z_channels, args.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(args.codebook_embed_dim, args.z_channels, 1)

    def initialize_weights(self) -> None:
        """PyTorch default init for convs and norms; codebook uniform(-1/N, 1/N), then normalised."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.GroupNorm, PositionNorm)):
                module.reset_parameters()
        n = self.args.codebook_size
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / n, 1.0 / n)
        if self.args.codebook_l2_norm:
            with torch.no_grad():
                self.quantize.embedding.weight.copy_(F.normalize(self.quantize.embedding.weight, dim=-1))
        self.quantize.codebook_used.zero_()

    def forward(self, x: Tensor) -> tuple[Tensor, QuantLosses]:
        """Training forward: images [B, 3, H, W] in [-1, 1] -> (reconstruction, quantisation losses)."""
        z_q, losses, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(z_q)), losses

    @torch.inference_mode()
    def encode(self, img: Tensor) -> Tensor:
        """Images float [B, 3, H, W] in [-1, 1] -> code indices int64 [B, h*w], row-major over (h, w)."""
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(img.shape)}")
        dtype = self.quant_conv.weight.dtype
        img = img.to(dtype).contiguous(memory_format=self._memory_format())
        z = self.quant_conv(self.encoder(img))  # (B, e, h, w)
        B, e, h, w = z.shape
        idx = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, e).float())
        return idx.view(B, h * w)

    @torch.inference_mode()
    def decode_codes(self, ids: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Codes [B, h*w] (with grid=(h, w)) or [B, h, w] -> raw decoder output float32 [B, 3, H, W]."""
        if ids.ndim == 3:
            B, h, w = ids.shape
            if grid is not None and tuple(grid) != (h, w):
                raise ValueError(f"grid {tuple(grid)} does not match ids of shape {tuple(ids.shape)}")
        elif ids.ndim == 2:
            if grid is None:
                raise ValueError("grid=(h, w) is required for flat ids [B, h*w]")
            B, (h, w) = ids.shape[0], grid
            if ids.shape[1] != h * w:
                raise ValueError(f"ids have {ids.shape[1]} codes per image, grid {h}x{w} needs {h * w}")
        else:
            raise ValueError(f"ids must be [B, h*w] or [B, h, w], got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.args.codebook_size:
            raise ValueError(f"code ids must lie in [0, {self.args.codebook_size})")
        z_q = self.quantize.codebook()[ids.reshape(B, h, w).long()]  # (B, h, w, e)
        z_q = z_q.permute(0, 3, 1, 2).contiguous(memory_format=self._memory_format())  # (B, e, h, w)
        return self.decoder(self.post_quant_conv(z_q)).float().contiguous()

    def _memory_format(self) -> torch.memory_format:
        w = self.post_quant_conv.weight
        return torch.channels_last if w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format

    def use_channels_last(self) -> None:
        """Keep activations and conv weights NHWC: oneDNN's CPU convolutions then skip layout reorders.

        Shapes, values and state_dict keys are unchanged; only the memory layout differs.
        """
        self.to(memory_format=torch.channels_last)


def to_uint8(images: Tensor) -> Tensor:
    """Decoder output [B, 3, H, W] -> uint8 [B, H, W, 3] with the official clamp(floor(127.5 x + 128))."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1)
