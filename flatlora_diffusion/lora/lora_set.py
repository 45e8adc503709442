"""A LoRA as plain tensors, independent of file format: {component: {canonical name: ModuleLora}}.

Every file format we read or write converts to and from this one representation, and so does a
PEFT-injected model. The effective weight of a module is W + (alpha / rank)·up·down, the
convention of kohya, ComfyUI, A1111 and PEFT alike (PEFT's lora_A = down, lora_B = up).
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from .kohya_names import COMPONENTS, canonical_name, live_name, lora_capable_modules


class LoraFileError(ValueError):
    """A LoRA file or LoRA set that cannot be read, written or applied as asked."""


@dataclass(frozen=True)
class ModuleLora:
    """One module's LoRA: down (rank x in[, kh, kw]), up (out x rank[, 1, 1]) and its true alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def spatial(self) -> bool:
        """A kxk conv (k > 1): the modules kohya's conv_dim/conv_alpha apply to."""
        return self.down.ndim == 4 and tuple(self.down.shape[2:]) != (1, 1)

    def delta(self) -> torch.Tensor:
        """(alpha / rank)·up·down in fp32, shaped like the module's weight."""
        down, up = self.down.float().flatten(1), self.up.float().flatten(1)
        return (self.scale * (up @ down)).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoraSet:
    """LoRA modules per component ("unet", "text_encoder", "text_encoder_2")."""

    modules: dict[str, dict[str, ModuleLora]] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.modules) - set(COMPONENTS)
        if unknown:
            raise LoraFileError(f"unknown components {sorted(unknown)}; expected some of {COMPONENTS}")
        self.modules = {c: m for c, m in self.modules.items() if m}

    def components(self) -> list[str]:
        return [c for c in COMPONENTS if c in self.modules]

    def items(self):
        """(component, canonical name, ModuleLora) in a stable order."""
        for component in self.components():
            for name in sorted(self.modules[component]):
                yield component, name, self.modules[component][name]

    def has(self, spatial: bool) -> bool:
        return any(m.spatial == spatial for _, _, m in self.items())

    def typical(self, component: str | None = None, spatial: bool | None = None) -> tuple[int, float]:
        """The most common (rank, alpha): what kohya's ss_network_dim/alpha and PEFT's r/lora_alpha hold.

        `spatial` restricts it to kxk convs (True) or to Linear and 1x1 modules (False).
        """
        loras = [m for c, _, m in self.items() if component in (None, c) and spatial in (None, m.spatial)]
        rank = collections.Counter(m.rank for m in loras).most_common(1)[0][0]
        alpha = collections.Counter(m.alpha for m in loras).most_common(1)[0][0]
        return rank, alpha

    def first_nonfinite(self) -> str | None:
        """'<component> <module>' of the first module whose down, up or alpha holds NaN/inf, else None."""
        for component, name, module in self.items():
            if not (torch.isfinite(module.down).all() and torch.isfinite(module.up).all()
                    and torch.isfinite(torch.tensor(module.alpha))):
                return f"{component} {name}"
        return None

    def check_finite(self, consequence: str) -> None:
        """Refuse NaN/inf weights: applied to a model they turn every image into NaN."""
        bad = self.first_nonfinite()
        if bad is not None:
            raise LoraFileError(f"non-finite (NaN/inf) LoRA weights, first in {bad}; {consequence}")

    def to(self, dtype: torch.dtype) -> "LoraSet":
        """A copy with contiguous CPU tensors of `dtype` (alpha stays a Python float)."""
        return LoraSet({c: {n: ModuleLora(m.down.detach().to("cpu", dtype).contiguous(),
                                          m.up.detach().to("cpu", dtype).contiguous(), m.alpha)
                            for n, m in mods.items()} for c, mods in self.modules.items()})


def from_peft_model(component: str, model: torch.nn.Module, adapter_name: str = "default") -> dict[str, ModuleLora]:
    """The LoRA of adapter `adapter_name` in a PEFT-injected model, keyed by canonical name."""
    found = {}
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        _check_exportable(path, layer, adapter_name)
        found[canonical_name(component, path)] = ModuleLora(
            layer.lora_A[adapter_name].weight.detach(), layer.lora_B[adapter_name].weight.detach(),
            float(layer.lora_alpha[adapter_name]))
    return found


def _check_exportable(path: str, layer: LoraLayer, adapter: str) -> None:
    if layer.use_dora.get(adapter, False):
        raise LoraFileError(f"{path}: DoRA adapters cannot be exported as plain LoRA")
    if layer.lora_bias.get(adapter, False):
        raise LoraFileError(f"{path}: LoRA bias cannot be exported to kohya/diffusers files")
    expected = layer.lora_alpha[adapter] / layer.r[adapter]
    if not torch.isclose(torch.tensor(layer.scaling[adapter]), torch.tensor(expected), rtol=1e-6):
        # rsLoRA (alpha/sqrt(r)) or a scale set by set_adapters: the files' alpha/rank would lie.
        raise LoraFileError(f"{path}: scaling {layer.scaling[adapter]} is not lora_alpha/r = {expected}")


def check_shapes(component: str, name: str, lora: ModuleLora, layer: torch.nn.Module) -> None:
    """Raise unless `lora` fits `layer` (a Linear or Conv2d): the file is for another model otherwise."""
    if isinstance(layer, torch.nn.Linear):
        down, up = (lora.rank, layer.in_features), (layer.out_features, lora.rank)
    elif isinstance(layer, torch.nn.Conv2d):
        down = (lora.rank, layer.in_channels, *layer.kernel_size)
        up = (layer.out_channels, lora.rank, 1, 1)
    else:
        raise LoraFileError(f"{component} {name}: LoRA on {type(layer).__name__} is not supported")
    if tuple(lora.down.shape) != down or tuple(lora.up.shape) != up:
        raise LoraFileError(f"{component} {name}: LoRA shapes down {tuple(lora.down.shape)}, up "
                            f"{tuple(lora.up.shape)} do not fit the model's layer (expected {down}, {up}); "
                            "is this a LoRA for SDXL?")


def peft_config(loras: dict[str, ModuleLora]) -> LoraConfig:
    """A LoraConfig that reproduces `loras` ({module path: lora}) exactly, per-module rank/alpha included.

    Patterns are escaped: PEFT matches rank/alpha_pattern keys as regexes against module paths.
    """
    rank = collections.Counter(m.rank for m in loras.values()).most_common(1)[0][0]
    alpha = collections.Counter(m.alpha for m in loras.values()).most_common(1)[0][0]
    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=sorted(loras),
        rank_pattern={re.escape(p): m.rank for p, m in loras.items() if m.rank != rank},
        alpha_pattern={re.escape(p): m.alpha for p, m in loras.items() if m.alpha != alpha},
    )


def resolve_modules(lora_set: LoraSet, models: dict[str, torch.nn.Module]) -> dict[str, dict[str, str]]:
    """{component: {canonical name: live path}} after checking every module exists and fits.

    Raises LoraFileError naming the first LoRA module the models lack or whose shapes differ.
    """
    resolved = {}
    for component in lora_set.components():
        model = models.get(component)
        if model is None:
            raise LoraFileError(f"the LoRA has {component} modules but no {component} was given")
        layers = dict(lora_capable_modules(model))
        resolved[component] = {}
        for name, lora in sorted(lora_set.modules[component].items()):
            path = live_name(component, name, model)
            if path not in layers:
                raise LoraFileError(f"{component} has no module {name!r}; is this a LoRA for SDXL?")
            check_shapes(component, name, lora, layers[path])
            resolved[component][name] = path
    return resolved
