"""Quantization pass: every linear quantized with its strategy setting, packed, verified, saved.

Hidden states advance with the *quantized* block outputs, so each block's Hessians are collected
on inputs produced by the already-quantized earlier blocks. How each linear is fitted (``FITS``):

* ``local`` (exllamav2's): every linear of a block on the inputs the block's unquantized weights give it;
* ``sequential``: the linears reading the block's input first, then the others (o_proj, down_proj, MoE
  w2) on what the already quantized first ones produce;
* ``asymmetric`` (GPTAQ, arXiv 2504.02692): sequential, and each linear fitted to the *unquantized*
  model's output from the quantized inputs it really sees, so it compensates the error of everything
  quantized before it. The pass then carries the unquantized model's hidden states beside its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from exl2core.errors import Exl2Error
from exl2core.modules.forward import module_tail
from exl2core.modules.linear import linear_products_in
from exl2core.plan import HeadModule, Linear, Module
from exl2core.pipeline.collect import collect, first_input
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.job import save_tensors
from exl2core.distributed import SINGLE, Ranks
from exl2core.pipeline.runner import (calibration_report, forward_rows, hessian_users, prepare_hessians,
                                      reduce_hessians, relative_error, share_linears, tail_rows)
from exl2core.pipeline.token_weights import TokenWeights
from exl2core.quant.gptq import Hessian, quantize_linear
from exl2core.quant.pack import dequantize
from exl2core.quant.qparams import FITS, HEAD_OPTIONS, PERCDAMP, PRODUCT_DTYPES, QParams

RTN_NUMEL = 1e9
PPL_HEALTHY = 30.0
#: A block's inputs to its later linears are kept over all rows while they fit in this many bytes: the
#: unquantized model's from the asymmetric fit's first pass (beyond, its second pass runs the unquantized
#: block again), and the quantized rows' from the second pass (beyond, the outputs take a whole forward).
INPUT_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class QuantizerOptions:
    """The job's choices of how linears are quantized (``Settings`` fields of stage ``quant``)."""

    search: str = "hessian"
    fit: str = "local"
    layout: str = "table"
    fit_strength: float = 1.0  # share of the asymmetric fit's correction applied (1: the exact optimum)
    refine: int = 0  # coordinate-descent sweeps over GPTQ's codes (quant.refine)
    damp: float = PERCDAMP  # GPTQ's damping, a fraction of the Hessian's mean diagonal (Hessian.prepare)
    token_weight: float = 0.0  # strength of the gradient-weighted tokens in the Hessians (pipeline.token_weights)
    matmul_dtype: str = "float32"  # dtype the blocks' forwards multiply their linears in (linear_products_in)

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise Exl2Error(f"unknown fit {self.fit!r}; expected one of {', '.join(FITS)}")
        if not 0.0 < self.fit_strength <= 1.0:
            raise Exl2Error(f"fit strength must be in (0, 1], not {self.fit_strength}")
        if self.refine < 0:
            raise Exl2Error(f"refinement sweeps must be 0 or more, not {self.refine}")
        if not 0.0 < self.damp <= 1.0:
            raise Exl2Error(f"damping must be in (0, 1], not {self.damp}")
        if not 0.0 <= self.token_weight < 1.0:
            raise Exl2Error(f"token weight strength must be in [0, 1), not {self.token_weight}")
        if self.matmul_dtype not in PRODUCT_DTYPES:
            raise Exl2Error(f"matmul dtype must be one of {', '.join(PRODUCT_DTYPES)}, not {self.matmul_dtype!r}")

    @property
    def products(self) -> torch.dtype | None:
        """The dtype of the forwards' products (``linear_products_in``); None for float32."""
        return None if self.matmul_dtype == "float32" else getattr(torch, self.matmul_dtype)


@dataclass
class ModuleResult:
    outputs: list[torch.Tensor]
    error: float | None = None
    perplexity: float | None = None
    notes: list[str] = field(default_factory=list)
    reference_outputs: list[torch.Tensor] | None = None  # the unquantized model's (asymmetric fit)


def setting_for(module: Module, lin: Linear, strategy: dict, head_bits: int) -> QParams:
    if isinstance(module, HeadModule):
        return HEAD_OPTIONS[head_bits]
    for slot in module.slots:
        if lin.role in slot.roles:
            return QParams.from_dict(strategy[slot.key][lin.role])
    raise Exl2Error(f"{module.key}: no strategy entry covers linear {lin.name}")


def tensor_file(out_dir: Path, lin: Linear) -> Path:
    return out_dir / f"{lin.key}.safetensors"


