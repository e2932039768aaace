"""SDXL-architecture pipelines with random weights, full-size or tiny, for bench/gpu_pipelines.py.

A network's speed and memory do not depend on its weight values, so the full-size pipelines
are built from the published architectures with random weights (no download):

- SDXL base 1.0: UNet (2.6 B parameters), VAE, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text
  encoders, Euler scheduler;
- the x2 latent upscaler (``stabilityai/sd-x2-latent-upscaler``): K-blocks UNet, the SD VAE
  and a CLIP ViT-L/14 text encoder.

The tiny architecture keeps every block type and option and shrinks the widths (as
``engines.tiny_models`` does) so that the same code runs in seconds on a CPU. The tokenizer
is a byte-level BPE trained locally (``engines.tiny_models.train_tokenizer``): prompts split
into other tokens than with CLIP's own vocabulary, but every prompt is padded to the 77
tokens the text encoders see, so their cost is the same::

    arch = FULL
    sdxl = build_sdxl(arch, tokenizer, device="cuda", dtype=torch.float16, seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionLatentUpscalePipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engines.adapters import LORA_WEIGHT_NAME
from engines.pipelines import Pipeline
from engines.tiny_models import BOS, EOS

#: the attention projections a LoRA adapts (the usual SDXL LoRA targets)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TextEncoderArch:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    hidden_act: str
    projection_dim: int
    #: None: the local tokenizer's vocabulary (tiny); full size keeps CLIP's 49,408 rows
    vocab_size: int | None


@dataclass(frozen=True)
class Arch:
    """Every size the bench builds: the models, the image size and the LoRA rank."""

    name: str
    image_px: int
    sdxl_unet: dict[str, Any]
    sdxl_vae_blocks: tuple[int, ...]
    text_encoder: TextEncoderArch
    text_encoder_2: TextEncoderArch
    upscaler_unet: dict[str, Any]
    upscaler_vae_blocks: tuple[int, ...]
    upscaler_text_encoder: TextEncoderArch
    lora_rank: int


CLIP_VIT_L = TextEncoderArch(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                             num_hidden_layers=12, hidden_act="quick_gelu", projection_dim=768,
                             vocab_size=49408)
OPENCLIP_BIGG = TextEncoderArch(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                num_hidden_layers=32, hidden_act="gelu", projection_dim=1280,
                                vocab_size=49408)

_K_BLOCKS = dict(  # the latent upscaler's block layout, the same at both sizes
    down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D",
                      "KCrossAttnDownBlock2D"),
    up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D",
                    "KUpBlock2D"),
    only_cross_attention=(True, True, True, False),  # self-attention at the lowest level only
    in_channels=8, out_channels=5,  # 4 latent + 4 low-res latent in; 4 + a variance channel out
    mid_block_type=None, act_fn="gelu", norm_num_groups=None, resnet_time_scale_shift="scale_shift",
    time_embedding_type="fourier", timestep_post_act="gelu", conv_in_kernel=1, conv_out_kernel=1)

#: The published SDXL base 1.0 and sd-x2-latent-upscaler architectures.
FULL = Arch(
    name="full (SDXL base 1.0, sd-x2-latent-upscaler)",
    image_px=1024,
    sdxl_unet=dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        use_linear_projection=True, norm_num_groups=32,
        cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG)
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816),  # 6 time ids x 256 + pooled bigG 1280
    sdxl_vae_blocks=(128, 256, 512, 512),
    text_encoder=CLIP_VIT_L,
    text_encoder_2=OPENCLIP_BIGG,
    # k-diffusion's laion_text_cond_latent_upscaler_2 as diffusers converted it
    upscaler_unet=dict(
        _K_BLOCKS, block_out_channels=(384, 384, 768, 768), layers_per_block=4,
        attention_head_dim=64, cross_attention_dim=768,
        time_cond_proj_dim=896),  # 128 noise-level embedding + pooled CLIP ViT-L 768
    upscaler_vae_blocks=(128, 256, 512, 512),
    upscaler_text_encoder=CLIP_VIT_L,
    lora_rank=32,
)

_TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=2, projection_dim=32, vocab_size=None)

#: The same block types at widths of 32-64 (a few hundred thousand parameters), 64 px images.
TINY = Arch(
    name="tiny (smoke)",
    image_px=64,
    sdxl_unet=dict(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
        use_linear_projection=True, norm_num_groups=1, cross_attention_dim=64,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32),
    sdxl_vae_blocks=(32, 64),
    text_encoder=TextEncoderArch(hidden_act="quick_gelu", **_TINY_TEXT),  # type: ignore[arg-type]
    text_encoder_2=TextEncoderArch(hidden_act="gelu", **_TINY_TEXT),  # type: ignore[arg-type]
    upscaler_unet=dict(
        _K_BLOCKS, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        attention_head_dim=8, cross_attention_dim=32, time_cond_proj_dim=128 + 32),
    upscaler_vae_blocks=(32, 64),
    upscaler_text_encoder=TextEncoderArch(hidden_act="quick_gelu", **_TINY_TEXT),  # type: ignore[arg-type]
    lora_rank=4,
)


def _text_config(arch: TextEncoderArch, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
        vocab_size=arch.vocab_size or len(tokenizer), max_position_embeddings=77,
        hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads, num_hidden_layers=arch.num_hidden_layers,
        hidden_act=arch.hidden_act, projection_dim=arch.projection_dim, layer_norm_eps=1e-5)


def _vae(blocks: tuple[int, ...], scaling_factor: float) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=blocks, scaling_factor=scaling_factor, force_upcast=True,
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * len(blocks),
        up_block_types=["UpDecoderBlock2D"] * len(blocks), norm_num_groups=min(32, *blocks))


def build_sdxl(arch: Arch, tokenizer: CLIPTokenizer, *, device: str, dtype: torch.dtype,
               seed: int) -> Pipeline:
    """An SDXL pipeline of ``arch`` with random weights, made on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    # initialised on the device (random init of 3.5 B weights on a CPU takes minutes); the
    # scheduler stays outside: it keeps its tables on the CPU
    with torch.device(device):
        unet = UNet2DConditionModel(**arch.sdxl_unet)
        vae = _vae(arch.sdxl_vae_blocks, scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_text_config(arch.text_encoder, tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(arch.text_encoder_2, tokenizer))
    pipe: Pipeline = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, timestep_spacing="leading"),
        image_encoder=None, feature_extractor=None)
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_upscaler(arch: Arch, tokenizer: CLIPTokenizer, *, device: str, dtype: torch.dtype,
                   seed: int) -> Pipeline:
    """A x2 latent upscaler of ``arch`` with random weights, made on ``device`` in ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**arch.upscaler_unet)
        vae = _vae(arch.upscaler_vae_blocks, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_text_config(arch.upscaler_text_encoder, tokenizer))
    pipe: Pipeline = StableDiffusionLatentUpscalePipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(prediction_type="sample"))
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def size_gb(module: torch.nn.Module) -> float:
    """Bytes of ``module``'s parameters and buffers, in GB (10^9)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 1e9


def parameters_m(module: torch.nn.Module) -> float:
    """Parameter count in millions."""
    return sum(p.numel() for p in module.parameters()) / 1e6


def save_random_lora(unet: torch.nn.Module, folder: Path, *, rank: int, seed: int) -> Path:
    """Write a rank-``rank`` LoRA with random weights for ``unet``'s attention projections.

    The tensors are made from the module shapes, so the UNet itself gains no adapter layers.
    Returns ``folder``, which ``load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME)`` reads.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
            layers[f"{name}.lora_A.weight"] = (down / module.in_features ** 0.5).half()
            layers[f"{name}.lora_B.weight"] = (up * 0.01).half()
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(layers),
        weight_name=LORA_WEIGHT_NAME, safe_serialization=True)
    return folder
