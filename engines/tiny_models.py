"""Tiny random-weight pipelines built locally, for tests and the offline ``tiny`` policy.

No model hub is involved: the tokenizer is a byte-level BPE trained on a few prompts and the
networks use small configs in the spirit of diffusers' own fast tests. The images they make
are noise; what matters is that every code path (batching, LoRA, upscaling, canaries) runs
with real pipelines::

    manifests = make_tiny(Registry(Path("var/registry")))
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionUpscalePipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from controlplane.registry import Manifest, ModelKind, Registry
from engines.adapters import LORA_WEIGHT_NAME
from engines.pipelines import Pipeline, quiet

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_CORPUS = [
    "a photo of a cat sitting on a red sofa", "a watercolor painting of a lighthouse at dusk",
    "a poster with the text sale in bold letters", "portrait of an astronaut, studio light",
    "a bowl of ramen, top view, high detail", "an isometric city block at night, neon signs",
    "a dog running on the beach", "logo for a coffee shop named laneway",
    "a mountain lake with pine trees and fog", "a cartoon robot waving hello",
]


def train_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is every byte (with and without ``</w>``) + merges."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>", show_progress=False))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    pairs = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    for left, right in pairs:
        if left + right not in tokens:
            tokens.append(left + right)
    tokens += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _text_config(tokenizer: CLIPTokenizer, *, act: str, projection_dim: int) -> CLIPTextConfig:
    bos, eos = tokenizer.get_vocab()[BOS], tokenizer.get_vocab()[EOS]
    return CLIPTextConfig(
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, vocab_size=len(tokenizer),
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        layer_norm_eps=1e-5, hidden_act=act, projection_dim=projection_dim)


def _vae(blocks: list[int], scaling_factor: float = 0.18215) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=blocks, scaling_factor=scaling_factor,
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks), norm_num_groups=min(blocks))


def _sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + pooled text (32)
        cross_attention_dim=64, norm_num_groups=1)  # both text encoders: 32 + 32


def _sdxl(tokenizer: CLIPTokenizer, seed: int, *, turbo: bool) -> Pipeline:
    torch.manual_seed(seed)
    config = _text_config(tokenizer, act="gelu", projection_dim=32)
    scheduler_kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                            steps_offset=1)
    scheduler: EulerAncestralDiscreteScheduler | EulerDiscreteScheduler
    if turbo:
        scheduler = EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **scheduler_kwargs)
    else:
        scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **scheduler_kwargs)
    return StableDiffusionXLPipeline(
        unet=_sdxl_unet(), vae=_vae([32, 64]), scheduler=scheduler,
        text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        image_encoder=None, feature_extractor=None)


def _latent_upscaler(tokenizer: CLIPTokenizer, seed: int) -> Pipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None,
        block_out_channels=[32, 32, 64, 64], time_cond_proj_dim=160,  # 128 noise + 32 pooled
        conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D",
                          "KCrossAttnDownBlock2D"),
        in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier",
        timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D",
                        "KUpBlock2D"))
    return StableDiffusionLatentUpscalePipeline(
        vae=_vae([32, 64]), unet=unet,
        text_encoder=CLIPTextModel(_text_config(tokenizer, act="quick_gelu", projection_dim=32)),
        tokenizer=tokenizer, scheduler=EulerDiscreteScheduler(prediction_type="sample"))


def _x4_upscaler(tokenizer: CLIPTokenizer, seed: int) -> Pipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=32,
        in_channels=7, out_channels=4,  # 4 latent channels + the 3-channel low-res image
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
        only_cross_attention=(True, True, False), num_class_embeds=100)
    return StableDiffusionUpscalePipeline(
        vae=_vae([32, 32, 64], scaling_factor=0.08333), unet=unet,
        text_encoder=CLIPTextModel(_text_config(tokenizer, act="gelu", projection_dim=32)),
        tokenizer=tokenizer, low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"), max_noise_level=350)


def _save_lora(folder: Path, seed: int) -> None:
    """A rank-4 LoRA on the tiny SDXL UNet's attention projections, with random A and B."""
    torch.manual_seed(seed)
    unet: Any = _sdxl_unet()  # add_adapter comes from a mixin mypy does not see
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, weight_name=LORA_WEIGHT_NAME, safe_serialization=True)


_Build = Callable[[CLIPTokenizer, Path], None]

#: (name, version, kind, base_model, builder) in build order; seeds are fixed per entry.
_TINY: list[tuple[str, str, ModelKind, str | None, _Build]] = [
    ("tiny-sdxl", "1", "sdxl", None,
     lambda tok, out: _sdxl(tok, 1, turbo=False).save_pretrained(out)),
    ("tiny-sdxl", "2", "sdxl", None,
     lambda tok, out: _sdxl(tok, 2, turbo=False).save_pretrained(out)),
    ("tiny-sdxl-turbo", "1", "sdxl", None,
     lambda tok, out: _sdxl(tok, 3, turbo=True).save_pretrained(out)),
    ("tiny-latent-upscaler", "1", "sd-latent-upscale", None,
     lambda tok, out: _latent_upscaler(tok, 4).save_pretrained(out)),
    ("tiny-x4-upscaler", "1", "sd-x4-upscale", None,
     lambda tok, out: _x4_upscaler(tok, 5).save_pretrained(out)),
    ("tiny-lora-a", "1", "lora", "tiny-sdxl", lambda tok, out: _save_lora(out, 6)),
    ("tiny-lora-b", "1", "lora", "tiny-sdxl", lambda tok, out: _save_lora(out, 7)),
]


def make_tiny(registry: Registry) -> list[Manifest]:
    """Build and register every tiny model missing from ``registry``; return all manifests."""
    manifests = []
    quiet()
    with tempfile.TemporaryDirectory(prefix="laneway-tiny-") as tmp:
        work = Path(tmp)
        tokenizer: CLIPTokenizer | None = None
        for name, version, kind, base_model, build in _TINY:
            if version not in registry.versions(name):
                tokenizer = tokenizer or train_tokenizer(work / "tokenizer")
                out = work / name / version
                build(tokenizer, out)
                registry.register(name, version, out, kind=kind, base_model=base_model,
                                  notes="tiny random weights, made by engines.tiny_models")
            manifests.append(registry.manifest(name, version))
    return manifests