def quantize_module(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates,
                    strategy: dict, head_bits: int, out_dir: Path,
                    ppl_ids: torch.Tensor | None = None, search: str = "hessian", *,
                    options: QuantizerOptions | None = None,
                    reference: HiddenStates | None = None,
                    token_weights: TokenWeights | None = None) -> ModuleResult:
    """Quantize ``module``'s linears in place of their weights and return its quantized outputs.

    ``ppl_ids`` (the head only) are the token ids of the rows used for the calibration perplexity;
    ``options`` (default: ``search`` and exllamav2's fit) say how to quantize. ``reference`` holds the
    unquantized model's hidden states, required by the asymmetric fit, whose reference outputs the
    result then carries. ``token_weights`` (required when ``options.token_weight`` is set) weigh the
    tokens of the block's Hessians. A block's forwards multiply in ``options.matmul_dtype``; the head's
    keep float32, its logits being the calibration perplexity.
    """
    options = options or QuantizerOptions(search=search)
    products = None if isinstance(module, HeadModule) else options.products
    with linear_products_in(products):
        return _quantize_module(fwd, module, weights, states, strategy, head_bits, out_dir, ppl_ids, options,
                                reference, token_weights, products)


def _quantize_module(fwd: Callable, module: Module, weights: dict[str, torch.Tensor], states: HiddenStates,
                     strategy: dict, head_bits: int, out_dir: Path, ppl_ids: torch.Tensor | None,
                     options: QuantizerOptions, reference: HiddenStates | None,
                     token_weights: TokenWeights | None, products: torch.dtype | None) -> ModuleResult:
    asymmetric = options.fit == "asymmetric"
    if asymmetric and reference is None:
        raise ValueError("the asymmetric fit needs the unquantized model's hidden states")
    reference = reference if asymmetric else None
    if options.token_weight and token_weights is None:
        raise ValueError("a token weight strength needs the job's token weights")
    factor = token_weights.factors(module, options.token_weight) if options.token_weight else None
    ranks = states.shard.ranks
    if not module.linears:
        outputs = forward_rows(fwd, module, weights, states)
        ref_outputs = None if reference is None else forward_rows(fwd, module, weights, reference)
        return ModuleResult(outputs, reference_outputs=ref_outputs)
    if isinstance(module, HeadModule):
        owners = share_linears(module.linears, ranks)
        hessians = reduce_hessians(head_hessians(module, states, reference), states, hessian_users(module, owners))
        notes = calibration_report(module, hessians)
        _quantize_linears(module, module.linears, owners, weights, hessians, strategy, head_bits, out_dir, options,
                          ranks)
        ppl = NextTokenLoss(ppl_ids)
        if ppl_ids is not None:
            forward_rows(fwd, module, weights, states, rows=len(ppl_ids), reduce=ppl.add)
        return ModuleResult([], perplexity=ppl.perplexity(ranks), notes=notes)

    unquantized = dict(weights)
    if options.fit == "local":
        stages = [module.linears]
    else:
        first = first_input(fwd, module, weights, states)
        stages = [[lin for lin in module.linears if lin.input == first],
                  [lin for lin in module.linears if lin.input != first]]
    stage_inputs = [{lin.input for lin in stage} for stage in stages]
    later = set().union(*stage_inputs[1:])
    cached = bool(later) and _input_bytes(module, later, states) <= INPUT_CACHE_BYTES
    keep = later if asymmetric and cached else set()
    # Once the later linears are quantized, the block's outputs follow from their kept inputs.
    tail = module_tail(module) if len(stages) == 2 and cached else None
    # The asymmetric fit's first pass needs only the first linears' inputs on the quantized rows, and its
    # error is taken against the unquantized model's output (what it fits), so those forwards stop early.
    first_only = stage_inputs[0] if asymmetric else frozenset()
    collected = collect(fwd, module, weights, states, reference=reference, reference_weights=unquantized,
                        paired=first_only, keep=keep, inputs=first_only or None, stop_after=first_only,
                        token_factor=factor, products=products)
    targets = collected.reference_outputs if asymmetric else collected.outputs
    # Each stage's linears go to ranks as ``share_linears`` says; each Hessian only to the ranks using it.
    owners = [share_linears(stage, ranks) for stage in stages]
    hessians = reduce_hessians(collected.hessians, states, hessian_users(module, owners[0]))
    seen = dict(hessians)
    kept_inputs = None
    for index, stage in enumerate(stages):
        if not stage:
            continue
        if index > 0:
            # Only the Hessians are read: each forward stops once this stage's inputs are captured.
            later_pass = collect(fwd, module, weights, states, inputs=stage_inputs[index], reference=reference,
                                 reference_weights=unquantized, reference_inputs=collected.reference_inputs,
                                 paired=stage_inputs[index] if asymmetric else frozenset(),
                                 stop_after=stage_inputs[index], token_factor=factor,
                                 keep_inputs=stage_inputs[index] if tail else frozenset(), products=products)
            kept_inputs = later_pass.inputs
            hessians = reduce_hessians(later_pass.hessians, states, hessian_users(module, owners[index]))
            seen.update((name, h) for name, h in hessians.items() if name not in seen)
        _quantize_linears(module, stage, owners[index], weights, hessians, strategy, head_bits, out_dir, options,
                          ranks)
    notes = calibration_report(module, seen)
    if kept_inputs is not None:
        outputs = tail_rows(fwd, tail, module, weights, states, kept_inputs)
    else:
        outputs = forward_rows(fwd, module, weights, states)
    return ModuleResult(outputs, error=relative_error(outputs, targets, ranks), notes=notes,
                        reference_outputs=collected.reference_outputs)


