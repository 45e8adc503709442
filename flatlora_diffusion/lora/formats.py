"""The two SDXL LoRA file formats, as conversions between tensor dicts and a LoraSet.

diffusers/PEFT (`pytorch_lora_weights.safetensors`): `unet.<path>.lora_A.weight` / `lora_B.weight`,
`text_encoder.text_model.<path>...`; alpha travels in the safetensors metadata key
`lora_adapter_metadata` (JSON, `<component>.r`, `.lora_alpha`, `.target_modules`, `.rank_pattern`,
`.alpha_pattern`), the subset of a LoraConfig that old and new diffusers/peft both accept.

kohya (`pytorch_lora_weights_kohya.safetensors`): `lora_unet_<SGM path>.lora_down.weight`,
`.lora_up.weight` and `.alpha` (a scalar holding the true alpha), `lora_te1_` / `lora_te2_`
for the text encoders. A missing `.alpha` means alpha = rank, as every reader assumes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from flatlora_diffusion.atomic import atomic_file

from .kohya_names import (
    COMPONENTS,
    KOHYA_PREFIXES,
    LoraNameError,
    UnetLayout,
    canonical_name,
    kohya_lookup,
    kohya_module_name,
)
from .lora_set import LoraFileError, LoraSet, ModuleLora, resolve_modules

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

_DIFFUSERS_KEY = re.compile(r"(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora_A\.weight|lora_B\.weight|"
                            r"lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|"
                            r"lora_linear_layer\.up\.weight|alpha)")
_KOHYA_KEY = re.compile(r"(lora_unet_|lora_te1_|lora_te2_)(\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)")
_ROLE = {"lora_A.weight": "down", "lora.down.weight": "down", "lora_linear_layer.down.weight": "down",
         "lora_down.weight": "down", "lora_B.weight": "up", "lora.up.weight": "up",
         "lora_linear_layer.up.weight": "up", "lora_up.weight": "up", "alpha": "alpha"}
LYCORIS_MARKERS = {"hada_": "LoHa", "lokr_": "LoKr", "oft_": "OFT", "glora_": "GLoRA"}
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default, what diffusers uses when metadata lacks lora_alpha


# ---------------------------------------------------------------- files

# a pickle (protocol 2-5), a torch.save zip; only looked for once safetensors has refused the file,
# since a valid header length may start with the same bytes
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _unreadable(path: Path, error: Exception) -> LoraFileError:
    """The error for a file safetensors cannot read; a renamed pickle is named as such (never unpickled)."""
    with path.open("rb") as f:
        start = f.read(4)
    if start.startswith(PICKLE_MAGIC):
        return LoraFileError(f"{path}: this is a pickle (a .ckpt/.pt/.bin file renamed?), not safetensors; "
                             "pickles can run code and are never loaded")
    return LoraFileError(f"{path}: not a readable safetensors file ({error})")


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; a missing or malformed file raises LoraFileError."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    """The metadata strings of a LoRA .safetensors file (without loading its tensors)."""
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write atomically: readers see the old file or the complete new one, never a partial one."""
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def detect_format(keys) -> str:
    """"diffusers" or "kohya" from the tensor names; anything else raises LoraFileError."""
    keys = list(keys)
    if not keys:
        raise LoraFileError("the file holds no tensors")
    if any(k.startswith("lora_te_") for k in keys):
        raise LoraFileError("this is an SD 1.x/2.x LoRA (lora_te_ keys), not an SDXL LoRA")
    for marker, kind in LYCORIS_MARKERS.items():
        if any(f".{marker}" in k for k in keys):
            raise LoraFileError(f"this is a LyCORIS {kind} file ({marker}* keys); only plain LoRA is supported")
    kinds = {"kohya" if k.startswith(tuple(KOHYA_PREFIXES.values())) else
             "diffusers" if k.split(".", 1)[0] in COMPONENTS else None for k in keys}
    if kinds == {"kohya"} or kinds == {"diffusers"}:
        return kinds.pop()
    if None in kinds:
        odd = next(k for k in keys if not k.startswith(tuple(KOHYA_PREFIXES.values()))
                   and k.split(".", 1)[0] not in COMPONENTS)
        raise LoraFileError(f"not an SDXL LoRA in kohya or diffusers format (unexpected key {odd!r})")
    raise LoraFileError("the file mixes kohya and diffusers keys")


def load_lora_set(path: str | Path, models: dict[str, torch.nn.Module]) -> tuple[LoraSet, str]:
    """(LoraSet, format) of the LoRA file `path`, checked against `models` ({component: model}).

    `models` may be live models or meta-device ones (sdxl_config.meta_sdxl_models): they supply
    the module names kohya keys resolve to and the shapes every module must fit.
    """
    tensors, metadata = read_safetensors(path)
    try:
        kind = detect_format(tensors)
        if kind == "diffusers":
            lora_set = from_diffusers(tensors, metadata)
        else:
            layout = UnetLayout.from_config(models["unet"].config)
            lookups = {c: kohya_lookup(c, m, layout) for c, m in models.items() if m is not None}
            lora_set = from_kohya(tensors, lookups)
        if not lora_set.modules:
            raise LoraFileError("the file holds no LoRA modules")
        resolve_modules(lora_set, models)
        lora_set.check_finite("the file is refused")
    except (LoraFileError, LoraNameError) as error:
        raise LoraFileError(f"{path}: {error}") from None
    return lora_set, kind


