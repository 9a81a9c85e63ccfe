"""The conversion job: calibration → measurement → optimization → quantization → compilation.

Each stage reads and writes files in the job directory, so ``convert`` can be interrupted anywhere
and rerun with the same arguments to continue. Module loops checkpoint their hidden states at least
every ``checkpoint_interval`` seconds; work after the last checkpoint is redone deterministically.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from exl2core.distributed import AgreedError, Ranks
from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.modules.forward import module_forward
from exl2core.modules.linear import linear_products_in
from exl2core.plan import AttentionModule, HeadModule, ModelPlan, Module, ParallelModule
from exl2core.plugins import Plugins, installed
from exl2core.pipeline import compile as compile_stage
from exl2core.pipeline.calibration import RowPurpose, calibration_rows, describe_dataset
from exl2core.pipeline.hidden import HiddenStates
from exl2core.pipeline.job import (Job, Settings, atomic_write, load_tensors, remove_temporaries, save_tensors,
                                   stage_index, write_json)
from exl2core.pipeline.model_card import REPORT_IMAGE, card_facts, write_model_card
from exl2core.pipeline.preflight import BpwRange, preflight
from exl2core.pipeline.records import entry_lists, slot_key, slot_records
from exl2core.pipeline.runner import embed_rows
from exl2core.pipeline.report import REPORT_FILE, build_report, write_report
from exl2core.pipeline.marginal import SENSITIVITY_MODES, marginal_rows, measure_marginals
from exl2core.pipeline.measure import MEASURE_MODES, candidates_of, estimate_module, measure_module
from exl2core.pipeline.optimize import bpw_range, measured_slots, options_of, plan_strategy
from exl2core.pipeline.progress import Reporter
from exl2core.pipeline.quantize import QuantizerOptions, perplexity_verdict, quantize_module
from exl2core.pipeline.sensitivity import Sensitivity, measure_sensitivity, sensitivity_rows, sensitivity_steps
from exl2core.pipeline.token_weights import TokenWeights, measure_token_weights, token_weight_rows
from exl2core.quant.qparams import FITS, HEAD_OPTIONS, LAYOUTS, TABLES, pad32, table_setting

HEAD_BITS = tuple(sorted(HEAD_OPTIONS))


@dataclass
class Runtime:
    """How to run a job; none of it changes the result, so it may differ between resumes (the number of
    ranks included)."""

    device: str = "cpu"
    gpu_rows: int | None = None
    checkpoint_interval: float = 180.0
    status_json: bool = False
    quiet: bool = False
    ranks: Ranks = field(default_factory=Ranks)


def with_rope_overrides(plan: ModelPlan, settings: Settings) -> ModelPlan:
    """The plan with ``-rs``/``-ra`` replacing the RoPE scaling of config.json during calibration."""
    if settings.rope_scale is None and settings.rope_alpha is None:
        return plan

    def overridden(module):
        if not isinstance(module, (AttentionModule, ParallelModule)) or module.attention.rope is None:
            return module
        rope = module.attention.rope
        if settings.rope_scale is not None:
            rope = replace(rope, kind="linear", factor=settings.rope_scale)
        if settings.rope_alpha is not None:
            rope = replace(rope, kind="ntk_alpha", alpha=settings.rope_alpha)
        return replace(module, attention=replace(module.attention, rope=rope))

    return replace(plan, modules=tuple(overridden(m) for m in plan.modules))


def job_plan(plugins: Plugins, source: SourceModel, settings: Settings) -> ModelPlan:
    """The plan a job converts: the plugins' for the source, with the job's RoPE overrides."""
    return with_rope_overrides(plugins.resolve_plan(source.config, settings.arch, source.keys()), settings)


def quantizer_options(s: Settings) -> QuantizerOptions:
    """How the job's quantization pass quantizes its linears."""
    return QuantizerOptions(search=s.scale_search, fit=s.fit, layout=s.layout, fit_strength=s.fit_strength,
                            refine=s.refine, damp=s.damp, token_weight=s.token_weight, matmul_dtype=s.matmul_dtype)


