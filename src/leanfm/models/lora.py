r"""Continual low-rank adapters on a model's Linear layers: sequential LoRA, C-LoRA and STAMINA, on PEFT.

A :class:`ContinualAdapter` owns one model through a sequence of tasks. For task :math:`t` it attaches fresh LoRA
factors with PEFT (``get_peft_model``: PEFT builds the layers, initialises :math:`A_t` (Kaiming) and
:math:`B_t = 0`, freezes everything else), the caller trains, and :meth:`ContinualAdapter.end_task` folds the
task's update into the weights with PEFT's ``merge_and_unload`` — so after every task the model is a plain model
with no extra parameters or latency:

.. math:: W_t = W_0 + \sum_{t' \le t} \Delta_{t'}, \qquad \Delta_t = s\,B_t A_t \quad (s = \alpha / r).

**C-LoRA** (Smith et al. 2023; METHODS.md section 8) adds the self-regulariser, written here because PEFT has no
notion of past tasks: with :math:`P_t = \sum_{t'<t} \Delta_{t'}` (kept per layer by the adapter),

.. math:: L_{reg} = \lambda \sum_{\text{layers}} \big\| \,|P_t| \odot \Delta_t \big\|_F^2 ,

which is zero for the first task and penalises changing entries that earlier tasks already changed.

**STAMINA** (Smith et al. 2024; METHODS.md section 9) masks each task's update with a learned hard mask,
:math:`\Delta_t = s\,M_t \odot (B_t A_t)`. The abstract says only "learnable hard-attention masks parameterized
with low rank MLPs"; **our reading**: the mask logits of a ``[out, in]`` layer are the responses of a
one-hidden-layer MLP :math:`g: \mathbb{R}^{in} \to \mathbb{R}^{out}` of width :math:`h` (``mask_rank``) to the
input basis vectors,

.. math:: L = U\,\mathrm{GELU}(V) + b\,\mathbf{1}^\top, \quad U \in \mathbb{R}^{out \times h}, V \in
          \mathbb{R}^{h \times in}, b \in \mathbb{R}^{out},

(so its parameters grow like LoRA's, :math:`h(out + in)`). Training draws a straight-through Gumbel-sigmoid mask,
:math:`M = \mathbb{1}[\sigma((L + g)/\tau) > 1/2]` in the forward and :math:`\sigma((L + g)/\tau)` in the backward
(:math:`g` logistic noise); inference and folding use the exact binary :math:`\mathbb{1}[L > 0]`. :math:`U = 0`
and :math:`b` = ``mask_init`` at the start, so every mask opens fully and STAMINA starts as LoRA; the sparsity
penalty :math:`\beta\,\overline{\sigma(L)}` (the mean probability that an entry is open, over the adapted layers;
with logistic noise it does not depend on :math:`\tau`) closes what the
task does not need. The masked layer is a subclass of PEFT's LoRA ``Linear`` registered through PEFT's
custom-module hook; it overrides only the forward (the masked update is materialised, a ``[out, in]`` matrix)
and ``get_delta_weight`` (so PEFT's merge folds :math:`M \odot s B A`). STAMINA's "MLP tokens" belong to the
text-to-image setting, not to classification.

Every task's update is kept (:attr:`ContinualAdapter.history`: the factors :math:`A`, :math:`sB` and, for
STAMINA, the binary mask), so a run can be saved, inspected and replayed on the base weights.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import safetensors
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_write_bytes

METHODS = ("lora", "clora", "stamina")
ADAPTER = "default"
HISTORY_FORMAT = "leanfm-continual-adapter/1"


def factor(layer: Any, name: str, adapter: str = ADAPTER) -> torch.Tensor:
    """``layer.lora_A[adapter].weight`` (``name`` "A") or ``lora_B``'s ("B"): PEFT's containers are untyped."""
    return cast(torch.Tensor, getattr(layer, f"lora_{name}")[adapter].weight)


def scaling(layer: Any, adapter: str = ADAPTER) -> float:
    return float(layer.scaling[adapter])


@dataclass
class StaminaLoraConfig(LoraConfig):
    """PEFT's LoRA settings plus STAMINA's mask: hidden width, initial logit and Gumbel temperature."""

    mask_rank: int = 4
    mask_init: float = 3.0
    mask_tau: float = 1.0


class StaminaLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` whose update is masked, :math:`s\\,M \\odot (B A)` (module docstring)."""

    adapter_layer_names = (*LoraLinear.adapter_layer_names, "lora_mask_u", "lora_mask_v", "lora_mask_b")

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig,  # type: ignore[override]
                     **kwargs: Any) -> None:
        if not isinstance(config, StaminaLoraConfig):
            raise LeanfmError("a STAMINA layer needs a StaminaLoraConfig")
        if not hasattr(self, "lora_mask_u"):
            self.lora_mask_u = nn.ParameterDict()
            self.lora_mask_v = nn.ParameterDict()
            self.lora_mask_b = nn.ParameterDict()
        device = cast(torch.Tensor, self.get_base_layer().weight).device
        out_features, in_features = int(cast(int, self.out_features)), int(cast(int, self.in_features))
        # created before PEFT's update_layer, whose set_adapter walks every adapter_layer_names entry
        self.lora_mask_u[adapter_name] = nn.Parameter(torch.zeros(out_features, config.mask_rank, device=device))
        self.lora_mask_v[adapter_name] = nn.Parameter(torch.randn(config.mask_rank, in_features, device=device))
        self.lora_mask_b[adapter_name] = nn.Parameter(torch.full((out_features,), float(config.mask_init),
                                                                 device=device))
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        self.mask_tau = float(config.mask_tau)

    def mask_logits(self, adapter: str = ADAPTER) -> torch.Tensor:
        """:math:`L = U\\,\\mathrm{GELU}(V) + b` ``[out, in]``, in float32."""
        u, v, b = (cast(torch.Tensor, getattr(self, f"lora_mask_{x}")[adapter]) for x in "uvb")
        return u.float() @ nn.functional.gelu(v.float()) + b.float()[:, None]  # [out, h] @ [h, in] -> [out, in]

    def mask(self, adapter: str = ADAPTER, *, sample: bool | None = None) -> torch.Tensor:
        """The binary mask: straight-through Gumbel-sigmoid when sampling (default: in training), else 1[L > 0]."""
        logits = self.mask_logits(adapter)
        if not (self.training if sample is None else sample):
            return (logits > 0).to(logits.dtype)
        uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / self.mask_tau)
        hard = (soft > 0.5).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly binary forward, soft gradient

    def density(self, adapter: str = ADAPTER) -> torch.Tensor:
        """Expected share of open entries under the sampled mask, :math:`\\overline{\\sigma(L)}` — with logistic
        noise :math:`P(L + g > 0) = \\sigma(L)` whatever :math:`\\tau` (the sparsity penalty's term)."""
        return torch.sigmoid(self.mask_logits(adapter)).mean()

    def masked_delta(self, adapter: str = ADAPTER, *, sample: bool | None = None) -> torch.Tensor:
        """:math:`s\\,M \\odot (B A)` ``[out, in]`` in float32."""
        product = factor(self, "B", adapter).float() @ factor(self, "A", adapter).float()  # [out, r] @ [r, in]
        return self.mask(adapter, sample=sample) * product * scaling(self, adapter)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """What PEFT's merge adds: the update under the exact inference mask."""
        return self.masked_delta(adapter, sample=False).to(factor(self, "B", adapter).dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                delta = self.masked_delta(adapter)
                dropped = self.lora_dropout[adapter](x)
                result = result + nn.functional.linear(dropped.to(delta.dtype), delta).to(result.dtype)
        return result


def linear_names(model: nn.Module) -> list[str]:
    """Short names (last path component) of the model's Linear layers, in order, without repeats."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                              if isinstance(m, nn.Linear) and name))


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a ``target_modules`` list entry: the full name or a dotted suffix of it (``attn2.to_k``)."""
    return name == target or name.endswith("." + target)


def target_layers(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the Linear layers matched by ``targets``: a last name component (``query``) or a dotted suffix
    (``attn2.to_k``: the cross-attention keys of a diffusers U-Net, not the self-attention ``attn1.to_k``), as PEFT
    matches ``target_modules``. A one-line error names a target that matches no Linear and lists the accepted
    short names."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    unknown = [t for t in targets if not any(_matches(name, t) for name in linears)]
    if unknown:
        raise LeanfmError(f"unknown target module '{unknown[0]}'; accepted: {', '.join(linear_names(model))} "
                          "(or a dotted suffix of a layer's name)")
    return [name for name in linears if any(_matches(name, t) for t in targets)]


@dataclass(frozen=True)
class AdapterSettings:
    """What :class:`ContinualAdapter` attaches: method, rank, alpha, targets and the method's own weights."""

    method: str = "clora"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "key", "value")
    reg_weight: float = 0.0  # C-LoRA's lambda (method clora; optional for stamina)
    sparsity: float = 0.0  # STAMINA's beta
    mask_rank: int = 4
    mask_init: float = 3.0
    mask_tau: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LeanfmError(f"unknown adapter method '{self.method}'; accepted: {', '.join(METHODS)}")
        if self.rank < 1:
            raise LeanfmError(f"rank {self.rank} is invalid; accepted: an integer >= 1")
        if self.mask_rank < 1:
            raise LeanfmError(f"mask rank {self.mask_rank} is invalid; accepted: an integer >= 1")
        if not self.targets:
            raise LeanfmError("no target modules; accepted: names of Linear layers, e.g. query,key,value")
        for name, value in (("reg_weight", self.reg_weight), ("sparsity", self.sparsity)):
            if not value >= 0:
                raise LeanfmError(f"{name} {value} is invalid; accepted: a number >= 0")
        if not (self.alpha > 0 and self.mask_tau > 0):
            raise LeanfmError(f"alpha {self.alpha} / mask tau {self.mask_tau} invalid; accepted: numbers > 0")


class ContinualAdapter:
    """Per-task low-rank updates of ``model``'s target Linear layers, folded after each task (module docstring).

    ``begin_task()`` attaches fresh factors (seeded by ``settings.seed`` and the task number, whatever torch's
    global RNG); train :meth:`parameters` with the task loss plus :meth:`penalty`; ``end_task()`` folds and
    returns the task's record. The model object stays the same throughout (PEFT injects into it in place).
    """

    def __init__(self, model: nn.Module, settings: AdapterSettings) -> None:
        self.model = model
        self.settings = settings
        self.layers = target_layers(model, settings.targets)
        self.past: dict[str, torch.Tensor] = {}  # P_t per layer (C-LoRA); empty before the first fold
        self.history: list[dict[str, torch.Tensor]] = []  # per finished task: "<layer>.A", ".B" (scaled), ".mask"
        self._peft: Any = None

    @property
    def active(self) -> bool:
        return self._peft is not None

    def lora_config(self) -> LoraConfig:
        s = self.settings
        common: dict[str, Any] = {"r": s.rank, "lora_alpha": s.alpha,  # PEFT types alpha as int; floats work
                                  "target_modules": list(s.targets), "lora_dropout": 0.0}
        if s.method != "stamina":
            return LoraConfig(**common)
        config = StaminaLoraConfig(**common, mask_rank=s.mask_rank, mask_init=s.mask_init, mask_tau=s.mask_tau)
        config._register_custom_module({nn.Linear: StaminaLinear})
        return config

    def begin_task(self) -> None:
        """Attach fresh factors for the next task (a one-line error if a task is open)."""
        if self.active:
            raise LeanfmError(f"task {len(self.history)} is still open; end it before beginning another")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(self.settings.seed * 1_000_003 + len(self.history))
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self._peft = get_peft_model(self.model, self.lora_config())  # type: ignore[arg-type]

    def lora_layers(self) -> dict[str, LoraLinear]:
        """The open task's PEFT layers by the model's layer names."""
        if not self.active:
            raise LeanfmError("no task has begun; call begin_task() first")
        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLinear) and name in self.layers}

    def parameters(self) -> dict[str, nn.Parameter]:
        """The open task's trainable parameters by name (``/`` for ``.``: usable as ``ParameterDict`` keys)."""
        return {f"{name}/{key}".replace(".", "/"): p for name, layer in self.lora_layers().items()
                for key, p in layer.named_parameters() if p.requires_grad and key.startswith("lora_")}

    def delta(self, layer: LoraLinear) -> torch.Tensor:
        """The open task's update of ``layer`` as trained (STAMINA: straight-through hard mask, no noise)."""
        if isinstance(layer, StaminaLinear):
            logits = layer.mask_logits(ADAPTER)
            soft = torch.sigmoid(logits / layer.mask_tau)
            mask = (logits > 0).to(soft.dtype) + (soft - soft.detach())
            product = factor(layer, "B").float() @ factor(layer, "A").float()
            return mask * product * scaling(layer)
        return layer.get_delta_weight(ADAPTER).float()

    def penalty(self) -> tuple[torch.Tensor, dict[str, float]]:
        """C-LoRA's :math:`\\lambda \\sum \\| |P_t| \\odot \\Delta_t \\|_F^2` + STAMINA's :math:`\\beta`-weighted
        density; zero when the method has neither. Returns (penalty, record of its parts)."""
        layers = self.lora_layers()
        device = factor(next(iter(layers.values())), "A").device
        total = torch.zeros((), device=device)
        record: dict[str, float] = {}
        s = self.settings
        if s.reg_weight > 0 and s.method in ("clora", "stamina") and self.past:
            for name in layers:  # moved once, not every step
                self.past[name] = self.past[name].to(device)
            reg = torch.stack([((self.past[name].abs() * self.delta(layer)) ** 2).sum()
                               for name, layer in layers.items()]).sum()
            total = total + s.reg_weight * reg
            record["reg"] = float(reg.detach())
        if s.method == "stamina":
            density = torch.stack([layer.density(ADAPTER) for layer in layers.values()
                                   if isinstance(layer, StaminaLinear)]).mean()
            total = total + s.sparsity * density
            record["density"] = float(density.detach())
        return total, record

    @torch.no_grad()
    def end_task(self) -> dict[str, torch.Tensor]:
        """Fold the open task into the weights (PEFT ``merge_and_unload``); returns and keeps its record."""
        layers = self.lora_layers()
        record: dict[str, torch.Tensor] = {}
        for name, layer in layers.items():
            record[f"{name}.A"] = factor(layer, "A").detach().float().cpu().clone()
            record[f"{name}.B"] = (factor(layer, "B").detach().float() * scaling(layer)).cpu()
            delta = layer.get_delta_weight(ADAPTER).detach().float().cpu()
            if isinstance(layer, StaminaLinear):
                record[f"{name}.mask"] = (layer.mask_logits(ADAPTER) > 0).cpu()
            self.past[name] = self.past.get(name, torch.zeros_like(delta)).cpu() + delta
        self._peft.merge_and_unload()
        self._peft = None
        self.history.append(record)
        return record

    def state(self) -> dict[str, Any]:
        """Plain tensors for a checkpoint: the past sums and the history (restore with :meth:`load_state`)."""
        return {"past": {k: v.cpu() for k, v in self.past.items()}, "history": [dict(r) for r in self.history]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.past = {k: v.float() for k, v in state["past"].items()}
        self.history = [dict(r) for r in state["history"]]

    def to_bytes(self) -> bytes:
        """The settings, every finished task's update and the past sums as one safetensors file's bytes."""
        if self.active:
            raise LeanfmError(f"task {len(self.history)} is still open; end it before saving")
        tensors = {f"past.{k}": v.cpu().contiguous() for k, v in self.past.items()}
        for number, record in enumerate(self.history):
            tensors |= {f"history.{number}.{k}": v.contiguous() for k, v in record.items()}
        settings = json.dumps(dataclasses.asdict(self.settings))
        return save(tensors, metadata={"format": HISTORY_FORMAT, "settings": settings,
                                       "tasks": str(len(self.history))})

    def save(self, path: str | Path) -> None:
        """:meth:`to_bytes` written atomically to ``path`` (read back with :meth:`load`)."""
        atomic_write_bytes(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, *, apply: bool = False) -> ContinualAdapter:
        """An adapter continuing the saved history on ``model``; ``apply`` also adds every saved update to the
        model's weights (for a model with the base weights: the folded model, :func:`replay`)."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except (OSError, safetensors.SafetensorError) as err:
            raise LeanfmError(f"cannot read adapter history '{path}' ({err})") from None
        if metadata.get("format") != HISTORY_FORMAT:
            raise LeanfmError(f"'{path}' is not a {HISTORY_FORMAT} file")
        settings = json.loads(metadata["settings"])
        adapter = cls(model, AdapterSettings(**{**settings, "targets": tuple(settings["targets"])}))
        adapter.past = {k[len("past."):]: v for k, v in tensors.items() if k.startswith("past.")}
        history = split_history(tensors, int(metadata["tasks"]))
        adapter.history = history
        if apply:
            replay(history, model)
        return adapter


def split_history(tensors: dict[str, torch.Tensor], tasks: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The per-task records of ``history.<task>.<layer>.<A|B|mask>`` keys, in task order (``tasks``: how many, so a
    task without adapted layers still counts)."""
    records: dict[int, dict[str, torch.Tensor]] = {n: {} for n in range(tasks or 0)}
    for key, value in tensors.items():
        if key.startswith("history."):
            number, name = key[len("history."):].split(".", 1)
            records.setdefault(int(number), {})[name] = value
    return [records[n] for n in sorted(records)]


def replay(history: Sequence[dict[str, torch.Tensor]], model: nn.Module) -> None:
    """Add every recorded task update to ``model``'s weights in order: :math:`W_0 + \\sum_t (sB_t A_t) [\\odot M_t]`."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for record in history:
            for key in record:
                if not key.endswith(".A"):
                    continue
                name = key[:-2]
                delta = record[f"{name}.B"] @ record[key]  # [out, r] @ [r, in]
                if f"{name}.mask" in record:
                    delta = delta * record[f"{name}.mask"].to(delta.dtype)
                weight = modules[name].weight  # type: ignore[union-attr]
                weight += delta.to(weight.device, weight.dtype)


def settings_from(config: Any, **overrides: Any) -> AdapterSettings:
    """:class:`AdapterSettings` from any config with the same field names (extra fields ignored), then ``overrides``."""
    fields = {f.name for f in dataclasses.fields(AdapterSettings)}
    values = {k: getattr(config, k) for k in fields if hasattr(config, k)} | overrides
    if isinstance(values.get("targets"), str):
        values["targets"] = tuple(t.strip() for t in values["targets"].split(",") if t.strip())
    return AdapterSettings(**values)
