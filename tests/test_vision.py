"""Vision-language models: the language model's text logits against transformers in both checkpoint
layouts, the names exllamav2 reads, and conversions that carry the vision tower and projector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import randomize_weights, write_bpe_tokenizer, write_tokenizer
from exl2core.cli import main
from exl2core.model.exl2_weights import open_model
from exl2core.model.source import SourceModel
from exl2core.model.streaming import forward_logits
from exl2core.plugins import resolve_plan
from exl2_gemma import vlm_output_name
from exl2_vision import output_name as vision_output_name

VOCAB = 320
#: Token ids of the multimodal markers, kept out of the text ids the tests feed.
SPECIAL = dict(image=VOCAB - 1, video=VOCAB - 2, start=VOCAB - 3, end=VOCAB - 4)
TEXT = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=VOCAB, max_position_embeddings=256)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
PIXTRAL = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, head_dim=16, image_size=32, patch_size=8)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)
QWEN2_VL_VISION = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                       spatial_merge_size=2, temporal_patch_size=2)


def _config(name: str, layers: int):
    from transformers import Gemma3Config, LlavaConfig, Mistral3Config, Qwen2VLConfig

    text = dict(TEXT, num_hidden_layers=layers)
    if name == "llava":
        return LlavaConfig(text_config=dict(model_type="llama", **text), vision_config=CLIP,
                           image_token_index=SPECIAL["image"])
    if name == "mistral3":
        return Mistral3Config(text_config=dict(model_type="mistral", **text), vision_config=PIXTRAL,
                              image_token_index=SPECIAL["image"], spatial_merge_size=2)
    if name == "qwen2_vl":
        rope = dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0)
        return Qwen2VLConfig(text_config=dict(rope_parameters=rope, **text), vision_config=QWEN2_VL_VISION,
                             image_token_id=SPECIAL["image"], video_token_id=SPECIAL["video"],
                             vision_start_token_id=SPECIAL["start"], vision_end_token_id=SPECIAL["end"])
    return Gemma3Config(text_config=dict(sliding_window=8, **text), vision_config=SIGLIP,
                        mm_tokens_per_image=4, image_token_index=SPECIAL["image"],
                        boi_token_index=SPECIAL["start"], eoi_token_index=SPECIAL["end"])


def make_vlm(path: Path, name: str, layers: int = 2, bpe: bool = False):
    """A tiny random VLM saved by transformers (the legacy layout) with a tokenizer; returns the model."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(_config(name, layers)).float().eval()
    randomize_weights(model)
    if name == "gemma3":  # its √hidden-scaled tied head on unit embeddings saturates the softmax
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(0.1)
    model.save_pretrained(path)
    (write_bpe_tokenizer if bpe else write_tokenizer)(path, VOCAB)
    return model


#: Legacy → nested layout, as state dicts of the refactored transformers classes name the tensors.
NESTED = {
    "llava": [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
              ("vision_tower.", "model.vision_tower."),
              ("multi_modal_projector.", "model.multi_modal_projector.")],
    "qwen2_vl": [("model.", "model.language_model."), ("visual.", "model.visual.")],
}
NESTED["mistral3"] = NESTED["gemma3"] = NESTED["llava"]


def to_nested(src: Path, dst: Path, name: str) -> None:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    renamed = {}
    for key, t in load_file(src / "model.safetensors").items():
        prefix, nested = next(((p, n) for p, n in NESTED[name] if key.startswith(p)), (key, key))
        renamed[nested + key[len(prefix):]] = t
    save_file(renamed, dst / "model.safetensors")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """``vlm(name, layout)`` → ``(hf_model, model_dir)``, cached."""
    cache = {}

    def make(name: str, layout: str = "legacy"):
        if (name, layout) not in cache:
            if layout == "legacy":
                path = tmp_path_factory.mktemp(name)
                cache[name, layout] = (make_vlm(path, name), path)
            else:
                hf, path = make(name)
                nested = tmp_path_factory.mktemp(name + "_nested") / "model"
                to_nested(path, nested, name)
                cache[name, layout] = (hf, nested)
        return cache[name, layout]

    return make