def validate_settings(s: Settings) -> None:
    if s.head_bits not in HEAD_OPTIONS:
        raise Exl2Error(f"head bits must be one of {', '.join(map(str, HEAD_BITS))}, not {s.head_bits}")
    if not math.isfinite(s.bits) or s.bits <= 0:
        raise Exl2Error(f"target bits per weight must be a positive number, not {s.bits}")
    for name in ("rows", "length", "measurement_rows", "measurement_length"):
        if getattr(s, name) < 1:
            raise Exl2Error(f"{name.replace('_', ' ')} must be at least 1")
    if s.fit not in FITS:
        raise Exl2Error(f"fit must be one of {', '.join(FITS)}, not {s.fit!r}")
    if s.layout not in LAYOUTS:
        raise Exl2Error(f"bit layout must be one of {', '.join(LAYOUTS)}, not {s.layout!r}")
    quantizer_options(s)  # its own checks (fit strength, refinement sweeps, matmul dtype), before any work starts
    if s.measure not in MEASURE_MODES:
        raise Exl2Error(f"measurement mode must be one of {', '.join(MEASURE_MODES)}, not {s.measure!r}")
    if s.sensitivity not in SENSITIVITY_MODES:
        raise Exl2Error(f"sensitivity must be one of {', '.join(SENSITIVITY_MODES)}, not {s.sensitivity!r}")
    if s.kl_samples < 0:
        raise Exl2Error(f"KL samples must be 0 (the whole vocabulary) or more, not {s.kl_samples}")
    if s.output_measurement and s.compile_full:
        raise Exl2Error("-om (measure only) and -cf (compile) cannot be combined")


