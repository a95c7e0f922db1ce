"""The CLIP base model: open_clip weights mapped onto CLIPModel (round trip through a tiny random model written under
open_clip names by this file's own table), the loaders' one-line errors, and the frozen dual-encoder interface."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch.nn.functional import normalize
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from leanfm.errors import LeanfmError
from leanfm.models import clip

VOCAB, BOS, EOT = 99, 97, 98
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def tiny_config(act: str = "quick_gelu") -> CLIPConfig:
    """Different widths, depths and heads per tower so that a swapped or transposed tensor cannot fit."""
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, hidden_act=act, bos_token_id=BOS, eos_token_id=EOT, pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3, image_size=32,
                  patch_size=8, hidden_act=act, projection_dim=24)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24, logit_scale_init_value=2.0)


def tiny_model(act: str = "quick_gelu") -> CLIPModel:
    torch.manual_seed(0)
    model = CLIPModel(tiny_config(act)).eval()
    with torch.no_grad():  # well away from the init (LayerNorm weights at 1, biases at 0) so every tensor matters
        for name, param in model.named_parameters():
            if name != "logit_scale":
                param.add_(0.2 * torch.randn_like(param))
    return model


def text_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three texts of lengths 10, 6, 3: BOS, words, EOT, then padding 0."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.zeros(3, 10, dtype=torch.long)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for row, length in enumerate((10, 6, 3)):
        ids[row, :length] = torch.randint(1, BOS, (length,), generator=gen)
        ids[row, 0], ids[row, length - 1] = BOS, EOT
        mask[row, :length] = 1
    return ids, mask


def pixels(size: int = 32) -> torch.Tensor:
    return torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(2))


def to_openclip(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The model's weights under open_clip's names, written from open_clip's layout, independently of clip.py."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    v, t = "vision_model.", "text_model."
    out = {
        "visual.conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd[v + "embeddings.class_embedding"],
        "visual.positional_embedding": sd[v + "embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd[v + "pre_layrnorm.weight"], "visual.ln_pre.bias": sd[v + "pre_layrnorm.bias"],
        "visual.ln_post.weight": sd[v + "post_layernorm.weight"],
        "visual.ln_post.bias": sd[v + "post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),  # open_clip: x @ proj
        "token_embedding.weight": sd[t + "embeddings.token_embedding.weight"],
        "positional_embedding": sd[t + "embeddings.position_embedding.weight"],
        "ln_final.weight": sd[t + "final_layer_norm.weight"], "ln_final.bias": sd[t + "final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
        "attn_mask": torch.full((16, 16), float("-inf")).triu(1),  # open_clip's causal-mask buffer, carries nothing
    }
    towers = [("visual.transformer.resblocks.", v + "encoder.layers.", 3), ("transformer.resblocks.",
                                                                          t + "encoder.layers.", 2)]
    for src, dst, layers in towers:
        for i in range(layers):
            a, b = f"{src}{i}.", f"{dst}{i}."
            for p in ("weight", "bias"):
                out[f"{a}ln_1.{p}"] = sd[f"{b}layer_norm1.{p}"]
                out[f"{a}ln_2.{p}"] = sd[f"{b}layer_norm2.{p}"]
                out[f"{a}attn.in_proj_{p}"] = torch.cat([sd[f"{b}self_attn.{n}_proj.{p}"] for n in "qkv"])
                out[f"{a}attn.out_proj.{p}"] = sd[f"{b}self_attn.out_proj.{p}"]
                out[f"{a}mlp.c_fc.{p}"] = sd[f"{b}mlp.fc1.{p}"]
                out[f"{a}mlp.c_proj.{p}"] = sd[f"{b}mlp.fc2.{p}"]
    return out


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# --- open_clip -> CLIPModel -------------------------------------------------------------------------------------

def test_open_clip_layout_means_what_open_clip_computes():
    """The test's table is right about open_clip: its fused in_proj in torch's MultiheadAttention and ``x @ proj``
    reproduce transformers' attention and projection (so the round trip below checks a true layout)."""
    model, state = tiny_model(), to_openclip(tiny_model())
    mha = torch.nn.MultiheadAttention(48, 3, batch_first=True)
    mha.load_state_dict({k.split("attn.")[1]: v for k, v in state.items()
                         if k.startswith("visual.transformer.resblocks.1.attn.")})
    x = torch.randn(2, 5, 48)
    expected = model.vision_model.encoder.layers[1].self_attn(x)[0]
    torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)
    pooled = torch.randn(2, 48)
    torch.testing.assert_close(pooled @ state["visual.proj"], model.visual_projection(pooled))


@pytest.mark.parametrize("form", ["safetensors", "pt-wrapped"])
def test_load_openclip_round_trip_gives_the_same_logits(tmp_path, form):
    model = tiny_model()
    state = to_openclip(model)
    if form == "safetensors":
        path = tmp_path / "open_clip.safetensors"
        save_file(state, str(path))
    else:  # a training checkpoint: {"state_dict": {"module." + name: ...}, ...}
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "name": "tiny", "state_dict": {"module." + k: v for k, v in state.items()}}, path)
    loaded = clip.load_openclip(path, quick_gelu=True, vision_heads=3, text_heads=2)
    ids, mask = text_batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, pixel_values=pixels()).logits_per_image
        got = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels()).logits_per_image
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not loaded.training


