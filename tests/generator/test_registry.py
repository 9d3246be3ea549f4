"""Model registry: card schema, content hash, checksum-verified cached loading, batched generation."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from generator.demo.cards import official_cards, write_card
from generator.llamagen import ModelArgs, VQArgs, build_gpt, build_vq, save_checkpoint, sha256_file
from generator.registry import (
    ChecksumMismatchError,
    GenRequest,
    ModelCard,
    Registry,
    RegistryError,
    UnknownModelError,
    decode_workers,
    read_card,
)
from tests.conftest import DEMO_MODELS

VQ = {"codebook_size": 32, "codebook_embed_dim": 4, "ch": 32, "ch_mult": [1, 1], "z_channels": 32, "num_res_blocks": 1}
GPT = {"dim": 32, "n_layer": 1, "n_head": 2, "multiple_of": 16, "vocab_size": 32, "block_size": 16, "num_classes": 4}


def card_data(gpt_sha: str | None, vq_sha: str | None, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "tiny-c2i",
        "version": "1",
        "task": "c2i",
        "architecture": {"gpt": GPT, "vq": VQ, "image_size": 8},
        "checkpoints": {
            "gpt": {"path": "tiny/gpt.pt", "sha256": gpt_sha},
            "vq": {"path": "tiny/vq.pt", "sha256": vq_sha},
        },
        "licence": "MIT",
        "intended_use": "tests",
        "defaults": {"cfg_scale": 2.0, "top_k": 0, "top_p": 1.0, "temperature": 1.0},
        "class_names": ["a", "b", "c", "d"],
        "lineage": [{"stage": "c2i", "dataset": {"name": "toy", "caption_source": "programmatic", "seed": 1}}],
    }
    data.update(changes)
    return data


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A models dir with one servable tiny c2i card (random weights) and the official cards."""
    torch.manual_seed(0)
    (tmp_path / "tiny").mkdir()
    gpt = build_gpt(ModelArgs(**GPT, task="c2i"), device="cpu")  # type: ignore[arg-type]
    with torch.no_grad():
        torch.nn.init.normal_(gpt.output.weight, std=1.0)  # official init zeroes the head: make sampling vary
    save_checkpoint(gpt, tmp_path / "tiny" / "gpt.pt")
    vq_args = VQArgs(**{**VQ, "ch_mult": tuple(VQ["ch_mult"])})  # type: ignore[arg-type]
    save_checkpoint(build_vq(vq_args, device="cpu"), tmp_path / "tiny" / "vq.pt")
    data = card_data(sha256_file(tmp_path / "tiny" / "gpt.pt"), sha256_file(tmp_path / "tiny" / "vq.pt"))
    (tmp_path / "tiny-c2i.yaml").write_text(yaml.safe_dump(data))
    for card in official_cards():
        write_card(card, tmp_path / "official" / f"{card.name}.yaml")
    Registry.clear_cache()
    return tmp_path


def test_cards_lists_every_card_under_the_models_dir_sorted_by_name(models_dir: Path) -> None:
    names = [c.name for c in Registry(models_dir).cards()]
    assert names == sorted(names) and "tiny-c2i" in names and "llamagen-t2i-xl-stage2-512" in names


def test_get_unknown_model_names_the_known_ones(models_dir: Path) -> None:
    with pytest.raises(UnknownModelError, match="no model card named 'nope'.*tiny-c2i"):
        Registry(models_dir).get("nope")


def test_content_hash_is_stable_and_changes_with_any_field(models_dir: Path) -> None:
    card = Registry(models_dir).get("tiny-c2i")
    same = ModelCard.model_validate(card.model_dump())
    changed = ModelCard.model_validate({**card.model_dump(), "licence": "Apache-2.0"})
    assert card.content_hash == same.content_hash != changed.content_hash
    assert card.content_hash.startswith("sha256:") and len(card.content_hash) == 7 + 64