class Converter:
    def __init__(self, job: Job, runtime: Runtime, plugins: Plugins | None = None):
        self.job = job
        self.s = job.settings
        self.rt = runtime
        self.ranks = runtime.ranks
        self.report = Reporter(runtime.status_json and self.ranks.main, runtime.quiet or not self.ranks.main)
        self.device = torch.device(runtime.device)
        self.plugins = plugins or installed()
        self.source = SourceModel(self.s.in_dir, self.plugins)
        self.plan = job_plan(self.plugins, self.source, self.s)
        digest = plan_digest(self.plan)
        if job.state.setdefault("plan_digest", digest) != digest:
            raise Exl2Error("the model plan differs from the one this job started with (another plugin "
                            "version, or a plugin option such as EXL2_MOE_ALL_EXPERTS changed); rerun with "
                            "the original setup, or -nr to start over")
        if "dtype" not in job.state:
            job.update(dtype="float16" if self.device.type == "cuda" and not self.plan.fp32_residual
                       else "float32")
        self.dtype = getattr(torch, job.state["dtype"])
        self.tensor_dir = job.path("out_tensor")

    # -- stages ---------------------------------------------------------------------------------------

    def run(self) -> dict:
        stages = {
            "begin": self.begin, "measure_tokens": self.measure_tokens,
            "measure_embeddings": self.measure_embeddings, "measure": self.measure,
            "optimize": self.optimize, "quant_tokens": self.quant_tokens,
            "quant_embeddings": self.quant_embeddings, "quant": self.quantize, "compile": self.compile,
        }
        try:
            while self.job.progress != "finished":
                stages[self.job.progress]()
                self.ranks.barrier()  # what rank 0 wrote is there before any rank reads it
        finally:
            self.report.close()
        return self.job.state

    def begin(self) -> None:
        if self.s.measurement:
            measurement, predicted = load_measurement(self.s.measurement, self.plan)
            extra = {"predicted_kl": predicted} if predicted is not None else {}
            self.job.advance("optimize", measurement=measurement, **extra)
        else:
            self.job.advance("measure_tokens")

    def measure_tokens(self) -> None:
        self._tokens(self.s.measurement_rows, self.s.measurement_length, self.plan.noise_rows[0], "measurement")
        self.job.advance("measure_embeddings")

    def quant_tokens(self) -> None:
        self._tokens(self.s.rows, self.s.length, self.plan.noise_rows[1], "quantization")
        self.job.advance("quant_embeddings")

    def measure_embeddings(self) -> None:
        self._embeddings()
        self.job.advance("measure", measurement={}, last_module_idx=0)

    def quant_embeddings(self) -> None:
        self._embeddings()
        self.job.advance("quant", q_last_module_idx=0, module_errors={})

    def measure(self) -> None:
        modules = self.plan.modules
        start = self.job.state["last_module_idx"] + 1
        measurement = dict(self.job.state["measurement"])
        fast = self.s.measure != "exact"  # scored on Hessians, allocated by predicted KL
        sensitivity = self._sensitivity() if fast else None
        predicted = dict(self.job.state.get("predicted_kl") or {})
        total = sum(candidates_of(m) + 1 for m in modules[1:])
        done = sum(candidates_of(m) + 1 for m in modules[1:start])
        self.report.stage("Measuring", total, done)
        states = self._load_states()
        sent = self._share_note(states)
        last_save = time.monotonic()
        last_measured = max(i for i, m in enumerate(modules) if m.slots)
        for idx in range(start, len(modules)):
            module = modules[idx]
            if idx > last_measured:  # the final norm and head: nothing after them is measured
                measurement[module.measurement_key] = None
                self.report.advance()
                continue
            weights = self.source.module_weights(module, self.dtype, self.device)
            if fast:
                record, kl, outputs = estimate_module(module_forward(module), module, weights, states, sensitivity,
                                                      self.s.measure, on_candidate=self.report.advance,
                                                      search=self.s.scale_search)
                if kl is not None:
                    predicted[module.measurement_key] = kl
            else:
                record, outputs = measure_module(module_forward(module), module, weights, states,
                                                 on_candidate=self.report.advance, search=self.s.scale_search)
            self.report.advance()
            if module.slots:
                best = max(r["accuracy"] for recs in entry_lists(record) for r in recs)
                if best < 0.1:
                    raise Exl2Error(f"{module.measurement_key}: best measured accuracy {best:.4f} < 0.1; "
                                    "the forward or the calibration data is broken")
            measurement[module.measurement_key] = record
            states = states.replaced(outputs)
            del weights
            if idx < len(modules) - 1 and self._checkpoint_due(last_save):
                self._checkpoint(states, idx, "last_module_idx", measurement=measurement,
                                 **({"predicted_kl": predicted} if fast else {}))
                last_save = time.monotonic()
        result = {"measurement": measurement, "last_module_idx": len(modules) - 1}
        if fast:
            # exllamav2 reads only the two keys above; the predicted KL travels beside them for -m.
            result["predicted_kl"] = predicted
        self._traffic_note(sent, len(modules) - start)
        if self.ranks.main:
            write_json(self.job.path("measurement.json"), result)
        self._finish_pass("optimize",
                          measurement=measurement, last_module_idx=len(modules) - 1,
                          **({"predicted_kl": predicted} if fast else {}))

    def optimize(self) -> None:
        if self.s.output_measurement:
            self._output_measurement()
            return
        slots = [(module, slot) for module in self.plan.modules for slot in module.slots]
        keys = [slot_key(module, slot) for module, slot in slots]
        numel = self.plan.blocks_numel()
        measurement = self.job.state["measurement"]
        BpwRange(*bpw_range([options_of(r) for r in measured_slots(measurement, keys)], numel)).check(self.s.bits)
        self.report.stage("Optimizing", 1)
        predicted = self.job.state.get("predicted_kl")
        choices, summary = self.ranks.broadcast(self.ranks.agree(
            lambda: plan_strategy(measurement, keys, numel, self.s.bits, predicted_kl=predicted), everywhere=False))
        strategy = {slot.key: choices[i] for i, (_, slot) in enumerate(slots)}
        self.report.advance()
        if predicted:
            self.report.log(f"bit allocation: {summary['bpw']:.4f} bpw for target {self.s.bits} "
                            f"(predicted KL {summary['predicted_kl']:.5f} nats/token)")
        else:
            self.report.log(f"bit allocation: {summary['bpw']:.4f} bpw for target {self.s.bits} "
                            f"(Σ error {summary['sum_err']:.5f}, max error {summary['max_err']:.5f})")
        self.job.advance("quant_tokens", strategy=strategy, optimization=summary)

    def quantize(self) -> None:
        modules = self.plan.modules
        start = self.job.state["q_last_module_idx"] + 1
        errors = dict(self.job.state.get("module_errors", {}))
        notes = dict(self.job.state.get("calibration_notes", {}))
        options = quantizer_options(self.s)
        token_weights = self._token_weights() if options.token_weight else None
        self.report.stage("Quantizing", len(modules) - 1, start - 1)
        states, reference = HiddenStates.load_with_reference(self.job.path(self.job.state["hidden_states"]),
                                                             self.device, self.rt.gpu_rows, self.ranks)
        self._check_shard(states)
        if options.fit != "asymmetric":
            reference = None
        elif reference is None:
            if start > 1:
                raise Exl2Error("the checkpoint of this job's quantization pass lacks the unquantized model's "
                                "hidden states; rerun with -nr to start over")
            reference = states  # before the first block both models' states are the embeddings
        ids = load_tensors(self.job.path("cal_data.safetensors"))["input_ids"]
        ppl_rows = min(self.s.measurement_rows, ids.shape[0] - self.plan.noise_rows[1])
        sent = self._share_note(states)
        last_save = time.monotonic()
        for idx in range(start, len(modules)):
            module = modules[idx]
            weights = self.source.module_weights(module, self.dtype, self.device)
            result = quantize_module(module_forward(module), module, weights, states, self.job.state["strategy"],
                                     self.s.head_bits, self.tensor_dir,
                                     ppl_ids=ids[:ppl_rows] if isinstance(module, HeadModule) else None,
                                     options=options, reference=reference, token_weights=token_weights)
            self.report.advance()
            if result.error is not None:
                errors[module.measurement_key] = result.error
            for note in result.notes:
                self.report.log(f"{module.measurement_key}: {note}")
            if result.notes:
                notes[module.measurement_key] = result.notes
            if result.perplexity is not None:
                self.job.state["calibration_perplexity"] = result.perplexity
                self.report.log(f"calibration perplexity (quant): {result.perplexity:.4f} "
                                f"({perplexity_verdict(result.perplexity)})")
            if not isinstance(module, HeadModule):
                states = states.replaced(result.outputs)
                if reference is not None:
                    reference = reference.replaced(result.reference_outputs)
            del weights
            if idx < len(modules) - 1 and self._checkpoint_due(last_save):
                self._checkpoint(states, idx, "q_last_module_idx", reference=reference, module_errors=errors,
                                 calibration_notes=notes)
                last_save = time.monotonic()
        self._traffic_note(sent, len(modules) - start)
        self._finish_pass("compile", module_errors=errors, calibration_notes=notes,
                          q_last_module_idx=len(modules) - 1)

    def compile(self) -> None:
        target = Path(self.s.compile_full) if self.s.compile_full else self.job.dir
        shards = self.ranks.broadcast(self.ranks.agree(lambda: self._write_model(target), everywhere=False))
        self.job.advance("finished", output_dir=str(target), shards=shards)

    def _write_model(self, target: Path) -> list[str]:
        """The model files (rank 0's work); returns the shards' names."""
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Exl2Error(f"cannot create the output directory {target} ({e.strerror}); fix it and rerun "
                            "the same command to finish the job") from None
        remove_temporaries(target)  # of a compilation killed mid-write
        self.report.stage("Compiling", len(self.plan.modules) + 1)

        def chunks():
            for chunk in compile_stage.module_tensors(self.plan, self.source, self.tensor_dir):
                yield chunk
                self.report.advance()

        shards = compile_stage.write_shards(chunks(), target, self.s.shard_size)
        if self.s.compile_full:
            compile_stage.copy_source_files(Path(self.s.in_dir), target)
            compile_stage.write_quantization_config(target / "config.json", self.s.bits, self.s.head_bits,
                                                    self.s.rows, self.s.length,
                                                    describe_dataset(self.s.cal_dataset), self.plan.output_config)
        self._publish(target)
        return [p.name for p in shards]

    # -- helpers ----------------------------------------------------------------------------------------

    def _output_measurement(self) -> None:
        """-om: the measurement is the job's result; copy it where asked and finish."""
        measured = self.job.path("measurement.json")
        source = measured if measured.is_file() else Path(self.s.measurement)
        target = Path(self.s.output_measurement)
        target = target / "measurement.json" if target.is_dir() else target
        self.ranks.agree(lambda: atomic_write(target, lambda p: shutil.copyfile(source, p)), everywhere=False)
        self.job.advance("finished")

    def _publish(self, target: Path) -> None:
        """The report PNG in the job directory and, with -cf, beside the model with its model card."""
        report = build_report(self.s, self.job.state, self.plan)
        beside = [target / REPORT_IMAGE] if self.s.compile_full else []
        write_report(report, self.job.path(REPORT_FILE), *beside)
        if self.s.compile_full:
            write_model_card(target, Path(self.s.in_dir), card_facts(self.s, self.job.state))

    def _sensitivity(self) -> Sensitivity:
        """The output sensitivity of every measured linear, computed once per job (fast measurement): the
        Fisher pass by rank 0, whose result every rank gets (its rows are few and its sums run in row
        order), then the marginal-KL pass on every rank, each running its share of the streams."""
        name = "sensitivity.safetensors"
        if self.job.state.get("sensitivity") == name:
            return Sensitivity.load(self.job.path(name))
        ids = sensitivity_rows(load_tensors(self.job.path("cal_data.safetensors"))["input_ids"], self.plan,
                               self.dtype.itemsize)
        sensitivity = self.ranks.broadcast(self.ranks.agree(lambda: self._fisher_sensitivity(ids), everywhere=False))
        if self.s.sensitivity != "fisher":
            sensitivity = self.ranks.agree(lambda: self._with_marginals(sensitivity, ids))
        if self.ranks.main:
            sensitivity.save(self.job.path(name))
        self.job.update(sensitivity=name)
        return sensitivity

    def _token_weights(self) -> TokenWeights:
        """The token weights of the quantization rows' Hessians, computed once per job by rank 0 (a
        backward pass over a few of the rows, its products in the quantization pass's dtype), which every
        rank gets."""
        name = "token_weights.safetensors"
        if self.job.state.get("token_weights") == name:
            return TokenWeights.load(self.job.path(name))
        ids = load_tensors(self.job.path("cal_data.safetensors"))["input_ids"]
        rows = token_weight_rows(ids, self.plan, self.dtype.itemsize)

        def measure() -> TokenWeights:
            self.report.stage("Token weights", sensitivity_steps(self.plan))
            started = time.monotonic()
            with linear_products_in(quantizer_options(self.s).products):
                weights = measure_token_weights(self.plan, self._module_weights, ids, rows, self.device,
                                                self.s.seed, on_module=self.report.advance)
            self.report.log(f"token weights from {len(rows)} × {ids.shape[1]} quantization tokens "
                            f"in {time.monotonic() - started:.1f} s")
            return weights

        weights = self.ranks.broadcast(self.ranks.agree(measure, everywhere=False))
        if self.ranks.main:
            weights.save(self.job.path(name))
        self.job.update(token_weights=name)
        return weights

    def _module_weights(self, module: Module) -> dict[str, torch.Tensor]:
        return self.source.module_weights(module, self.dtype, self.device)

    def _fisher_sensitivity(self, ids: torch.Tensor) -> Sensitivity:
        self.report.stage("Sensitivity", sensitivity_steps(self.plan))
        started = time.monotonic()
        sensitivity = measure_sensitivity(self.plan, self._module_weights, ids, self.device, self.s.seed,
                                          on_module=self.report.advance)
        self.report.log(f"output sensitivity from {ids.shape[0]} × {ids.shape[1]} tokens "
                        f"in {time.monotonic() - started:.1f} s")
        return sensitivity

    def _with_marginals(self, sensitivity: Sensitivity, ids: torch.Tensor) -> Sensitivity:
        """``sensitivity`` with the slot (or per-linear) scales of the marginal-KL pass on the first of the
        sensitivity rows ``ids``."""
        rows = marginal_rows(ids)
        self.report.stage("Marginal KL", len(self.plan.modules))
        started = time.monotonic()
        per_linear = self.s.sensitivity == "linear"
        scales = measure_marginals(self.plan, self._module_weights, rows, self.device, sensitivity,
                                   mode=self.s.sensitivity, samples=self.s.kl_samples, seed=self.s.seed,
                                   ranks=self.ranks, on_module=self.report.advance).scales()
        ordered = sorted(scales.values())
        units = "linears" if per_linear else "slots"
        shared = f" on {self.ranks.world} ranks" if self.ranks.world > 1 else ""
        self.report.log(f"marginal KL of {len(scales)} {units} from {rows.shape[0]} × {rows.shape[1]} tokens"
                        f"{shared} in {time.monotonic() - started:.1f} s: measured ÷ predicted {ordered[0]:.2f} … "
                        f"{ordered[len(ordered) // 2]:.2f} (median) … {ordered[-1]:.2f}")
        return replace(sensitivity, linear_scales=scales) if per_linear else replace(sensitivity, scales=scales)

    def _tokens(self, rows: int, length: int, noise: int, purpose: RowPurpose) -> None:
        def write() -> None:
            ids = job_tokens(self.s, self.source, self.plan, rows, length, noise, purpose)
            save_tensors(self.job.path("cal_data.safetensors"), {"input_ids": ids})

        self.ranks.agree(write, everywhere=False)

    def _embeddings(self) -> None:
        """The first hidden states of every row, by rank 0 (cheap next to any block), as the pass's first
        checkpoint, which each rank then reads its rows of."""
        self.ranks.agree(self._write_embeddings, everywhere=False)
        self._point_at(self._checkpoint_name(0), {})

    def _write_embeddings(self) -> None:
        ids = load_tensors(self.job.path("cal_data.safetensors"))["input_ids"]
        rows = embed_rows(self.source, self.plan, ids, self.dtype, self.device)
        noise = [i for i in range(len(ids)) if ids[i, 0] < 0]
        if noise:
            real = torch.stack([rows[i] for i in range(len(rows)) if i not in noise]).float()
            gen = torch.Generator().manual_seed(self.s.seed + 1)
            for i in noise:
                rows[i] = (torch.randn(rows[i].shape, generator=gen) * real.std() + real.mean()).to(rows[i].dtype)
        HiddenStates(rows, torch.device("cpu")).save(self.job.path(self._checkpoint_name(0)))

    def _finish_pass(self, stage: str, **updates) -> None:
        """Advance past a module loop; its hidden states are no longer needed."""
        old = self.job.state.get("hidden_states")
        self.job.advance(stage, hidden_states=None, **updates)
        if old and self.ranks.main:
            self.job.path(old).unlink(missing_ok=True)

    def _load_states(self) -> HiddenStates:
        states = HiddenStates.load(self.job.path(self.job.state["hidden_states"]), self.device, self.rt.gpu_rows,
                                   self.ranks)
        self._check_shard(states)
        return states

    def _check_shard(self, states: HiddenStates) -> None:
        if states.shard.total < self.ranks.world:
            raise AgreedError(f"{self.ranks.world} ranks for {states.shard.total} calibration rows: run this pass "
                              f"on at most {states.shard.total} ranks")

    def _share_note(self, states: HiddenStates) -> int:
        """Log how the pass is shared among the ranks; returns the bytes sent so far (for the traffic note)."""
        if self.ranks.world > 1:
            counts = [len(self.ranks.rows(states.shard.total, rank)) for rank in range(self.ranks.world)]
            self.report.log(f"{self.ranks.world} ranks share the pass: calibration rows "
                            f"{' + '.join(map(str, counts))} of {states.shard.total}")
        return self.ranks.sent

    def _traffic_note(self, sent: int, modules: int) -> None:
        """Log the bytes the ranks sent each other in this pass (every rank takes part in the sum)."""
        total = sum(self.ranks.all_gather(self.ranks.sent - sent))
        if self.ranks.world > 1:
            self.report.log(f"{self.ranks.world} ranks sent {total / 1e6:.1f} MB in this pass "
                            f"({total / 1e6 / max(modules, 1):.2f} MB per module)")

    def _checkpoint_due(self, last_save: float) -> bool:
        """Rank 0's clock decides, so every rank checkpoints at the same module."""
        return self.ranks.broadcast(time.monotonic() - last_save >= self.rt.checkpoint_interval)

    def _checkpoint_name(self, idx: int) -> str:
        return f"hidden_states.{self.job.progress}.{idx:04d}.safetensors"

    def _checkpoint(self, states: HiddenStates, idx: int, counter: str,
                    reference: HiddenStates | None = None, **updates) -> None:
        """Save the hidden states (and the unquantized model's beside them, asymmetric fit; rank 0 writes
        every rank's rows) under a new name, then point the job at them, then drop the old file."""
        name = self._checkpoint_name(idx)
        states.save(self.job.path(name), reference)
        self._point_at(name, {counter: idx, **updates})

    def _point_at(self, name: str, updates: dict) -> None:
        old = self.job.state.get("hidden_states")
        self.job.update(hidden_states=name, **updates)
        if old and old != name and self.ranks.main:
            self.job.path(old).unlink(missing_ok=True)