def text_ids() -> torch.Tensor:
    return torch.randint(3, SPECIAL["end"], (2, 40), generator=torch.Generator().manual_seed(0))


ARCHS = ["llava", "mistral3", "qwen2_vl", "gemma3"]


@pytest.mark.filterwarnings("ignore:LlavaForConditionalGeneration")
@pytest.mark.parametrize("layout", ["legacy", "nested"])
@pytest.mark.parametrize("name", ARCHS)
def test_text_logits_match_transformers(vlm, name, layout):
    hf, path = vlm(name, layout)
    source = SourceModel(path)
    plan = resolve_plan(source.config, tensor_names=source.keys())  # the layout is read off the names
    ids = text_ids()
    with torch.inference_mode():
        ref = hf(input_ids=ids).logits.float()
    ours = forward_logits(source, plan, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.filterwarnings("ignore:LlavaForConditionalGeneration")
@pytest.mark.parametrize("name", ARCHS)
def test_both_layouts_get_the_same_output_names(vlm, name):
    legacy = SourceModel(vlm(name)[1])
    nested = SourceModel(vlm(name, "nested")[1])
    arch = legacy.config.architecture
    names = sorted(output_name(arch, k) for k in legacy.keys())
    assert sorted(output_name(arch, k) for k in nested.keys()) == names
    plan = resolve_plan(nested.config, tensor_names=nested.keys())
    assert sorted(plan.output_name(k) for k in nested.keys()) == names


@pytest.mark.parametrize("arch, key, expected", [
    ("LlavaForConditionalGeneration", "model.language_model.layers.0.input_layernorm.weight",
     "language_model.model.layers.0.input_layernorm.weight"),
    ("LlavaForConditionalGeneration", "lm_head.weight", "language_model.lm_head.weight"),
    ("LlavaForConditionalGeneration", "model.vision_tower.transformer.layers.0.ffn_norm.weight",
     "vision_tower.transformer.layers.0.ffn_norm.weight"),
    ("LlavaForConditionalGeneration", "multi_modal_projector.linear_1.weight",
     "multi_modal_projector.linear_1.weight"),
    ("Qwen2VLForConditionalGeneration", "model.language_model.norm.weight", "model.norm.weight"),
    ("Qwen2VLForConditionalGeneration", "model.layers.1.self_attn.q_proj.bias",
     "model.layers.1.self_attn.q_proj.bias"),
    ("Qwen2VLForConditionalGeneration", "model.visual.merger.mlp.0.weight", "visual.merger.mlp.0.weight"),
    ("Qwen2VLForConditionalGeneration", "lm_head.weight", "lm_head.weight"),
    ("Gemma3ForConditionalGeneration", "vision_tower.vision_model.post_layernorm.weight",
     "vision_tower.vision_model.post_layernorm.weight"),
    ("Gemma3ForConditionalGeneration", "model.vision_tower.encoder.layers.0.mlp.fc1.bias",
     "vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"),
    ("Gemma3ForConditionalGeneration", "model.multi_modal_projector.mm_input_projection_weight",
     "multi_modal_projector.mm_input_projection.weight"),
])
def test_output_names(arch, key, expected):
    assert output_name(arch, key) == expected


def output_name(architecture: str, key: str) -> str:
    """exllamav2's name of a VLM checkpoint tensor: the Gemma plugin serves the Gemma 3 VLM, the vision
    plugin the others."""
    if architecture == "Gemma3ForConditionalGeneration":
        return vlm_output_name(key)
    return vision_output_name(architecture, key)


def test_plans_carry_and_calibrate_as_exllamav2(vlm):
    qwen = resolve_plan(SourceModel(vlm("qwen2_vl")[1]).config)
    assert qwen.noise_rows == (5, 30) and qwen.lm_prefix == ""
    assert qwen.modules[1].key == "model.layers.0" and qwen.head.key == "lm_head"
    gemma = resolve_plan(SourceModel(vlm("gemma3")[1]).config)
    assert gemma.noise_rows == (0, 0) and gemma.head.key == "language_model.lm_head"
    assert gemma.carry[0] == "multi_modal_projector." and "vision_tower." in gemma.carry


def test_llava_warns_unless_pixtral(vlm):
    with pytest.warns(UserWarning, match="Pixtral"):
        resolve_plan(SourceModel(vlm("llava")[1]).config)
    plan = resolve_plan(SourceModel(vlm("mistral3")[1]).config)
    assert plan.modules[1].linears[0].key == "language_model.model.layers.0.self_attn.q_proj"


def test_legacy_qwen2_vl_mrope_config(vlm, tmp_path):
    """Released Qwen2-VL configs name M-RoPE as a scaling type (``rope_scaling: {type: mrope}``)."""
    hf, path = vlm("qwen2_vl")
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    text = config["text_config"]
    params = text.pop("rope_parameters")
    text["rope_theta"] = params["rope_theta"]
    text["rope_scaling"] = {"type": "mrope", "mrope_section": params["mrope_section"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    source = SourceModel(tmp_path)
    ids = text_ids()
    with torch.inference_mode():
        ref = hf(input_ids=ids).logits.float()
    assert (forward_logits(source, resolve_plan(source.config), ids) - ref).abs().max().item() <= 1e-4


def _convert(root: Path, name: str) -> tuple[torch.nn.Module, Path]:
    hf = make_vlm(root / "src", name, layers=1, bpe=True)
    args = ["convert", "-i", str(root / "src"), "-o", str(root / "work"), "-mr", "2", "-ml", "64", "-r", "4",
            "-l", "64", "-b", "4.0", "--device", "cpu", "-cf", str(root / "out")]
    assert main(args) == 0
    return hf, root / "out"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in path.glob("output*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


#: Per converted model: exllamav2's names of layer 0 and the head, the prefixes of every language-model
#: tensor, checkpoint prefix → output prefix of the carried tensors, quantization rows (text + noise).
CONVERSIONS = {
    "qwen2_vl": dict(layer="model.layers.0.", head="lm_head.", lm=("model.", "lm_head."),
                     carried={"visual.": "visual."}, rows=4 + 30),
    "gemma3": dict(layer="language_model.model.layers.0.", head="language_model.lm_head.",
                   lm=("language_model.",),
                   carried={"vision_tower.": "vision_tower.vision_model.",
                            "multi_modal_projector.mm_soft_emb_norm.":
                                "multi_modal_projector.mm_soft_emb_norm.",
                            "multi_modal_projector.mm_input_projection_weight":
                                "multi_modal_projector.mm_input_projection.weight"},
                   rows=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CONVERSIONS)
def test_conversion_carries_vision_parts(tmp_path, name):
    hf, out = _convert(tmp_path, name)
    want = CONVERSIONS[name]
    written = _tensors(out)
    source = load_file(tmp_path / "src" / "model.safetensors")
    carried = {k: t for k, t in source.items() if k.startswith(tuple(want["carried"]))}
    assert len(carried) > 10
    for key, t in carried.items():
        prefix = next(p for p in want["carried"] if key.startswith(p))
        assert torch.equal(written[want["carried"][prefix] + key[len(prefix):]], t), key
    for packed in ("self_attn.q_proj.q_weight", "self_attn.k_proj.q_scale", "mlp.down_proj.q_invperm"):
        assert want["layer"] + packed in written
    assert want["head"] + "q_weight" in written
    language = [k for k in written if not k.startswith(tuple(want["carried"].values()))]
    assert language and all(k.startswith(want["lm"]) for k in language)
    assert len(written) == len(language) + len(carried)
    rows = load_file(tmp_path / "work" / "cal_data.safetensors")["input_ids"].shape[0]
    assert rows == want["rows"]
    ids = text_ids()
    with torch.inference_mode():
        ref = torch.log_softmax(hf(input_ids=ids).logits.float(), -1)
    quant = torch.log_softmax(open_model(out).logits(ids), -1)
    uniform = torch.full_like(ref, -math.log(VOCAB))
    # tiny random models lose much at 4 bpw; the conversion must still keep 90 % of what they know
    assert kl(ref, quant) < 0.1 * kl(ref, uniform)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over tokens of KL(p ‖ q) for log-probabilities."""
    return (p.exp() * (p - q)).sum(-1).mean().item()
