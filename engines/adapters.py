"""LoRA adapters per loaded base model: an LRU of loaded adapters, activated per batch.

Adapters are state on the (shared) UNet and text encoders, so one :class:`AdapterCache`
belongs to one set of loaded weights. :meth:`AdapterCache.activate` loads an adapter if it is
not cached (evicting the least recently used one), enables it for one pipeline call and
disables LoRA again in ``finally``, so the next call without an adapter sees the base model::

    with cache.activate(pipe, LoraRef("tiny-lora-a", "1", scale=0.8)):
        images = pipe(prompt=...).images
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import transformers

from controlplane.errors import RegistryError
from controlplane.registry import Registry
from engines.base import LoraRef

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def lora_path(registry: Registry, adapter: str, version: str, *, base: str) -> str:
    """The verified folder of adapter ``adapter``/``version``, which must be a LoRA for ``base``."""
    manifest = registry.manifest(adapter, version)
    if manifest.kind != "lora" or manifest.base_model != base:
        raise RegistryError(f"{adapter} version {version}: kind {manifest.kind} for base "
                            f"{manifest.base_model}, not a LoRA for {base}")
    return str(registry.verified_path(adapter, version))


def adapter_name(lora: LoraRef) -> str:
    # peft adapter names become module attribute keys: no dots allowed
    return f"{lora.id}@{lora.version}".replace(".", "_")


class AdapterCache:
    """At most ``capacity`` adapters loaded on one base pipeline's modules, LRU first."""

    def __init__(self, registry: Registry, *, base_model: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"max_loaded_adapters must be at least 1, got {capacity}")
        self.registry = registry
        self.base_model = base_model
        self.capacity = capacity
        self._loaded: OrderedDict[str, LoraRef] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    @property
    def loaded(self) -> list[str]:
        """Adapter names, least recently used first."""
        return list(self._loaded)

    @contextmanager
    def activate(self, pipe: Any, lora: LoraRef | None) -> Iterator[None]:
        """Run the body with ``lora`` active on ``pipe`` (or no adapter); always clean up.

        The caller holds the weights' lock exclusively when ``lora`` is set
        (see :class:`engines.pipelines.SharedLock`).
        """
        if lora is None:
            yield
            return
        name = self._ensure_loaded(pipe, lora)
        try:
            pipe.enable_lora()
            pipe.set_adapters([name], [lora.scale])
            yield
        finally:
            pipe.disable_lora()

    def _ensure_loaded(self, pipe: Any, lora: LoraRef) -> str:
        name = adapter_name(lora)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        path = lora_path(self.registry, lora.id, lora.version, base=self.base_model)
        while len(self._loaded) >= self.capacity:
            oldest, _ = self._loaded.popitem(last=False)
            pipe.delete_adapters([oldest])
            self.evictions += 1
        transformers.logging.set_verbosity_error()
        pipe.load_lora_weights(path, adapter_name=name, weight_name=LORA_WEIGHT_NAME)
        self._loaded[name] = lora
        self.loads += 1
        return name