def _age(path: Path, seconds: float = 5.0) -> None:
    """Date a file back, as if written before this test: a freshly written file is never cached."""
    import os
    import time

    then = time.time() - seconds
    os.utime(path, (then, then))


def _age_tree(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        _age(path)


def test_a_card_edited_after_a_lookup_is_seen_by_the_same_registry(models_dir: Path) -> None:
    _age_tree(models_dir)
    registry = Registry(models_dir)
    before = registry.get("tiny-c2i")
    assert registry.get("tiny-c2i") is before  # unchanged files: the listing is reused
    path = models_dir / "tiny-c2i.yaml"
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "licence": "Apache-2.0"}))
    after = registry.get("tiny-c2i")
    assert after.licence == "Apache-2.0" and after.content_hash != before.content_hash


def test_a_card_edited_within_the_timestamp_tick_is_seen(models_dir: Path) -> None:
    registry = Registry(models_dir)
    path = models_dir / "tiny-c2i.yaml"
    data = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**data, "version": "1"}))
    assert registry.get("tiny-c2i").version == "1"
    stat = path.stat()
    path.write_text(yaml.safe_dump({**data, "version": "2"}))  # same size, maybe the same mtime
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert registry.get("tiny-c2i").version == "2"


def test_cards_added_and_removed_after_a_lookup_are_seen_by_the_same_registry(models_dir: Path) -> None:
    _age_tree(models_dir)
    registry = Registry(models_dir)
    assert "tiny-other" not in [c.name for c in registry.cards()]
    (models_dir / "official" / "other.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load((models_dir / "tiny-c2i.yaml").read_text()), "name": "tiny-other"}))
    assert registry.get("tiny-other").name == "tiny-other"
    (models_dir / "tiny-c2i.yaml").unlink()
    with pytest.raises(UnknownModelError):
        registry.get("tiny-c2i")


def test_content_hash_of_an_updated_copy_is_its_own(models_dir: Path) -> None:
    card = Registry(models_dir).get("tiny-c2i")
    copy = card.model_copy(update={"licence": "Apache-2.0"})
    assert copy.content_hash == ModelCard.model_validate(copy.model_dump()).content_hash != card.content_hash


def test_unknown_card_field_is_rejected_naming_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    data = card_data(None, None)
    data["lineage"][0]["dataset"]["captions"] = "yes"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match=r"bad.yaml.*lineage\.0\.dataset\.captions"):
        read_card(path)


@pytest.mark.parametrize("gpt,vq,image_size,expected", [
    ({"dim": "abc"}, None, 8, r"architecture\.gpt: dim must be int, got 'abc'"),
    ("GPT-Q", None, 8, r"architecture\.gpt: unknown GPT preset 'GPT-Q'"),
    (None, {"ch_mult": [1, "2"]}, 8, r"architecture\.vq: ch_mult must be tuple\[int, \.\.\.\]"),
    (None, None, 16, r"image_size 16 \(grid 8\) contradicts ModelArgs\.block_size"),
], ids=["string-dim", "unknown-preset", "string-in-ch-mult", "image-size-against-block-size"])
def test_a_card_whose_architecture_cannot_build_is_refused_when_read(
        tmp_path: Path, gpt: Any, vq: Any, image_size: int, expected: str) -> None:
    data = card_data(None, None)
    architecture = data["architecture"]
    architecture["gpt"] = gpt if isinstance(gpt, str) else {**architecture["gpt"], **(gpt or {})}
    architecture["vq"] = {**architecture["vq"], **(vq or {})}
    architecture["image_size"] = image_size
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match=r"bad\.yaml: invalid model card: .*" + expected):
        read_card(path)


def test_unknown_caption_source_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    data = card_data(None, None)
    data["lineage"][0]["dataset"]["caption_source"] = "crowd"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match="caption_source"):
        read_card(path)


def test_t2i_card_without_text_encoder_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(card_data(None, None, task="t2i", class_names=None)))
    with pytest.raises(RegistryError, match="text_encoder"):
        read_card(path)


