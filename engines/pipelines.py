"""Loading diffusers pipelines from the registry, once per process, and handing out per-slot views.

Weights are loaded once per (model, version, dtype, fused adapter) and shared: every engine
(one per worker slot) gets its own pipeline object made with ``from_pipe``, and that view owns
every part a pipeline call changes, because slots run their calls at the same time:

- its schedulers: a scheduler holds the timesteps and step index of the call in progress;
- its tokenizers: a fast tokenizer keeps its padding and truncation settings on the Rust
  tokenizer and sets them before each encode. SDXL encodes a prompt padded to 77 tokens and
  then again padded to "longest", so a shared tokenizer made another slot's embeddings as
  long as its prompt ("Expected size 77 but got size 7", issue 12). A copy is cheap;
- its VAE, when the VAE's config asks for ``force_upcast`` and the weights are float16 or
  bfloat16: img2img and inpaint calls then cast the VAE to float32 around encoding and back
  after it (float16 calls also around decoding), and a call on a shared VAE meets it in the
  other dtype. The copy costs the VAE's memory per view (about 170 MB for SDXL's in
  float16); a VAE that does not ask for upcasting, or float32 weights, stay shared.

The UNet and text encoders are only read by a call and stay shared.

LoRA adapters are state on the shared modules, so engines sharing weights share one
:class:`~engines.adapters.AdapterCache` and one :class:`~engines.shared_lock.SharedLock`:
runs without an adapter take it shared and run side by side; runs with an adapter take it
exclusively, in turns, so neither kind starves the other.
"""

from __future__ import annotations

import abc
import copy
import logging
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

import diffusers
import torch
import transformers
from PIL import Image

from controlplane.errors import RegistryError, StageFailed, ValidationFailed
from controlplane.policy import EngineSpec
from controlplane.registry import ModelKind, Registry
from engines.adapters import LORA_WEIGHT_NAME, AdapterCache, lora_path
from engines.base import Engine, StageItem
from engines.shared_lock import SharedLock

#: A diffusers pipeline. LoRA methods and components come from per-family mixins that
#: ``DiffusionPipeline`` does not declare, so pipelines are typed loosely.
Pipeline = Any

log = logging.getLogger(__name__)

#: engines already warned that their float16 runs as float32 on the CPU
_WARNED_FLOAT16_ON_CPU: set[str] = set()
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_device_dtype(engine: str, device: str, dtype: str) -> torch.dtype:
    """The torch dtype for ``dtype`` on ``device``, or an error naming the engine.

    float16 on CPU loads as float32, with one warning per engine (many CPU kernels lack
    float16, and what exists is slower than float32): a GPU policy run on a CPU machine
    renders instead of failing every stage. bfloat16 runs on CPU, which torch supports,
    and on CUDA devices that have it.
    """
    if dtype not in TORCH_DTYPES:
        raise ValidationFailed.of(f"engines.{engine}.dtype", "unknown dtype", dtype)
    kind = torch.device(device).type
    if kind == "cpu" and dtype == "float16":
        if engine not in _WARNED_FLOAT16_ON_CPU:
            _WARNED_FLOAT16_ON_CPU.add(engine)
            log.warning("engine %s: dtype float16 does not run on cpu; loading it as float32",
                        engine)
        return torch.float32
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValidationFailed.of(f"engines.{engine}", "CUDA is not available", device)
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValidationFailed.of(f"engines.{engine}.dtype",
                                      f"bfloat16 is not supported on {device}", dtype)
    elif kind != "cpu":
        raise ValidationFailed.of(f"engines.{engine}", "unsupported device", device)
    return TORCH_DTYPES[dtype]


WeightsKey = tuple[str, str, str, str | None, str]
"""``(model, version, dtype, fused adapter, device)``."""


@dataclass
class Loaded:
    """One set of loaded weights and what the engines using it share."""

    key: WeightsKey
    pipe: Pipeline
    lock: SharedLock = field(default_factory=SharedLock)
    users: int = 0
    #: the adapter cache of these weights, made by the first engine that uses them
    adapters: AdapterCache | None = None


_loaded: dict[WeightsKey, Loaded] = {}
#: loads in progress: the first caller of a key loads, later callers wait for its result
_loading: dict[WeightsKey, Future[Loaded]] = {}
#: guards ``_loaded``, ``_loading`` and users counts; never held while loading
_loaded_guard = threading.Lock()
#: held by the one load in progress (never by a lookup, a release or a serving slot)
_one_load_at_a_time = threading.Lock()