def test_openclip_config_recovers_the_architecture():
    config = clip.openclip_config(to_openclip(tiny_model()), quick_gelu=True, vision_heads=3, text_heads=2)
    want = tiny_config()
    for tower in ("text_config", "vision_config"):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act"):
            assert getattr(getattr(config, tower), field) == getattr(getattr(want, tower), field), (tower, field)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (32, 8)
    assert (config.text_config.vocab_size, config.text_config.max_position_embeddings) == (VOCAB, 16)
    assert config.text_config.eos_token_id == VOCAB - 1  # open_clip's EOT: the last vocabulary entry
    assert config.projection_dim == 24
    assert math.isclose(config.logit_scale_init_value, 2.0, rel_tol=1e-6)
    plain = clip.openclip_config(to_openclip(tiny_model()), vision_heads=3, text_heads=2)
    assert plain.text_config.hidden_act == plain.vision_config.hidden_act == "gelu"


def test_mapping_fills_every_weight_and_uses_every_tensor():
    config = clip.openclip_config(to_openclip(tiny_model()), quick_gelu=True, vision_heads=3, text_heads=2)
    mapped = clip.openclip_to_transformers(to_openclip(tiny_model()), config)
    result = CLIPModel(config).load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model = tiny_model()  # q, k, v of one block landed in the right places
    for name in ("q_proj", "k_proj", "v_proj"):
        key = f"text_model.encoder.layers.1.self_attn.{name}.weight"
        assert torch.equal(mapped[key], model.state_dict()[key])