@pytest.mark.parametrize(
    ("text_encoder", "message"),
    [
        ({"kind": "minilm", "max_len": 24, "layers": 7}, "less than or equal to 6"),
        ({"kind": "t5", "path": "t5", "max_len": 120, "layers": 2}, "minilm encoder only"),
    ],
)
def test_text_encoder_layers_must_exist_and_belong_to_minilm(
    tmp_path: Path, text_encoder: dict[str, Any], message: str
) -> None:
    path = tmp_path / "bad.yaml"
    data = card_data(None, None, task="t2i", class_names=None)
    data["architecture"]["text_encoder"] = text_encoder
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RegistryError, match=message):
        read_card(path)


def test_duplicate_card_names_are_an_error(models_dir: Path) -> None:
    (models_dir / "copy.yaml").write_text((models_dir / "tiny-c2i.yaml").read_text())
    with pytest.raises(RegistryError, match="'tiny-c2i' is also used"):
        Registry(models_dir).cards()


def test_public_view_is_json_safe_and_carries_hash_and_servability(models_dir: Path) -> None:
    import json

    public = Registry(models_dir).get("tiny-c2i").public()
    assert json.loads(json.dumps(public))["servable"] is True
    assert public["content_hash"] == Registry(models_dir).get("tiny-c2i").content_hash


def test_official_cards_carry_their_published_lineage(models_dir: Path) -> None:
    stage2 = Registry(models_dir).get("llamagen-t2i-xl-stage2-512")
    stages = {s.stage: s.dataset for s in stage2.lineage}
    assert stages["stage1"].caption_source == "synthetic" and stages["stage1"].resolution == 256
    assert "BLIP" in (stages["stage1"].captioning_model or "")
    assert any("Re-LAION" in a for a in stages["stage1"].advisories)
    assert stages["stage2"].captioning_model == "LLaVA" and stages["stage2"].resolution == 512
    assert stage2.architecture.text_encoder is not None and stage2.architecture.text_encoder.kind == "t5"


def test_official_card_without_pinned_digest_is_not_servable_and_refuses_to_load(models_dir: Path) -> None:
    registry = Registry(models_dir)
    assert not registry.get("llamagen-c2i-b-256").servable
    with pytest.raises(RegistryError, match="no pinned sha256"):
        registry.load("llamagen-c2i-b-256")