def job_tokens(settings: Settings, source: SourceModel, plan: ModelPlan, rows: int, length: int, noise: int,
               purpose: RowPurpose) -> torch.Tensor:
    """The calibration token ids of one pass: the token stages' work, and the pre-flight's dry run of it."""
    return calibration_rows(source.tokenizer, plan.config.vocab_size or
                            source.shape(plan.modules[0].tensors["embed"])[0],
                            rows, length, dataset=settings.cal_dataset, seed=settings.seed, noise_rows=noise,
                            mix=settings.cal_mix, purpose=purpose, model_dir=source.path)


def plan_digest(plan: ModelPlan) -> str:
    """A fingerprint of everything in the plan that shapes the result, to refuse resuming a job whose
    plan changed underneath it (plugin upgrades, plugin options read from the environment)."""
    text = repr([plan.modules, plan.lm_prefix, plan.carry, plan.fp32_residual, plan.noise_rows])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_measurement(path: str | Path, plan: ModelPlan) -> tuple[dict, dict | None]:
    """Read a measurement.json (ours or exllamav2's) and check it describes this model; returns the
    records and, for a fast measurement of ours, the predicted KL of each record (else None)."""
    path = Path(path)
    if path.is_dir():
        path = path / "measurement.json"
    try:
        saved = json.loads(path.read_text())
        measurement = saved["measurement"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Exl2Error(f"{path}: not a readable measurement.json ({e})") from None
    predicted = saved.get("predicted_kl")
    for module in plan.modules:
        if not module.slots:
            continue
        record = measurement.get(module.measurement_key)
        if record is None:
            raise Exl2Error(f"{path} does not match this model: no entry for {module.measurement_key}")
        for slot in module.slots:
            _, table = slot_key(module, slot)
            records = slot_records(record, table)
            expected = len(TABLES[slot.table])
            if records is None or len(records) != expected:
                raise Exl2Error(f"{path} does not match this model: {module.measurement_key} has "
                                f"{len(records or [])} candidates, not {expected}")
            want = sum(table_setting(slot.table, 0, lin.role).total_bits(lin.in_features,
                                                                         pad32(lin.out_features), lin.bias)
                       for lin in module.linears if lin.role in slot.roles)
            if int(records[0]["total_bits"]) != want:
                raise Exl2Error(f"{path} does not match this model: {module.measurement_key} sizes differ "
                                "(measured on a model with other layer shapes)")
            if predicted is not None:
                kl = slot_records(predicted.get(module.measurement_key), table)
                if kl is None or len(kl) != expected:
                    raise Exl2Error(f"{path}: its predicted_kl does not match its records for "
                                    f"{module.measurement_key}")
    return measurement, predicted


def convert(settings: Settings, out_dir: str | Path, runtime: Runtime, *, restart: bool = False,
            plugins: Plugins | None = None) -> dict:
    """Run (or resume) the conversion job in ``out_dir`` with ``plugins`` (default: the installed ones);
    returns the final job state. On several ranks (``runtime.ranks``) every rank calls this with the same
    settings: rank 0 prepares and writes the job, the others follow it in the directory they share."""
    ranks = runtime.ranks
    validate_settings(settings)
    for name in ("in_dir", "cal_dataset", "compile_full", "output_measurement", "measurement"):
        value = getattr(settings, name)
        if value:
            setattr(settings, name, str(Path(value).resolve()))
    plugins = plugins or installed()
    # a bad source fails here, before a job directory is created
    source = ranks.agree(lambda: SourceModel(settings.in_dir, plugins))
    same_on_every_rank(ranks, "settings", asdict(settings))
    job = ranks.agree(lambda: Job.prepare(out_dir, settings, restart=restart), everywhere=False)
    if ranks.broadcast(job is not None and job.progress == "finished" and job.redo_from is None):
        return ranks.broadcast(job.state if ranks.main else None)
    plan = ranks.agree(lambda: job_plan(plugins, source, settings))
    same_on_every_rank(ranks, "model plan", plan_digest(plan))

    def start() -> None:
        measurement = load_measurement(settings.measurement, plan)[0] if settings.measurement else None
        preflight(settings, source, plan, job, runtime.device, measurement,  # nothing is written before this
                  read_tokens=lambda p: job_tokens(settings, source, plan, p.rows, p.length, p.noise, p.purpose))
        job.start()
        remove_stale_files(job)

    ranks.agree(start, everywhere=False)
    state = ranks.broadcast(job.state if ranks.main else None)
    job = ranks.agree(lambda: job if ranks.main else follow_job(out_dir, settings, state))
    converter = Converter(job, runtime, plugins)
    if job.changes:
        converter.report.log(job.resume_note())
    return converter.run()


def same_on_every_rank(ranks: Ranks, what: str, value: object) -> None:
    """Refuse, on every rank, a job whose ranks were started with different ``what`` (settings as a dict)."""
    values = ranks.all_gather(value)
    for rank, other in enumerate(values):
        if other == values[0]:
            continue
        if isinstance(other, dict):
            diff = "; ".join(f"{k}: {values[0][k]!r} vs {other[k]!r}" for k in other if other[k] != values[0][k])
        else:
            diff = "another plugin version, or a plugin option such as EXL2_MOE_ALL_EXPERTS set otherwise"
        raise AgreedError(f"rank {rank} was started with other {what} than rank 0 ({diff}); start every rank "
                          "with the same command and environment")


def follow_job(out_dir: str | Path, settings: Settings, state: dict) -> Job:
    """The job rank 0 has just written, read from ``out_dir`` by another rank, which writes nothing."""
    try:
        job = Job.prepare(out_dir, settings)
    except Exl2Error:
        job = None
    if job is None or job.is_new or job.state != state:
        raise Exl2Error(f"cannot see the job directory {Path(out_dir).resolve()} that rank 0 writes (no "
                        "job.json there, or another one): give every rank the same directory on storage they "
                        "all share")
    job.read_only = True
    return job


def remove_stale_files(job: Job) -> None:
    """What earlier runs left that the job no longer points at: the temporary files of writes killed
    mid-way, hidden-state checkpoints other than the one it holds, and, after a rewind, the packed tensors
    of a quantization pass to be redone and the report of the result being replaced."""
    remove_temporaries(job.dir)
    held = job.state.get("hidden_states")
    for path in job.dir.glob("hidden_states.*.safetensors"):
        if path.name != held:
            path.unlink()
    if job.redo_from is None:
        return
    if stage_index(job.redo_from) <= stage_index("quant"):
        shutil.rmtree(job.path("out_tensor"), ignore_errors=True)
    job.path(REPORT_FILE).unlink(missing_ok=True)