def test_open_clip_errors_are_one_line(tmp_path):
    state = to_openclip(tiny_model())
    resnet = {"visual.layer1.0.conv1.weight": torch.zeros(8, 3, 3, 3),
              "visual.attnpool.positional_embedding": torch.zeros(50, 64)} | {
                  k: v for k, v in state.items() if not k.startswith("visual.")}
    with pytest.raises(LeanfmError) as err:
        clip.openclip_config(resnet)
    assert "ResNet" in one_line(err)
    with pytest.raises(LeanfmError) as err:
        clip.openclip_config(state, vision_heads=5)
    assert "vision_heads=5" in one_line(err)
    extra = state | {"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(48)}
    config = clip.openclip_config(state, vision_heads=3, text_heads=2)
    with pytest.raises(LeanfmError) as err:
        clip.openclip_to_transformers(extra, config)
    assert "ls_1.gamma" in one_line(err)
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(LeanfmError) as err:
        clip.load_openclip(tmp_path / "bad.pt")
    one_line(err)
    with pytest.raises(LeanfmError) as err:
        clip.load_openclip(tmp_path / "missing.safetensors")
    one_line(err)


# --- transformers folders ---------------------------------------------------------------------------------------

def test_save_pretrained_and_load_clip_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "clip")
    loaded, tokenizer = clip.load_clip(tmp_path / "clip")
    assert tokenizer is None and not loaded.training
    ids, mask = text_batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, pixel_values=pixels()).logits_per_image
        got = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels()).logits_per_image
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def tiny_tokenizer() -> CLIPTokenizer:
    """Character-level CLIP BPE (no merges) whose BOS/EOT ids are the tiny model's 97/98."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {f"<filler{i}>": i for i in range(52, BOS)} | {"<|startoftext|>": BOS, "<|endoftext|>": EOT}
    return CLIPTokenizer(vocab=vocab, merges=[])


def test_load_clip_returns_the_tokenizer_and_texts_encode_as_clip_does(tmp_path):
    tiny_model().save_pretrained(tmp_path / "clip")
    tiny_tokenizer().save_pretrained(tmp_path / "clip")
    model, tokenizer = clip.load_clip(tmp_path / "clip")
    encoder = clip.CLIPDualEncoder(model, tokenizer)
    ids, mask = encoder.tokenize(["a photo of a red cat", "a cat", "ox"])
    assert ids.shape[1] == 16  # truncated to the context, EOT kept last
    lengths = mask.sum(1)
    assert lengths.tolist() == [16, 6, 4]
    assert ids[torch.arange(3), lengths - 1].tolist() == [EOT] * 3 and ids[:, 0].tolist() == [BOS] * 3
    with torch.no_grad():
        want = normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        got = encoder.encode_text(encoder.token_embeddings(ids), mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_load_clip_errors_are_one_line(tmp_path):
    with pytest.raises(LeanfmError) as err:
        clip.load_clip(tmp_path)
    assert "config.json" in one_line(err)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(LeanfmError) as err:
        clip.load_clip(tmp_path)
    assert "'bert'" in one_line(err)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(LeanfmError) as err:
        clip.load_clip(tmp_path)
    assert "no weights" in one_line(err)


# --- the dual-encoder interface ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder():
    return clip.CLIPDualEncoder(tiny_model(), None)


def test_encoder_is_frozen_and_reports_its_shapes(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    assert (encoder.embed_dim, encoder.text_width, encoder.image_width) == (24, 32, 48)
    assert (encoder.image_layers, encoder.image_size) == (3, 32)
    assert math.isclose(encoder.logit_scale, math.exp(2.0), rel_tol=1e-6)
    encoder.train()
    assert not encoder.model.training


def test_encode_text_equals_clip_text_features(encoder):
    ids, mask = text_batch()
    with torch.no_grad():
        want = normalize(encoder.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        got = encoder.encode_text(encoder.token_embeddings(ids), mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))


def test_encode_text_passes_gradients_to_prompt_vectors(encoder):
    ids, mask = text_batch()
    embeds = encoder.token_embeddings(ids)
    ctx = torch.randn(2, 32, requires_grad=True)
    embeds = torch.cat([embeds[:, :1], ctx.expand(3, -1, -1), embeds[:, 1:8]], dim=1)
    mask = torch.cat([mask[:, :1], torch.ones(3, 2, dtype=torch.long), mask[:, 1:8]], dim=1)
    encoder.encode_text(embeds, mask).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_encode_image_equals_clip_image_features(encoder):
    images = pixels()
    with torch.no_grad():
        want = normalize(encoder.model.get_image_features(pixel_values=(images - MEAN) / STD).pooler_output, dim=-1)
        got = encoder.encode_image(images)
        empty = encoder.encode_image(images, [torch.zeros(0, 48)] * 3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(empty, got, atol=1e-6, rtol=0)  # zero-length prompts are no prompts
    assert encoder.encode_image(pixels(40)).shape == (4, 24)  # resized to the model's input


def test_first_layer_prompts_are_appended_before_ln_pre(encoder):
    images, prompt = pixels(), torch.randn(2, 48)
    vision = encoder.model.vision_model
    with torch.no_grad():
        tokens = vision.embeddings((images - MEAN) / STD)
        hidden = vision.pre_layrnorm(torch.cat([tokens, prompt.expand(4, -1, -1)], dim=1))
        hidden = vision.encoder(inputs_embeds=hidden).last_hidden_state
        want = normalize(encoder.model.visual_projection(vision.post_layernorm(hidden[:, 0])), dim=-1)
        got = encoder.encode_image(images, [prompt])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_deep_prompts_replace_the_previous_prompt_outputs(encoder):
    images = pixels()
    prompts = [torch.randn(2, 48, requires_grad=True) for _ in range(2)]
    seen: dict[str, torch.Tensor] = {}

    def capture(module, args):
        seen["input"] = args[0].detach().clone()

    hook = encoder.model.vision_model.encoder.layers[1].register_forward_pre_hook(capture)
    try:
        out = encoder.encode_image(images, prompts)
    finally:
        hook.remove()
    assert seen["input"].shape == (4, 1 + 16 + 2, 48)  # CLS + 4x4 patches + the 2 prompts, not 4
    torch.testing.assert_close(seen["input"][:, -2:], prompts[1].detach().expand(4, -1, -1))
    with torch.no_grad():
        assert (out - encoder.encode_image(images)).abs().max() > 1e-3
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)
    assert all(p.grad is None for p in encoder.parameters())


def test_encoder_bad_inputs_are_one_line(encoder):
    with pytest.raises(LeanfmError) as err:
        encoder.encode_image(pixels(), [torch.zeros(1, 48)] * 4)
    assert "3" in one_line(err)
    with pytest.raises(LeanfmError) as err:
        encoder.encode_image(pixels(), [torch.zeros(1, 32)])
    one_line(err)
    with pytest.raises(LeanfmError) as err:
        encoder.tokenize(["a photo"])
    one_line(err)


def test_convert_openclip_writes_a_folder_that_loads_as_an_mmpt_base(tmp_path):
    """open_clip weights + a CLIP tokenizer -> a transformers folder -> ``load_base`` gives the CLIP dual encoder
    whose image-text scores are the original model's."""
    from leanfm.models.dual_encoder import load_base

    model = tiny_model()
    save_file(to_openclip(model), str(tmp_path / "w.safetensors"))
    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    clip.convert_openclip(tmp_path / "w.safetensors", tmp_path / "clip", tmp_path / "tok", quick_gelu=True,
                          vision_heads=3, text_heads=2)
    base = load_base(tmp_path / "clip")
    assert isinstance(base, clip.CLIPDualEncoder)
    ids, mask = base.tokenize(["a red cat"])
    with torch.no_grad():
        want = normalize(model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        torch.testing.assert_close(base.encode_text(base.token_embeddings(ids), mask), want, atol=1e-5, rtol=0)
    with pytest.raises(LeanfmError, match="is not a tokenizer folder"):
        clip.convert_openclip(tmp_path / "w.safetensors", tmp_path / "other", tmp_path, quick_gelu=True)
    assert not (tmp_path / "other").exists()