def _input_bytes(module: Module, names: set[str], states: HiddenStates) -> int:
    """Upper bound on the memory that keeping the inputs ``names`` of every row takes."""
    features = sum({lin.input: lin.in_features for lin in module.linears if lin.input in names}.values())
    row = states.rows[0]
    return len(states) * row.shape[0] * features * row.element_size()


def _quantize_linears(module: Module, linears: list[Linear], owners: dict[str, int],
                      weights: dict[str, torch.Tensor], hessians: dict[str, Hessian], strategy: dict,
                      head_bits: int, out_dir: Path, options: QuantizerOptions, ranks: Ranks = SINGLE) -> None:
    """Quantize, pack, save and verify ``linears``; each weight is replaced by its dequantized packing.

    On several ranks each quantizes the linears ``owners`` gives it (``share_linears``) and the packed
    tensors go to every rank (a fraction of the weights' size); rank 0 saves them."""
    mine = [lin for lin in linears if owners[lin.name] == ranks.rank]
    prepared = prepare_hessians(module, hessians, weights[linears[0].name].device, {lin.name for lin in mine},
                                percdamp=options.damp)
    packed: dict[tuple[str, str], torch.Tensor] = {}

    def replace_weight(lin: Linear, rebuilt: torch.Tensor) -> None:
        weights[lin.name] = rebuilt[: lin.out_features].to(weights[lin.name].device, weights[lin.name].dtype)

    for lin in mine:
        qp = setting_for(module, lin, strategy, head_bits)
        rtn = isinstance(module, HeadModule) and lin.in_features * lin.out_features > RTN_NUMEL
        q = quantize_linear(weights[lin.name], prepared[lin.name], qp, bias=weights.get(lin.name + ".bias"),
                            rtn=rtn, search=options.search, layout=options.layout,
                            asymmetric_weight=options.fit_strength, refine=options.refine)
        tensors = q.pack()
        rebuilt = dequantize(tensors)
        # In fp16, the dtype of both: float copies of a large head would cost GBs here.
        diff = torch.sub(rebuilt.to(q.weight.device), q.weight).abs_().max().item()
        if diff > 0.05 or not math.isfinite(diff):
            raise Exl2Error(f"{lin.key}: packed tensors do not reproduce the quantized weight "
                            f"(max diff {diff:.4g}); this is a bug, please report it")
        packed.update(((lin.name, suffix), t) for suffix, t in tensors.items())
        replace_weight(lin, rebuilt)
    packed = ranks.share(packed)
    for lin in linears:
        tensors = {suffix: t for (name, suffix), t in packed.items() if name == lin.name}
        if ranks.main:
            save_tensors(tensor_file(out_dir, lin), {f"{lin.key}.{suffix}": t for suffix, t in tensors.items()})
        if owners[lin.name] != ranks.rank:  # this rank's own linears were replaced as they were verified
            replace_weight(lin, dequantize(tensors))


def head_hessians(module: Module, states: HiddenStates, reference: HiddenStates | None = None) -> dict[str, Hessian]:
    """The head reads the module's input unchanged, so its Hessian needs no forward: computing the
    logits of every calibration row only to discard them is the costliest step of the whole pass.
    With ``reference`` (the unquantized model's head inputs) the Hessian is asymmetric."""
    (lin,) = module.linears
    hessian = Hessian(lin.in_features, states.device, asymmetric=reference is not None)
    with torch.inference_mode():
        for i in range(len(states)):
            hessian.add(states.row(i), None if reference is None else reference.row(i), row=states.first + i)
    return {lin.input: hessian}


class NextTokenLoss:
    """Next-token negative log-likelihood row by row (exllamav2's calibration reading), kept per row so
    that rows shared among ranks add up in row order."""

    def __init__(self, ids: torch.Tensor | None):
        self.ids = ids
        self.rows: list[tuple[float, int]] = []  # (Σ log p of the row's next tokens, tokens)

    def add(self, row: int, logits: torch.Tensor) -> None:
        lp = torch.log_softmax(logits.squeeze(0)[:-1].float() + 1e-10, dim=-1)
        target = self.ids[row, 1:].to(lp.device).clamp(0, lp.shape[-1] - 1)
        self.rows.append((lp.gather(-1, target.unsqueeze(-1)).sum().item(), target.numel()))

    def perplexity(self, ranks: Ranks = SINGLE) -> float | None:
        """Over every rank's rows; None without any."""
        nll, count = 0.0, 0
        for share in ranks.all_gather(self.rows):
            for log_p, tokens in share:
                nll -= log_p
                count += tokens
        return math.exp(nll / count) if count else None


def perplexity_verdict(ppl: float) -> str:
    if ppl < PPL_HEALTHY:
        return "healthy"
    if ppl < 1000:
        return "warning: high calibration perplexity; the quantized model may be degraded"
    return "failure: calibration perplexity in the thousands, the quantized model is broken"
