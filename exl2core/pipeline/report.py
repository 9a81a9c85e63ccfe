"""The conversion report: a picture of what the bit allocation chose and what it cost.

One PNG with two panels over the decoder layers: the bits per weight chosen for each slot (attention,
MLP …) against the target, and the measured error of each slot's chosen candidate with its cheaper and
dearer neighbours, so a reader sees where bits went and what one step more or less would have changed.
The title carries the achieved bpw, the head bits and the calibration perplexity. The plotted numbers
are also stored in the PNG's text metadata (``exl2core.report``), so tools and tests can read them back.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from exl2core import __version__
from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.plan import ModelPlan
from exl2core.plugins import installed
from exl2core.pipeline.job import JOB_FILE, Settings, atomic_write
from exl2core.pipeline.preflight import slot_keys, slot_numel
from exl2core.pipeline.records import slot_records

REPORT_FILE = "report.png"
METADATA_KEY = "exl2core.report"


@dataclass(frozen=True)
class Candidate:
    """One measured candidate of a slot: its bits per weight and its measured error (1 − accuracy)."""

    bpw: float
    error: float


@dataclass(frozen=True)
class SlotChoice:
    """What the allocation chose for one slot, with the neighbouring candidates by size."""

    key: str
    table: str
    layer: int
    chosen: Candidate
    cheaper: Candidate | None
    dearer: Candidate | None


@dataclass(frozen=True)
class ConversionReport:
    model: str
    target_bpw: float
    achieved_bpw: float
    head_bits: int
    calibration_perplexity: float | None
    slots: list[SlotChoice]

    def bits(self) -> dict[str, float]:
        """The plotted bits per weight of each slot, by strategy key."""
        return {s.key: s.chosen.bpw for s in self.slots}


def build_report(settings: Settings, state: dict, plan: ModelPlan) -> ConversionReport:
    """The report of a job whose bit allocation is done (``state`` from its job.json)."""
    strategy = state.get("strategy")
    if not strategy or "measurement" not in state:
        raise Exl2Error(f"the job has no bit allocation yet (progress: {state.get('progress')}); "
                        "the report needs a job past its optimization stage")
    per_table: dict[str, int] = {}
    slots = []
    for module, slot, (key, table) in slot_keys(plan):
        numel = slot_numel(module, slot)
        records = slot_records(state["measurement"].get(key), table)
        chosen = strategy.get(slot.key)
        if chosen is None or records is None:
            raise Exl2Error(f"the job's strategy or measurement has no entry for {slot.key}")

        def candidate(r: dict) -> Candidate:
            return Candidate(int(r["total_bits"]) / numel, 1.0 - float(r["accuracy"]))

        ordered = sorted(records, key=lambda r: (int(r["total_bits"]), -float(r["accuracy"])))
        at = ordered.index(chosen) if chosen in ordered else None
        layer = per_table.get(slot.table, 0)
        per_table[slot.table] = layer + 1
        slots.append(SlotChoice(
            key=slot.key, table=slot.table, layer=layer, chosen=candidate(chosen),
            cheaper=candidate(ordered[at - 1]) if at is not None and at > 0 else None,
            dearer=candidate(ordered[at + 1]) if at is not None and at + 1 < len(ordered) else None))
    optimization = state.get("optimization") or {}
    return ConversionReport(
        model=Path(settings.in_dir).name, target_bpw=float(settings.bits),
        achieved_bpw=float(optimization.get("bpw", float("nan"))), head_bits=int(settings.head_bits),
        calibration_perplexity=state.get("calibration_perplexity"), slots=slots)


def load_report(work_dir: str | Path) -> ConversionReport:
    """The report of the job in ``work_dir`` (its source model must still be where the job read it)."""
    job_file = Path(work_dir) / JOB_FILE
    try:
        saved = json.loads(job_file.read_text())
    except FileNotFoundError:
        raise Exl2Error(f"{work_dir} holds no conversion job (no {JOB_FILE})") from None
    except (OSError, ValueError) as e:
        raise Exl2Error(f"{job_file} is unreadable ({e})") from None
    settings = Settings.from_saved(saved["settings"])
    plugins = installed()
    source = SourceModel(settings.in_dir, plugins)
    plan = plugins.resolve_plan(source.config, settings.arch, source.keys())
    return build_report(settings, saved["state"], plan)


def render_png(report: ConversionReport) -> bytes:
    """The report as PNG bytes (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    tables = list(dict.fromkeys(s.table for s in report.slots))
    layers = max(s.layer for s in report.slots) + 1
    fig = Figure(figsize=(max(8.0, 0.32 * layers + 4.0), 8.0), dpi=100)
    bits_ax, err_ax = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(tables)
    colors = dict(zip(tables, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for i, table in enumerate(tables):
        mine = [s for s in report.slots if s.table == table]
        xs = [s.layer + (i - (len(tables) - 1) / 2) * width for s in mine]
        bits_ax.bar(xs, [s.chosen.bpw for s in mine], width=width * 0.95, color=colors.get(table),
                    label=f"{table} slots")
        err_ax.plot(xs, [s.chosen.error for s in mine], "o-", color=colors.get(table), markersize=5,
                    label=f"{table}: chosen")
        for x, s in zip(xs, mine):
            ends = [c.error for c in (s.cheaper, s.dearer) if c is not None]
            if ends:
                err_ax.plot([x, x], [min(ends + [s.chosen.error]), max(ends + [s.chosen.error])],
                            color=colors.get(table), alpha=0.45, linewidth=2)
            if s.cheaper:
                err_ax.plot([x], [s.cheaper.error], "v", color=colors.get(table), alpha=0.6, markersize=5)
            if s.dearer:
                err_ax.plot([x], [s.dearer.error], "^", color=colors.get(table), alpha=0.6, markersize=5)
    bits_ax.axhline(report.target_bpw, color="black", linestyle="--", linewidth=1,
                    label=f"target {report.target_bpw:g} bpw")
    bits_ax.set_ylabel("bits per weight chosen")
    bits_ax.set_ylim(0, max(8.5, max(s.chosen.bpw for s in report.slots) + 0.5))
    bits_ax.legend(loc="upper right", fontsize=8, ncol=len(tables) + 1)
    bits_ax.grid(axis="y", alpha=0.3)
    err_ax.plot([], [], "v", color="gray", label="next cheaper candidate")
    err_ax.plot([], [], "^", color="gray", label="next dearer candidate")
    errors = [c.error for s in report.slots for c in (s.chosen, s.cheaper, s.dearer) if c is not None]
    if min(errors) > 0:
        err_ax.set_yscale("log")
        err_ax.set_ylim(min(errors) / 1.25, max(errors) * 1.25)
    err_ax.set_ylabel("measured error (1 − accuracy)")
    err_ax.set_xlabel("layer")
    if layers <= 40:
        err_ax.set_xticks(range(layers))
    err_ax.legend(loc="best", fontsize=8, ncol=2, framealpha=0.6)
    err_ax.grid(alpha=0.3)
    ppl = report.calibration_perplexity
    fig.suptitle(f"{report.model}: {report.achieved_bpw:.3f} bpw decoder (target {report.target_bpw:g}), "
                 f"head {report.head_bits} bits, calibration perplexity "
                 f"{'n/a' if ppl is None else f'{ppl:.3f}'}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    buffer = io.BytesIO()
    data = {"bits": report.bits(), "target_bpw": report.target_bpw, "achieved_bpw": report.achieved_bpw,
            "head_bits": report.head_bits, "calibration_perplexity": ppl,
            "slots": [asdict(s) for s in report.slots]}
    fig.savefig(buffer, format="png", metadata={"Software": f"exl2core {__version__}",
                                                METADATA_KEY: json.dumps(data)})
    return buffer.getvalue()


def write_report(report: ConversionReport, *paths: Path) -> None:
    """Render once and write the PNG to each path."""
    png = render_png(report)
    for path in paths:
        atomic_write(path, lambda p: p.write_bytes(png))