# ---------------------------------------------------------------- diffusers format

def to_diffusers(lora_set: LoraSet) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the diffusers/PEFT file for `lora_set`."""
    tensors, adapter = {}, {}
    for component, name, lora in lora_set.items():
        tensors[f"{component}.{name}.lora_A.weight"] = lora.down
        tensors[f"{component}.{name}.lora_B.weight"] = lora.up
    for component in lora_set.components():
        for key, value in _adapter_config(component, lora_set).items():
            adapter[f"{component}.{key}"] = value
    return tensors, {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(adapter, indent=2, sort_keys=True)}


def _adapter_config(component: str, lora_set: LoraSet) -> dict:
    # Text-encoder paths without `text_model.`: PEFT matches target names as suffixes, so the
    # short path finds the module in CLIPTextModel with (transformers < 5.6) or without it.
    rank, alpha = lora_set.typical(component)
    loras = {name.removeprefix("text_model."): m for name, m in lora_set.modules[component].items()}
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(loras),
            "rank_pattern": {re.escape(p): m.rank for p, m in loras.items() if m.rank != rank},
            "alpha_pattern": {re.escape(p): m.alpha for p, m in loras.items() if m.alpha != alpha}}


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraSet:
    """The LoraSet of a diffusers-format file; alpha from its adapter metadata, else alpha = rank."""
    parts: dict[tuple[str, str], dict] = {}
    for key, tensor in tensors.items():
        match = _DIFFUSERS_KEY.fullmatch(key)
        if not match:
            raise LoraFileError(f"unsupported key {key!r} in a diffusers-format LoRA")
        component, path, suffix = match.groups()
        parts.setdefault((component, canonical_name(component, path)), {})[_ROLE[suffix]] = tensor
    configs = _read_adapter_metadata(metadata)
    modules: dict[str, dict[str, ModuleLora]] = {}
    for (component, name), part in parts.items():
        alpha = part.get("alpha")
        if alpha is None:
            alpha = _alpha_from_config(configs.get(component), name, part)
        modules.setdefault(component, {})[name] = _module(f"{component}.{name}", part, alpha)
    return LoraSet(modules)


def _read_adapter_metadata(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraFileError(f"metadata {ADAPTER_METADATA_KEY} is not valid JSON ({error})") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.rpartition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def _alpha_from_config(config: dict | None, name: str, part: dict) -> float:
    if "down" not in part:
        raise LoraFileError(f"{name}: lora_A/down weight missing")
    if config is None:
        return float(part["down"].shape[0])  # no adapter config: the diffusers convention alpha = rank
    if config.get("use_rslora"):
        raise LoraFileError("rsLoRA adapter metadata (use_rslora) is not supported")
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):  # how PEFT resolves alpha_pattern keys
            return float(alpha)
    return float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA))


def _module(where: str, part: dict, alpha) -> ModuleLora:
    if "down" not in part or "up" not in part:
        raise LoraFileError(f"{where}: needs both a down (lora_A) and an up (lora_B) weight")
    alpha = float(alpha.item()) if isinstance(alpha, torch.Tensor) else float(alpha)
    return ModuleLora(part["down"], part["up"], alpha)


# ---------------------------------------------------------------- kohya format

def to_kohya(lora_set: LoraSet, layout: UnetLayout) -> dict[str, torch.Tensor]:
    """The kohya tensors of `lora_set`, UNet keys in SGM naming derived from `layout`."""
    tensors = {}
    for component, name, lora in lora_set.items():
        stem = kohya_module_name(component, name, layout)
        tensors[f"{stem}.lora_down.weight"] = lora.down
        tensors[f"{stem}.lora_up.weight"] = lora.up
        tensors[f"{stem}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
    return tensors


def from_kohya(tensors: dict[str, torch.Tensor], lookups: dict[str, dict[str, str]]) -> LoraSet:
    """The LoraSet of a kohya-format file; `lookups` maps key stems to canonical names per component.

    A module without `.alpha` gets alpha = rank (scale 1), as kohya, ComfyUI and A1111 read it.
    """
    prefix_component = {p: c for c, p in KOHYA_PREFIXES.items()}
    parts: dict[tuple[str, str], dict] = {}
    for key, tensor in tensors.items():
        match = _KOHYA_KEY.fullmatch(key)
        if not match:
            raise LoraFileError(f"unsupported key {key!r} (only plain LoRA: lora_down/lora_up/alpha)")
        prefix, body, suffix = match.groups()
        component = prefix_component[prefix]
        name = lookups.get(component, {}).get(prefix + body)
        if name is None:
            raise LoraFileError(f"key {key!r} names no module of the SDXL {component}")
        parts.setdefault((component, name), {})[_ROLE[suffix]] = tensor
    modules: dict[str, dict[str, ModuleLora]] = {}
    for (component, name), part in parts.items():
        if "down" not in part:
            raise LoraFileError(f"{component} {name}: lora_down.weight missing")
        alpha = part.get("alpha", part["down"].shape[0])
        modules.setdefault(component, {})[name] = _module(f"{component} {name}", part, alpha)
    return LoraSet(modules)
