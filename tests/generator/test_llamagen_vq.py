"""VQ tokenizer: shapes (square and non-square grids), l2-normalised codes, round trips, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from generator.llamagen import VQArgs, VQModel, build_vq
from generator.llamagen.vq import WINOGRAD_MIN_SIDE, ResnetBlock, Upsample, conv3x3, to_uint8, winograd_available


def test_decode_codes_gives_image_of_downsample_times_grid(tiny_vq: VQModel) -> None:
    images = tiny_vq.decode_codes(torch.randint(0, 64, (2, 16)), grid=(4, 4))
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32


def test_decode_codes_handles_non_square_grids(tiny_vq: VQModel) -> None:
    assert tiny_vq.decode_codes(torch.randint(0, 64, (1, 12)), grid=(3, 4)).shape == (1, 3, 6, 8)


def test_decode_codes_reads_grid_from_three_dimensional_ids(tiny_vq: VQModel) -> None:
    ids = torch.randint(0, 64, (1, 3, 4))
    assert torch.equal(tiny_vq.decode_codes(ids), tiny_vq.decode_codes(ids.flatten(1), grid=(3, 4)))


def test_decode_codes_rejects_grid_that_does_not_match_ids(tiny_vq: VQModel) -> None:
    with pytest.raises(ValueError, match="grid 4x4 needs 16"):
        tiny_vq.decode_codes(torch.randint(0, 64, (1, 12)), grid=(4, 4))


def test_decode_codes_rejects_out_of_range_ids(tiny_vq: VQModel) -> None:
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tiny_vq.decode_codes(torch.full((1, 4), 64), grid=(2, 2))


def test_codes_are_row_major_over_the_grid(tiny_vq: VQModel) -> None:
    ids = torch.zeros(1, 2, 4, dtype=torch.long)
    ids[0, 1, 0] = 5  # row 1, column 0 = flat index 4
    flat = torch.zeros(1, 8, dtype=torch.long)
    flat[0, 4] = 5
    assert torch.equal(tiny_vq.decode_codes(ids), tiny_vq.decode_codes(flat, grid=(2, 4)))


def test_encode_returns_one_code_per_grid_cell(tiny_vq: VQModel) -> None:
    ids = tiny_vq.encode(torch.rand(2, 3, 8, 12) * 2 - 1)
    assert ids.shape == (2, 4 * 6) and ids.dtype == torch.int64


def test_nearest_code_uses_l2_normalised_codebook_and_vectors(tiny_vq: VQModel) -> None:
    with torch.no_grad():
        tiny_vq.quantize.embedding.weight.mul_(torch.rand(64, 1) * 10)  # rows of very different lengths
    z = torch.randn(50, 4)
    cosine = F.normalize(z, dim=-1) @ F.normalize(tiny_vq.quantize.embedding.weight, dim=-1).t()
    assert torch.equal(tiny_vq.quantize.nearest(z), cosine.argmax(dim=1))


def test_code_vectors_quantise_back_to_their_own_ids(tiny_vq: VQModel) -> None:
    ids = torch.randperm(64)
    assert torch.equal(tiny_vq.quantize.nearest(tiny_vq.quantize.codebook()[ids]), ids)


def test_encoding_a_decoded_image_returns_a_code_grid_of_the_same_shape(tiny_vq: VQModel) -> None:
    ids = torch.randint(0, 64, (1, 16))
    again = tiny_vq.encode(tiny_vq.decode_codes(ids, grid=(4, 4)))
    assert again.shape == ids.shape and int(again.max()) < 64


def test_forward_returns_reconstruction_and_losses_that_train_encoder_and_codebook(tiny_vq: VQModel) -> None:
    recon, losses = tiny_vq.train()(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert recon.shape == (2, 3, 8, 8)
    (F.mse_loss(recon, torch.zeros_like(recon)) + losses.codebook + losses.commitment).backward()
    assert tiny_vq.quantize.embedding.weight.grad is not None
    assert tiny_vq.encoder.conv_in.weight.grad is not None


def test_commitment_loss_is_beta_times_codebook_loss_value(tiny_vq: VQModel) -> None:
    _, losses = tiny_vq.train()(torch.rand(1, 3, 8, 8))
    assert losses.commitment.item() == pytest.approx(0.25 * losses.codebook.item())


def test_group_norm_needs_channels_divisible_by_32() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        VQArgs(ch=48, ch_mult=(1, 2))


def test_a_narrow_tokenizer_may_use_fewer_norm_groups_with_the_same_state_dict() -> None:
    official = build_vq(VQArgs(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=32), "cpu")
    narrow = build_vq(
        VQArgs(codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2), z_channels=32, norm_groups=8), "cpu"
    )
    shapes = {k: v.shape for k, v in official.state_dict().items()}
    assert {k: v.shape for k, v in narrow.state_dict().items()} == shapes
    assert {m.num_groups for m in narrow.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    assert {m.num_groups for m in official.modules() if isinstance(m, torch.nn.GroupNorm)} == {32}
    with pytest.raises(ValueError, match="divisible by 16"):
        VQArgs(ch=8, ch_mult=(1, 2), z_channels=32, norm_groups=16)
    with pytest.raises(ValueError, match="at least 1"):
        VQArgs(norm_groups=0)


PATCH_VQ = VQArgs(
    codebook_size=64, codebook_embed_dim=4, ch=32, ch_mult=(1, 2, 2), z_channels=32, encoder_context="patch"
)


def test_patch_encoder_gives_each_code_from_its_own_patch_alone() -> None:
    torch.manual_seed(0)
    vq = build_vq(PATCH_VQ, "cpu").eval()
    images = torch.rand(2, 3, 16, 24) * 2 - 1  # a 4x6 grid of 4x4 patches
    changed = images.clone()
    changed[:, :, 8:] = torch.rand(2, 3, 8, 24) * 2 - 1  # the lower two rows of patches only
    with torch.inference_mode():
        grid, grid_changed = vq.encoder(images), vq.encoder(changed)
        alone = vq.encoder(images[:, :, 4:8, 12:16])  # patch (row 1, column 3) by itself
    assert torch.equal(grid[:, :, :2], grid_changed[:, :, :2])
    assert not torch.allclose(grid[:, :, 2:], grid_changed[:, :, 2:])
    assert torch.allclose(alone[:, :, 0, 0], grid[:, :, 1, 3], atol=1e-6)
    assert torch.equal(vq.encode(images)[:, :12], vq.encode(changed)[:, :12])


def test_whole_image_encoder_codes_depend_on_the_rest_of_the_image() -> None:
    torch.manual_seed(0)
    vq = build_vq(VQArgs(**{**PATCH_VQ.__dict__, "encoder_context": "global"}), "cpu").eval()
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    changed = images.clone()
    changed[:, :, 8:] = 0.0
    with torch.inference_mode():
        assert not torch.allclose(vq.encoder(images)[:, :, :2], vq.encoder(changed)[:, :, :2])


def test_patch_encoder_keeps_the_official_state_dict_and_refuses_unknown_contexts() -> None:
    official = build_vq(VQArgs(**{**PATCH_VQ.__dict__, "encoder_context": "global"}), "cpu")
    patch = build_vq(PATCH_VQ, "cpu")
    assert {k: v.shape for k, v in patch.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}
    with pytest.raises(ValueError, match="encoder_context"):
        VQArgs(encoder_context="local")  # type: ignore[arg-type]


def test_patch_encoder_keeps_the_colour_of_a_flat_patch() -> None:
    torch.manual_seed(0)
    vq = build_vq(PATCH_VQ, "cpu").eval()
    red, blue = torch.full((1, 3, 4, 4), -1.0), torch.full((1, 3, 4, 4), -1.0)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    with torch.inference_mode():
        assert not torch.allclose(vq.encoder(red), vq.encoder(blue), atol=1e-3)


def test_presets_downsample_by_16_and_8() -> None:
    assert (VQArgs.from_name("VQ-16").downsample, VQArgs.from_name("VQ-8").downsample) == (16, 8)


def test_to_uint8_uses_the_official_clamped_floor_mapping() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 255]


def test_channels_last_layout_keeps_decoded_images_and_codes(tiny_vq: VQModel) -> None:
    ids = torch.randint(0, 64, (2, 16))
    images = tiny_vq.decode_codes(ids, grid=(4, 4))
    codes = tiny_vq.encode(images)
    tiny_vq.use_channels_last()
    assert torch.allclose(tiny_vq.decode_codes(ids, grid=(4, 4)), images, atol=1e-5)
    assert torch.equal(tiny_vq.encode(images), codes)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_phase_convs_equal_the_conv_over_the_upsampled_input(channels_last: bool) -> None:
    torch.manual_seed(0)
    up, x = Upsample(32), torch.randn(2, 32, 5, 7)
    if channels_last:
        up, x = up.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    official = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.inference_mode():
        ours = up(x)
    assert ours.shape == official.shape
    assert (ours - official).abs().max() <= 1e-5 * official.abs().max()


def test_upsample_phase_kernels_follow_in_place_weight_updates() -> None:
    torch.manual_seed(0)
    up, x = Upsample(32), torch.randn(1, 32, 4, 4)
    with torch.inference_mode():
        up(x)
    with torch.no_grad():
        up.conv.weight.mul_(-2.0)
    official = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.inference_mode():
        assert (up(x) - official).abs().max() <= 1e-5 * official.abs().max()


needs_nnpack = pytest.mark.skipif(not winograd_available(), reason="this PyTorch build has no NNPACK")


@needs_nnpack
def test_winograd_conv3x3_matches_the_direct_conv_to_float32_tolerance() -> None:
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(1, 64, WINOGRAD_MIN_SIDE, WINOGRAD_MIN_SIDE + 8)
    direct = conv(x).detach()
    with torch.inference_mode():
        fast = conv3x3(conv, x, winograd=True)
    assert fast.shape == direct.shape
    assert (fast - direct).abs().max() <= 3e-5 * direct.abs().max()


@needs_nnpack
def test_winograd_conv3x3_keeps_the_direct_conv_for_autograd_and_small_maps() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    large, small = torch.randn(1, 32, WINOGRAD_MIN_SIDE, WINOGRAD_MIN_SIDE), torch.randn(1, 32, 16, 16)
    assert torch.equal(conv3x3(conv, large, winograd=True), conv(large))  # gradients enabled
    with torch.inference_mode():
        assert torch.equal(conv3x3(conv, small, winograd=True), conv(small))
        assert torch.equal(conv3x3(conv, large, winograd=False), conv(large))


def test_only_the_decoder_blocks_use_winograd(tiny_vq: VQModel) -> None:
    assert all(b.winograd for level in tiny_vq.decoder.conv_blocks for b in level.res)
    assert not any(m.winograd for m in tiny_vq.encoder.modules() if isinstance(m, ResnetBlock))