def test_load_refuses_a_checkpoint_whose_sha256_differs_from_the_card(models_dir: Path) -> None:
    with (models_dir / "tiny" / "vq.pt").open("ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ChecksumMismatchError, match="tiny/vq.pt has SHA-256"):
        Registry(models_dir).load("tiny-c2i")


def test_load_is_cached_per_process(models_dir: Path) -> None:
    assert Registry(models_dir).load("tiny-c2i") is Registry(models_dir).load("tiny-c2i")


def test_checkpoint_digests_are_the_pinned_ones(models_dir: Path) -> None:
    card = Registry(models_dir).get("tiny-c2i")
    assert card.checkpoint_digests() == {
        "gpt": sha256_file(models_dir / "tiny" / "gpt.pt"),
        "vq": sha256_file(models_dir / "tiny" / "vq.pt"),
    }


def test_generate_returns_num_images_per_request_with_token_counts(models_dir: Path) -> None:
    model = Registry(models_dir).load("tiny-c2i")
    outputs = model.generate([GenRequest(class_id=1, seed=3, num_images=2), GenRequest(class_id=2, seed=4)])
    assert [len(o.images) for o in outputs] == [2, 1]
    assert [o.tokens for o in outputs] == [2 * 16, 16]
    assert outputs[0].images[0].size == (8, 8) and all(o.device_seconds > 0 for o in outputs)


def test_batched_requests_give_the_same_images_as_each_request_alone(models_dir: Path) -> None:
    model = Registry(models_dir).load("tiny-c2i")
    requests = [GenRequest(class_id=0, seed=11, num_images=2), GenRequest(class_id=3, seed=5)]
    batched = model.generate(requests)
    alone = [model.generate([r])[0] for r in requests]
    for b, a in zip(batched, alone, strict=True):
        assert [im.tobytes() for im in b.images] == [im.tobytes() for im in a.images]


def test_the_bundled_demo_model_gives_a_batch_the_pixels_of_each_request_alone(
    request: pytest.FixtureRequest,
) -> None:
    """What `audit reproduce` relies on: a job sampled among others decodes to the pixels it has alone (the
    batch of 8 is where the decoder's convolutions used to differ in the last bit, with one torch thread as the
    embedded gateway runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    model = Registry(DEMO_MODELS).load("demo-shapes-t2i")
    prompts = ["a small red star above a large blue circle on a white background",
               "a green square on a black background",
               "a large yellow triangle left of a small purple circle on a grey background",
               "a blue star on a white background"]
    jobs = [GenRequest(prompt=prompts[i % 4], seed=i) for i in range(8)]
    batched = model.generate(jobs)
    for job, output in zip(jobs, batched, strict=True):
        (alone,) = model.generate([job])
        assert output.images[0].tobytes() == alone.images[0].tobytes(), job


def test_a_runs_images_are_decoded_on_several_threads_each_to_the_pixels_it_has_alone(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU a run's images are decoded at the same time, one per call; the pixels are those of one
    thread decoding them in turn, and a GPU (or a process that has all the cores) decodes them in turn."""
    model = Registry(models_dir).load("tiny-c2i")
    requests = [GenRequest(class_id=i % 4, seed=i) for i in range(6)]
    monkeypatch.setattr("generator.registry.decode_workers", lambda device: 1)
    in_turn = model.generate(requests)

    threads: set[str] = set()
    decode_codes = model.vq.decode_codes

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        threads.add(threading.current_thread().name)
        return decode_codes(*args, **kwargs)

    monkeypatch.setattr(model.vq, "decode_codes", recording)
    monkeypatch.setattr("generator.registry.decode_workers", lambda device: 3)
    at_once = model.generate(requests)
    assert len(threads) > 1 and all(name.startswith("vq-decode") for name in threads)
    assert [o.images[0].tobytes() for o in at_once] == [o.images[0].tobytes() for o in in_turn]


def test_the_cpu_decodes_one_image_per_core_at_once_with_one_torch_thread_per_call(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    torch.set_num_threads(1)
    assert decode_workers("cpu") == 4
    assert decode_workers("cuda:0") == 1
    torch.set_num_threads(2)  # teams of two would stall each other on shared cores: in turn
    assert decode_workers("cpu") == 1


def test_image_i_of_a_request_uses_seed_plus_i(models_dir: Path) -> None:
    model = Registry(models_dir).load("tiny-c2i")
    (pair,) = model.generate([GenRequest(class_id=1, seed=20, num_images=2)])
    (second,) = model.generate([GenRequest(class_id=1, seed=21)])
    assert pair.images[1].tobytes() == second.images[0].tobytes()


def test_class_conditional_model_rejects_a_prompt(models_dir: Path) -> None:
    with pytest.raises(ValueError, match="class-conditional"):
        Registry(models_dir).load("tiny-c2i").generate([GenRequest(prompt="a cat", seed=0)])


def test_class_id_outside_the_card_classes_is_rejected(models_dir: Path) -> None:
    with pytest.raises(ValueError, match="class_id 4 is outside 0..3"):
        Registry(models_dir).load("tiny-c2i").generate([GenRequest(class_id=4, seed=0)])


def test_sampling_params_fill_missing_job_params_from_card_defaults(models_dir: Path) -> None:
    params = Registry(models_dir).load("tiny-c2i").sampling_params({"temperature": 0.5, "seed": 3})
    assert (params.cfg_scale, params.temperature, params.top_k) == (2.0, 0.5, 0)


@pytest.fixture
def t5_models_dir(tmp_path: Path) -> Path:
    """A t2i card in the official layout (T5 text encoder from a local folder) with tiny random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["a", "red", "circle", "on", "white", "background"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5_dir = tmp_path / "weights" / "t5"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(t5_dir)
    torch.manual_seed(0)
    T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(t5_dir)
    gpt_fields = {**GPT, "caption_dim": 16, "caption_len": 6, "cls_token_num": 6}
    gpt_fields.pop("num_classes")
    save_checkpoint(build_gpt(ModelArgs(**gpt_fields, task="t2i"), device="cpu"), tmp_path / "weights" / "gpt.pt")  # type: ignore[arg-type]
    vq_args = VQArgs(**{**VQ, "ch_mult": tuple(VQ["ch_mult"])})  # type: ignore[arg-type]
    save_checkpoint(build_vq(vq_args, device="cpu"), tmp_path / "weights" / "vq.pt")
    data = card_data(None, None, name="tiny-t2i", task="t2i", class_names=None)
    data["architecture"] = {
        "gpt": gpt_fields,
        "vq": VQ,
        "image_size": 8,
        "text_encoder": {"kind": "t5", "path": "weights/t5", "max_len": 6},
    }
    data["checkpoints"] = {
        "gpt": {"path": "weights/gpt.pt", "sha256": sha256_file(tmp_path / "weights" / "gpt.pt")},
        "vq": {"path": "weights/vq.pt", "sha256": sha256_file(tmp_path / "weights" / "vq.pt")},
    }
    (tmp_path / "tiny-t2i.yaml").write_text(yaml.safe_dump(data))
    Registry.clear_cache()
    return tmp_path


def test_t2i_card_with_a_local_t5_text_encoder_loads_and_generates(t5_models_dir: Path) -> None:
    model = Registry(t5_models_dir).load("tiny-t2i")
    (out,) = model.generate([GenRequest(prompt="a red circle on a white background", seed=0)])
    assert out.images[0].size == (8, 8) and out.tokens == 16


def test_text_encoder_digest_is_the_sha256_of_its_weights(t5_models_dir: Path) -> None:
    card = Registry(t5_models_dir).get("tiny-t2i")
    weights = t5_models_dir / "weights" / "t5" / "model.safetensors"
    assert card.checkpoint_digests()["text_encoder"] == sha256_file(weights)


def test_t2i_model_rejects_a_request_without_prompt(t5_models_dir: Path) -> None:
    with pytest.raises(ValueError, match="text-to-image"):
        Registry(t5_models_dir).load("tiny-t2i").generate([GenRequest(class_id=1, seed=0)])


def test_missing_t5_folder_is_reported_with_the_card_field(t5_models_dir: Path) -> None:
    import shutil

    shutil.rmtree(t5_models_dir / "weights" / "t5")
    with pytest.raises(RegistryError, match="T5 text encoder folder .* not found"):
        Registry(t5_models_dir).load("tiny-t2i")


def test_a_registry_with_a_pinned_decode_layout_loads_its_models_in_it_untimed(
        tiny_models, monkeypatch: pytest.MonkeyPatch) -> None:
    from generator.llamagen import layout

    def untimed(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pinned layout is not timed")

    monkeypatch.setattr(layout, "choose_decode_layout", untimed)
    monkeypatch.setattr("generator.llamagen.loading.choose_decode_layout", untimed)
    model = Registry(tiny_models, "streaming, packed from 3 rows").load("tiny-c2i", "cpu")
    assert model.gpt.decode_layout == "streaming, packed from 3 rows"
    assert Registry(tiny_models, "plain").load("tiny-c2i", "cpu").gpt.decode_layout == "plain"  # its own entry


def test_an_unknown_decode_layout_setting_is_refused_naming_it(tmp_path) -> None:
    from pydantic import ValidationError

    from tests.conftest import make_settings

    with pytest.raises(ValidationError, match="decode_layout[\\s\\S]*unknown decode layout 'columnar'"):
        make_settings(tmp_path / "var", decode_layout="columnar")
    assert make_settings(tmp_path / "var", decode_layout="plain, gemv.c up to 2 rows").decode_layout.startswith("plain")