def quiet() -> None:
    """Silence load reports and progress bars; engines log their own progress."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def acquire(registry: Registry, model: str, version: str, *, kind: ModelKind,
            pipeline_class: Any, dtype: torch.dtype, device: str,
            fuse_lora: str | None = None) -> Loaded:
    """The process-wide weights for ``model``/``version``, loading them on first use.

    ``fuse_lora`` names a registry LoRA (its latest version) fused into the weights at load
    time; fused weights are a different entry from the plain ones.

    A load holds no lock that serving slots need: callers of weights already loaded, and
    engines closing, go on. Loads themselves run one at a time (``_one_load_at_a_time``):
    diffusers builds modules on the meta device by patching torch globally
    (accelerate's ``init_empty_weights``), so two loads at once can leave meta tensors
    ("Cannot copy out of meta tensor"). Callers of a key being loaded wait for that load
    and share its weights, or get its error; a failed load leaves nothing behind, so the
    next caller loads again.
    """
    manifest = registry.manifest(model, version)
    if manifest.kind != kind:
        raise RegistryError(f"{model} version {version}: kind {manifest.kind}, "
                            f"this engine needs kind {kind}")
    fused = None
    if fuse_lora is not None:
        fused_version = registry.latest_version(fuse_lora)
        if fused_version is None:
            raise RegistryError(f"fuse_lora {fuse_lora}: no version in the registry")
        fused = f"{fuse_lora}/{fused_version}"
    key: WeightsKey = (model, version, str(dtype), fused, device)
    while True:
        with _loaded_guard:
            entry = _loaded.get(key)
            if entry is not None:
                entry.users += 1
                return entry
            loading = _loading.get(key)
            if loading is None:
                loading = _loading[key] = Future()
                break
        # another caller is loading this key; its weights may be freed again before this
        # thread takes them (their users all closed), so look them up once more
        loading.result()
    try:
        pipe = _load(registry, key, pipeline_class=pipeline_class, dtype=dtype)
    except BaseException as exc:
        with _loaded_guard:
            del _loading[key]
        loading.set_exception(exc)
        raise
    with _loaded_guard:
        del _loading[key]
        entry = _loaded[key] = Loaded(key=key, pipe=pipe, users=1)
    loading.set_result(entry)
    return entry


def _load(registry: Registry, key: WeightsKey, *, pipeline_class: Any,
          dtype: torch.dtype) -> Pipeline:
    model, version, _, fused, device = key
    quiet()
    path = registry.verified_path(model, version)
    with _one_load_at_a_time:
        pipe = pipeline_class.from_pretrained(path, dtype=dtype, use_safetensors=True)
        pipe.to(device)
        if fused is not None:
            adapter, adapter_version = fused.split("/", 1)
            _fuse(registry, pipe, adapter, adapter_version, base=model)
    return pipe


def release(entry: Loaded) -> None:
    """Drop one user; the weights are freed when the last engine using them closes."""
    with _loaded_guard:
        entry.users -= 1
        if entry.users <= 0 and _loaded.get(entry.key) is entry:
            del _loaded[entry.key]


def shared_adapters(entry: Loaded, registry: Registry, *, base_model: str,
                    capacity: int) -> AdapterCache:
    """The adapter cache of ``entry``, made by its first engine; the largest capacity holds.

    Engines of one key are built at the same time once its load finishes, so this takes
    the guard: two caches on one set of weights would each think the modules theirs.
    """
    with _loaded_guard:
        if entry.adapters is None:
            entry.adapters = AdapterCache(registry, base_model=base_model, capacity=capacity)
        entry.adapters.capacity = max(entry.adapters.capacity, capacity)
        return entry.adapters


def changed_by_calls(name: str, component: Any) -> bool:
    """Whether a pipeline call changes ``component`` (see the module docstring)."""
    if name.endswith("scheduler") or isinstance(component, transformers.PreTrainedTokenizerBase):
        return True
    return (name == "vae" and getattr(component.config, "force_upcast", False)
            and component.dtype != torch.float32)


def view(entry: Loaded, pipeline_class: Any) -> Pipeline:
    """A new pipeline object over ``entry``'s weights with private copies of what calls change."""
    own = {name: copy.deepcopy(component)
           for name, component in entry.pipe.components.items()
           if component is not None and changed_by_calls(name, component)}
    pipe = pipeline_class.from_pipe(entry.pipe, **own)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fuse(registry: Registry, pipe: Pipeline, adapter: str, version: str, *,
          base: str) -> None:
    name = f"fused-{adapter}"
    pipe.load_lora_weights(lora_path(registry, adapter, version, base=base),
                           adapter_name=name, weight_name=LORA_WEIGHT_NAME)
    pipe.fuse_lora(adapter_names=[name])
    pipe.unload_lora_weights()


def groups(items: list[StageItem], key: Callable[[StageItem], Hashable]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key``, groups in order of first appearance."""
    by_key: dict[Hashable, list[int]] = {}
    for i, item in enumerate(items):
        by_key.setdefault(key(item), []).append(i)
    return list(by_key.values())


def generators(seed: int, count: int) -> list[torch.Generator]:
    """CPU generators seeded ``seed, seed+1, …``: a seed gives the same noise on any device."""
    return [torch.Generator("cpu").manual_seed(seed + k) for k in range(count)]


class DiffusersEngine(Engine):
    """An engine over a registry model: shared weights, its own pipeline view (see :func:`view`).

    Subclasses name the model ``family``, the ``load_class`` whose weights are cached per
    process, the ``view_class`` they call, how items group into one call, and the call.
    """

    family: ClassVar[ModelKind]
    load_class: ClassVar[Any]
    #: a pipeline class or an ``AutoPipelineFor…`` class, used through ``from_pipe``
    view_class: ClassVar[Any]
    default_steps: ClassVar[int]
    default_guidance: ClassVar[float]

    def __init__(self, spec: EngineSpec, *, registry: Registry, model_version: str,
                 device: str) -> None:
        if spec.model is None:
            raise ValidationFailed.of("engines.model", f"{spec.kind.value} needs a model", None)
        self.spec = spec
        self.model = spec.model
        self.model_version = model_version
        self.device = device
        self.label = f"{spec.kind.value}:{spec.model}"
        dtype = check_device_dtype(self.label, device, spec.dtype)
        self._entry: Loaded | None = acquire(
            registry, spec.model, model_version, kind=self.family, pipeline_class=self.load_class,
            dtype=dtype, device=device, fuse_lora=spec.fuse_lora)
        self.adapters: AdapterCache = shared_adapters(
            self._entry, registry, base_model=spec.model, capacity=spec.max_loaded_adapters)
        self.pipe: Pipeline = view(self._entry, self.view_class)
        if spec.compile:
            # wraps this engine's view only; the shared module stays uncompiled
            self.pipe.unet = torch.compile(self.pipe.unet)

    def steps(self, item: StageItem) -> int:
        return item.steps or self.spec.steps or self.default_steps

    def guidance(self, item: StageItem) -> float:
        if item.guidance is not None:
            return item.guidance
        return self.spec.guidance if self.spec.guidance is not None else self.default_guidance

    def group_key(self, item: StageItem) -> Hashable:
        """Items with equal keys go into one pipeline call."""
        return (item.lora, self.steps(item), self.guidance(item))

    @abc.abstractmethod
    def call(self, items: list[StageItem]) -> list[list[Image.Image]]:
        """One pipeline call for items that share a group key."""

    def run(self, items: list[StageItem]) -> list[list[Image.Image]]:
        if self._entry is None:
            raise StageFailed(f"{self.label}: engine is closed")
        out: list[list[Image.Image]] = [[] for _ in items]
        for group in groups(items, self.group_key):
            lora = items[group[0]].lora
            with (self._entry.lock.hold(exclusive=lora is not None),
                  self.adapters.activate(self.pipe, lora)):
                results = self.call([items[i] for i in group])
            if len(results) != len(group):
                raise StageFailed(f"{self.label}: {len(results)} results for {len(group)} items")
            for i, images in zip(group, results, strict=True):
                out[i] = images
        return out

    def close(self) -> None:
        if self._entry is not None:
            release(self._entry)
            self._entry = None


def step_end_callback(items: list[StageItem]) -> Callable[..., dict[str, Any]]:
    """A ``callback_on_step_end`` reporting ``(step, steps)`` to every item of a call."""

    def on_step_end(pipe: Pipeline, step: int, timestep: Any,
                    kwargs: dict[str, Any]) -> dict[str, Any]:
        for item in items:
            item.on_step(step + 1, pipe.num_timesteps)
        return kwargs

    return on_step_end


def split(images: list[Image.Image], counts: list[int]) -> list[list[Image.Image]]:
    """Cut a flat list of a call's images into one list per item."""
    if len(images) != sum(counts):
        raise StageFailed(f"pipeline returned {len(images)} images, expected {sum(counts)}")
    out, start = [], 0
    for count in counts:
        out.append(images[start:start + count])
        start += count
    return out


def call_sdxl(engine: DiffusersEngine, items: list[StageItem],
              **inputs: Any) -> list[list[Image.Image]]:
    """One SDXL-family pipeline call for ``items`` (n images each), plus per-kind ``inputs``.

    Callers group items so that negative prompts are all present or all absent: SDXL encodes
    a missing negative prompt as zeros and ``""`` as text.
    """
    first = items[0]
    negative = (None if first.negative_prompt is None
                else [it.negative_prompt or "" for it in items for _ in range(it.n)])
    result = engine.pipe(
        prompt=[it.prompt for it in items for _ in range(it.n)],
        negative_prompt=negative,
        num_inference_steps=engine.steps(first), guidance_scale=engine.guidance(first),
        generator=[g for it in items for g in generators(it.seed, it.n)],
        callback_on_step_end=step_end_callback(items),
        **inputs,
    )
    return split(result.images, [it.n for it in items])
