"""Real classifiers on tiny local models: MiniLM (bundled), Detoxify format, open_clip. Nothing downloads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertForSequenceClassification

from policies.classifiers.base import ClassifierError, file_sha256, trace
from policies.classifiers.image_concepts import ImageConceptClassifier, load_clip
from policies.classifiers.semantic import SemanticClassifier, load_minilm
from policies.classifiers.toxicity import DetoxifyClassifier
from policies.decisions import Context
from policies.loader import load_policy_file
from policies.runtime import PolicyRuntime
from policies.schema import ClipModel, DetoxifyModel, ImageConcept, SemanticCategory

from .conftest import DETOXIFY_CLASSES, REPO, RULES, policy


def detox_spec(root: Path, sha256: str | None = None) -> DetoxifyModel:
    return DetoxifyModel(variant="original", checkpoint="detox/tiny.ckpt", config_dir="detox/bert",
                         sha256=sha256 or file_sha256(root / "detox" / "tiny.ckpt"))


def test_minilm_ranks_a_paraphrase_above_an_unrelated_prompt() -> None:
    category = SemanticCategory(id="violence", action="review", threshold=0.5,
                                exemplars=["a man stabbing another man with a knife"])
    classifier = SemanticClassifier([category], load_minilm("cpu"))
    near, far = classifier.score(["a man stabbing a stranger with a knife in a dark alley",
                                  "a bowl of fruit on a table"])
    assert near["violence"] > far["violence"] + 0.3
    assert classifier.version.startswith("sha256:")


def test_detoxify_checkpoint_scores_every_label_offline(tiny_detoxify_dir: Path) -> None:
    classifier = DetoxifyClassifier(detox_spec(tiny_detoxify_dir), tiny_detoxify_dir)
    (scores,) = classifier.score(["you are a wonderful person"])
    expected = {"toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"}
    assert set(scores) == expected and len(DETOXIFY_CLASSES) == len(expected)
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_detoxify_scores_come_from_a_traced_graph_equal_to_the_eager_model(tiny_detoxify_dir: Path) -> None:
    classifier = DetoxifyClassifier(detox_spec(tiny_detoxify_dir), tiny_detoxify_dir)  # traced on two prompts
    texts = ["hi", "a much longer prompt, so that the others are padded to its length", "you are a wonderful person"]
    reference = BertForSequenceClassification(BertConfig.from_pretrained(tiny_detoxify_dir / "detox" / "bert"))
    reference.load_state_dict(torch.load(tiny_detoxify_dir / "detox" / "tiny.ckpt")["state_dict"])
    with torch.inference_mode():  # the unpacked, eager model
        eager = torch.sigmoid(reference.eval()(**classifier._detox.tokens(texts)).logits)
    for i, (text, row) in enumerate(zip(texts, classifier.score(texts), strict=True)):
        assert list(row.values()) == pytest.approx(eager[i].tolist(), abs=1e-6)  # padded in a batch
        assert row == pytest.approx(classifier.score([text])[0], abs=1e-6)  # alone


def test_detoxify_refuses_a_checkpoint_whose_hash_differs_from_the_pin(tiny_detoxify_dir: Path) -> None:
    with pytest.raises(ClassifierError, match="refusing to unpickle"):
        DetoxifyClassifier(detox_spec(tiny_detoxify_dir, sha256="0" * 64), tiny_detoxify_dir)


def test_detoxify_truncates_prompts_longer_than_the_model_reads(tiny_detoxify_dir: Path) -> None:
    classifier = DetoxifyClassifier(detox_spec(tiny_detoxify_dir), tiny_detoxify_dir)
    assert len(classifier.score(["word " * 500])) == 1


def test_toxicity_rules_act_through_the_runtime(tiny_detoxify_dir: Path) -> None:
    sha = file_sha256(tiny_detoxify_dir / "detox" / "tiny.ckpt")
    loaded = policy(f"""
    id: tox
    version: "1"
    prompt:
      toxicity:
        model: {{variant: original, checkpoint: detox/tiny.ckpt, config_dir: detox/bert, sha256: "{sha}"}}
        rules: [{{id: any_toxicity, label: toxicity, threshold: 0.0, action: review}}]
    """)
    screening = PolicyRuntime(loaded, tiny_detoxify_dir).screen_prompt("hello", Context())
    assert screening.decision.rule_ids == ["any_toxicity"]


def clip_spec() -> ClipModel:
    return ClipModel(architecture="tinyclip", config="tiny/tinyclip.json", weights="tiny/tinyclip.pt")


def concepts(threshold: float) -> list[ImageConcept]:
    return [ImageConcept(id="red_star", name="red star", action="flag", threshold=threshold,
                         prompts=["a red star", "a red star on white"]),
            ImageConcept(id="blue", name="blue", action="block", threshold=threshold, prompts=["a blue circle"])]


def test_image_concepts_give_a_raw_cosine_per_concept(tiny_clip_dir: Path) -> None:
    classifier = ImageConceptClassifier(concepts(0.3), clip_spec(), tiny_clip_dir)
    red, blue = classifier.score([Image.new("RGB", (40, 40), "red"), Image.new("RGB", (32, 32), "blue")])
    assert set(red) == {"red_star", "blue"}
    assert all(-1.0 <= v <= 1.0 for v in red.values()) and red != blue
    assert classifier.version == "sha256:" + file_sha256(tiny_clip_dir / "tiny" / "tinyclip.pt")


def test_image_concept_fires_when_cosine_reaches_its_threshold(tiny_clip_dir: Path) -> None:
    image = Image.new("RGB", (32, 32), "red")
    (scores,) = ImageConceptClassifier(concepts(0.3), clip_spec(), tiny_clip_dir).score([image])
    loaded = policy(f"""
    id: clip
    version: "1"
    output:
      image_concepts:
        model: {{architecture: tinyclip, config: tiny/tinyclip.json, weights: tiny/tinyclip.pt}}
        concepts:
          - {{id: red_star, name: red star, action: flag, threshold: {scores['red_star']}, prompts: [a red star,
              a red star on white]}}
    """)
    (screening,) = PolicyRuntime(loaded, tiny_clip_dir).screen_images([image], Context())
    assert screening.decision.action == "flag" and screening.decision.rule_ids == ["red_star"]


@pytest.mark.parametrize("architecture", ["tinyclip (ViT)", "tinycoca (CoCa)", "demo (ModifiedResNet)"])
def test_the_traced_image_embedding_equals_open_clips_eager_encode_image(architecture: str,
                                                                         tiny_clip_dir: Path) -> None:
    name = architecture.split()[0]
    if name == "demo":  # the bundled model
        spec, models_dir = ClipModel(architecture="clip_config", config="demo/clip_config.json",
                                     weights="demo/clip.pt"), REPO / "models"
    else:
        spec, models_dir = ClipModel(architecture=name, config=f"tiny/{name}.json", weights=f"tiny/{name}.pt"), \
            tiny_clip_dir
    clip, _ = load_clip(spec, models_dir)  # traced on a batch of two
    weights = str(models_dir / spec.weights)
    reference, _, _ = open_clip.create_model_and_transforms(spec.architecture, pretrained=weights)
    for count in (1, 3):
        pixels = torch.rand(count, *clip.preprocess(Image.new("RGB", (8, 8))).shape)
        with torch.inference_mode():  # against the unpacked, eager model
            torch.testing.assert_close(clip.encode_image(pixels), reference.eval().encode_image(pixels), atol=1e-5,
                                       rtol=0)


def test_a_traced_graph_that_fixed_a_branch_taken_on_its_example_is_refused() -> None:
    class DoublesLargeBatches(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.shape[0] > 2 else x  # a Python branch: the trace keeps the one it took

    with pytest.raises(ClassifierError, match="differs from its eager forward"):
        trace(DoublesLargeBatches(), (torch.ones(2, 3),), check=(torch.ones(3, 3),))
    graph = trace(DoublesLargeBatches(), (torch.ones(3, 3),), check=(torch.ones(4, 3),))  # same side: served
    assert torch.equal(graph(torch.ones(5, 3)), torch.full((5, 3), 2.0))


def test_clip_weights_with_a_different_pinned_hash_are_refused(tiny_clip_dir: Path) -> None:
    spec = ClipModel(architecture="tinyclip", config="tiny/tinyclip.json", weights="tiny/tinyclip.pt",
                     sha256="0" * 64)
    with pytest.raises(ClassifierError, match="pins"):
        ImageConceptClassifier(concepts(0.3), spec, tiny_clip_dir)


def test_clip_is_loaded_once_per_weights_hash(tiny_clip_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_clip_dir / "tiny", copy)
    a = ImageConceptClassifier(concepts(0.3), clip_spec(), tiny_clip_dir)
    b = ImageConceptClassifier(concepts(0.3), clip_spec(), tmp_path)
    assert a._clip is b._clip


def test_tiny_clip_config_is_a_valid_open_clip_config(tiny_clip_dir: Path) -> None:
    config = json.loads((tiny_clip_dir / "tiny" / "tinyclip.json").read_text())
    assert {"embed_dim", "vision_cfg", "text_cfg"} <= set(config)


DEMO_CLIP = REPO / "models" / "demo" / "clip.pt"


def demo_image(shape: str, colour: str) -> Image.Image:
    """One large shape on white, drawn by the renderer the demo CLIP was trained on."""
    from generator.demo.shapes import Scene, ShapeSpec, render

    return render(Scene((ShapeSpec(shape, colour, "large"),), "alone", "white"))


@pytest.mark.skipif(not DEMO_CLIP.is_file(), reason="the demo CLIP (models/demo/clip.pt) is not built")
def test_default_policy_flags_a_red_star_with_the_demo_clip_and_nothing_harmful() -> None:
    runtime = PolicyRuntime(load_policy_file(RULES / "default.yaml"), REPO / "models")
    images = [demo_image("star", "red"), demo_image("circle", "blue"), demo_image("square", "green")]
    red_star, blue_circle, green_square = runtime.screen_images(images, Context(model="demo-shapes-t2i"))
    assert red_star.decision.action == "flag" and red_star.decision.rule_ids == ["test_red_star"]
    assert blue_circle.decision.action == "allow" and green_square.decision.action == "allow"
