"""exllamav2 0.3.2's converter against ``exl2 convert`` on one FP16 model, both judged by one evaluator.

    python bench/compare_exllamav2.py --dry-run            # the plan: every command, nothing is run
    python bench/compare_exllamav2.py                      # SmolLM2-135M, 3.0/4.0/5.0 bpw, default settings
    python bench/compare_exllamav2.py --model m.gguf --bits 4.0 -mr 4 -ml 512 -r 16 -l 512   # reduced

Needs a CUDA device, exllamav2 0.3.2 and exl2core; bench/README.md says how to run it on the device
machine. Per tool: one measurement pass (``-om``), one quantization pass per bitrate reusing that
measurement (``-m``), and one full conversion (measurement and quantization in one run, timed only).
Each pass records its wall time, per-stage times (from the tools' status lines: ``-so`` for exllamav2,
``--status-json`` for exl2core) and its peak GPU memory, read from the driver the same way for both
tools. Every output and the FP16 source are then scored by exl2core's evaluator (perplexity, KL and
top-1 agreement against the FP16 source on held-out text) and, as a cross-check, by exllamav2's own
forward (perplexity on the same token windows).

Every step is a subprocess; one that fails is reported in the table and the run goes on. Step results
are kept in WORK/results.json, so rerunning the same command skips the steps already done (``--redo``
reruns them). WORK/results.md always holds the current table; the finished table is appended to
``--append-to``.

Calibration: with the default row counts each tool uses its own built-in set. exllamav2's built-in set
has fixed row counts (it ignores ``-mr``/``-r``), so other row counts switch both tools to one shared
parquet file built from exl2core's calibration texts (``--cal shared`` forces that; ``--cal FILE``
uses a given parquet file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import date
from importlib import metadata, resources
from pathlib import Path

EXLLAMAV2 = "exllamav2"
EXL2CORE = "exl2core"
TOOLS = (EXLLAMAV2, EXL2CORE)
#: exllamav2 0.3.2 computes attention wrongly through torch ≥ 2.11's SDPA; every run of it needs this.
RUN_ENV = {"EXLLAMA_NO_SDPA": "1", "PYTHONUNBUFFERED": "1"}
#: exllamav2's converter defaults (and exl2core's): rows × tokens for measurement and quantization.
DEFAULT_ROWS = dict(measurement_rows=16, measurement_length=2048, rows=100, length=2048)
STATUS_RE = re.compile(r"\[STATUS\](\{.*?\})\[/STATUS\]")
SHARED_CHUNK_CHARS = 4000
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
DONE_MARKER = "done"


@dataclass
class Step:
    """One subprocess of the benchmark; ``name`` is its key in results.json."""

    name: str
    tool: str
    kind: str  # warmup | measure | quant | full | eval | ev2ppl
    argv: list[str]
    bits: float | None = None
    output: Path | None = None  # the directory a conversion writes
    needs: list[str] = field(default_factory=list)  # steps that must have succeeded first
    clear: list[Path] = field(default_factory=list)  # removed before the step runs


# -- the plan -----------------------------------------------------------------------------------------------


def convert_argv(tool: str, model: Path, job_dir: Path, args: argparse.Namespace,
                 cal: Path | None) -> list[str]:
    """The converter command line shared by every pass of ``tool`` (mode flags are appended)."""
    if tool == EXLLAMAV2:
        argv = [sys.executable, "-m", "exllamav2.conversion.convert_exl2"]
    else:
        argv = [sys.executable, "-m", "exl2core.cli", "convert"]
    argv += ["-i", str(model), "-o", str(job_dir), "-nr", "-hb", str(args.head_bits),
             "-mr", str(args.measurement_rows), "-ml", str(args.measurement_length),
             "-r", str(args.rows), "-l", str(args.length)]
    if cal is not None:
        argv += ["-c", str(cal)]
    return argv + (["-so"] if tool == EXLLAMAV2 else ["--status-json", "--device", args.device])


def eval_argvs(model_dir: Path, ref: Path | None, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """exl2core's evaluator (against ``ref``) and exllamav2's forward perplexity of ``model_dir``."""
    rows = ["--rows", str(args.eval_rows)] if args.eval_rows else []
    ours = [sys.executable, "-m", "exl2core.cli", "eval", str(model_dir), "--json",
            "--length", str(args.eval_length), "--device", args.device, *rows]
    if ref is not None:
        ours += ["--ref", str(ref)]
    theirs = [sys.executable, str(Path(__file__).resolve()), "--exllamav2-perplexity", str(model_dir),
              "--eval-length", str(args.eval_length)]
    if args.eval_rows:
        theirs += ["--eval-rows", str(args.eval_rows)]
    return ours, theirs


def plan_steps(args: argparse.Namespace, model: Path, cal: Path | None) -> list[Step]:
    """Warm-ups, then measurements, then per bitrate the quantizations and their evaluations, then the
    FP16 cross-check and the full conversions: the steps that fill the table come first."""
    work = Path(args.work)
    steps = []
    if EXLLAMAV2 in args.tools:
        steps.append(Step("exllamav2/warmup", EXLLAMAV2, "warmup",
                          [sys.executable, "-c", "import exllamav2, exllamav2.ext"]))
    if EXL2CORE in args.tools:
        steps.append(Step("exl2core/warmup", EXL2CORE, "warmup",
                          [sys.executable, "-m", "exl2core.cli", "doctor"]))
    for tool in args.tools:
        job = work / tool / "measure-job"
        argv = convert_argv(tool, model, job, args, cal) + ["-om", str(work / tool / "measurement.json")]
        steps.append(Step(f"{tool}/measure", tool, "measure", argv, clear=[job]))
    for bits in args.bits:
        for tool in args.tools:
            base = work / tool / f"{bits}"
            out = base / "model"
            argv = convert_argv(tool, model, base / "job", args, cal)
            argv += ["-m", str(work / tool / "measurement.json"), "-b", str(bits), "-cf", str(out)]
            steps.append(Step(f"{tool}/quant-{bits}", tool, "quant", argv, bits, out,
                              needs=[f"{tool}/measure"], clear=[base]))
        if args.no_eval:
            continue
        for tool in args.tools:
            ours, theirs = eval_argvs(work / tool / f"{bits}" / "model", model, args)
            steps.append(Step(f"{tool}/eval-{bits}", tool, "eval", ours, bits,
                              needs=[f"{tool}/quant-{bits}"]))
            if not args.no_exllamav2_eval:
                steps.append(Step(f"{tool}/ev2ppl-{bits}", tool, "ev2ppl", theirs, bits,
                                  needs=[f"{tool}/quant-{bits}"]))
    if not args.no_eval and not args.no_exllamav2_eval:
        steps.append(Step("fp16/ev2ppl", "fp16", "ev2ppl", eval_argvs(model, None, args)[1]))
    if args.full_bits is not None:
        for tool in args.tools:
            base = work / tool / f"full-{args.full_bits}"
            argv = convert_argv(tool, model, base / "job", args, cal)
            argv += ["-b", str(args.full_bits), "-cf", str(base / "model")]
            steps.append(Step(f"{tool}/full-{args.full_bits}", tool, "full", argv, args.full_bits,
                              base / "model", clear=[base]))
    return steps


# -- running a step -----------------------------------------------------------------------------------------


class GpuMemoryPoller:
    """Peak device memory in use (MiB) on GPU 0 while a step runs, above what was in use before it.

    Read from the driver (NVML, else ``nvidia-smi``), so a subprocess of either tool is measured the
    same way whatever its allocator does; None where neither is available."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self._read = self._nvml_reader() or self._smi_reader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = self._peak = None

    @staticmethod
    def _nvml_reader():
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML library, no driver, no device: fall back to nvidia-smi
            return None
        return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20

    @staticmethod
    def _smi_reader():
        if shutil.which("nvidia-smi") is None:
            return None

        def read() -> float | None:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True)
            try:
                return float(out.stdout.split()[0])
            except (IndexError, ValueError):
                return None

        return read

    def start(self) -> None:
        if self._read is None:
            return
        self._baseline = self._peak = self._read()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            if value is not None and (self._peak is None or value > self._peak):
                self._peak = value

    def stop(self) -> float | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        if self._peak is None or self._baseline is None:
            return None
        return self._peak - self._baseline


class HostMemoryPoller:
    """Peak resident memory (MiB) of one process: its kernel high-water mark (``VmHWM``), read until it
    exits. Linux only; None elsewhere or if the process ended before the first reading."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.path = Path(f"/proc/{pid}/status")
        self.interval = interval
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            text = self.path.read_text()
        except OSError:  # the process is gone (or this is not Linux): keep the last reading
            return
        match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
        if match:
            self.peak = int(match.group(1)) / 1024

    def _poll(self) -> None:
        self._read()
        while not self._stop.wait(self.interval):
            self._read()

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.peak


def status_stage(line: str) -> str | None:
    """The stage named by a status line: exllamav2's ``[STATUS]{…}[/STATUS]`` or exl2core's JSON line."""
    match = STATUS_RE.search(line)
    text = match.group(1) if match else line.strip()
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    stage = obj.get("stage") if isinstance(obj, dict) else None
    return stage if isinstance(stage, str) and stage and stage != "finished" else None


def stage_times(marks: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds per stage from ``(time, stage)`` marks: a stage lasts until the next one starts; time
    before the first mark is ``start-up`` (imports, reading the model); a repeated stage adds up."""
    times: dict[str, float] = {}
    points = [(0.0, "start-up"), *marks, (end, "")]
    for (t0, stage), (t1, _) in zip(points, points[1:]):
        times[stage] = times.get(stage, 0.0) + (t1 - t0)
    return {stage: round(seconds, 2) for stage, seconds in times.items()}


def last_json(lines) -> dict | None:
    """The last line that is a JSON object, parsed (the result line of eval and perplexity steps)."""
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("{") and text.endswith("}"):
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            if isinstance(obj, dict) and "stage" not in obj:
                return obj
    return None


def run_step(step: Step, log_dir: Path, timeout: float | None) -> dict:
    """Run ``step``, streaming its output to a log with timestamps; returns its record."""
    for path in step.clear:
        shutil.rmtree(path, ignore_errors=True)
    log_path = log_dir / f"{step.name.replace('/', '_')}.log"
    poller = GpuMemoryPoller()
    marks: list[tuple[float, str]] = []
    tail: deque[str] = deque(maxlen=400)
    env = {**os.environ, **RUN_ENV}
    poller.start()
    start = time.monotonic()
    killed = threading.Event()

    def kill(proc: subprocess.Popen) -> None:
        killed.set()
        proc.kill()

    try:
        with open(log_path, "w", encoding="utf-8") as log, \
                subprocess.Popen(step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=env, errors="replace") as proc:
            log.write("$ " + shlex.join(step.argv) + "\n")
            host = HostMemoryPoller(proc.pid)
            timer = threading.Timer(timeout, kill, (proc,)) if timeout else None
            if timer:
                timer.start()
            for line in proc.stdout:
                now = time.monotonic() - start
                log.write(f"[{now:9.2f}] {line}")
                tail.append(line.rstrip("\n"))
                stage = status_stage(line)
                if stage and (not marks or marks[-1][1] != stage):
                    marks.append((now, stage))
            rc = proc.wait()
            peak_rss = host.stop()
            if timer:
                timer.cancel()
    except OSError as e:
        poller.stop()
        return {"ok": False, "error": f"could not start: {e}"}
    wall = time.monotonic() - start
    record = {"ok": rc == 0, "rc": rc, "wall_s": round(wall, 2), "stages": stage_times(marks, wall),
              "peak_gpu_mib": poller.stop(), "peak_rss_mib": peak_rss, "log": str(log_path)}
    if killed.is_set():
        record.update(ok=False, error=f"killed after {timeout:.0f} s (--step-timeout)")
    elif rc != 0:
        record["error"] = _error_line(tail) or f"exit status {rc}"
    if step.kind in ("eval", "ev2ppl"):
        record["result"] = last_json(tail)
        if record["ok"] and record["result"] is None:
            record.update(ok=False, error="no result line in the output")
    if step.output is not None and record["ok"]:
        try:
            record["stored"] = stored_size(step.output)
        except Exception as e:  # an unreadable output is a result to report, not a reason to stop
            record["stored"] = {"error": f"{type(e).__name__}: {e}"}
    return record


def _error_line(lines) -> str:
    """The most telling line of a failed step's output: the last error-looking line, else the last line."""
    for line in reversed(lines):
        if re.search(r"error|Error|##|Traceback|assert", line):
            return line.strip()[:200]
    return next((line.strip()[:200] for line in reversed(lines) if line.strip()), "")


# -- what the outputs hold ----------------------------------------------------------------------------------


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
                "BOOL": 1}


def stored_size(model_dir: Path) -> dict:
    """Bits per weight of the packed decoder linears as stored (every tensor under a quantized linear's
    prefix, bias included, over its ``K × N_padded`` weights; the head excluded) and the total size of
    the safetensors files, counted the same way for both tools' outputs."""
    from safetensors import safe_open

    shapes: dict[str, tuple[list[int], str]] = {}
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        total += path.stat().st_size
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                shapes[key] = (piece.get_shape(), piece.get_dtype())
    bits = weights = 0
    for key, (shape, _) in shapes.items():
        if not key.endswith(".q_weight") or key.split(".")[-2] == "lm_head":
            continue
        prefix = key[: -len("q_weight")]
        weights += shapes[prefix + "q_invperm"][0][0] * shape[1]
        for other, (other_shape, dtype) in shapes.items():
            if other.startswith(prefix) and "." not in other[len(prefix):]:
                bits += math.prod(other_shape) * _DTYPE_BYTES.get(dtype, 4) * 8
    return {"decoder_bpw": round(bits / weights, 4) if weights else None, "size_mib": round(total / 2**20, 1)}


def source_size(model_dir: Path) -> dict:
    """Bits per weight of the source's matrices (their storage dtype) and its safetensors size."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if not files:
        return {}
    counts: dict[str, int] = {}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                if len(piece.get_shape()) == 2:
                    dtype = piece.get_dtype()
                    counts[dtype] = counts.get(dtype, 0) + math.prod(piece.get_shape())
    dtype = max(counts, key=counts.get) if counts else None
    return {"bits": 8 * _DTYPE_BYTES.get(dtype, 0) or "—",
            "size_mib": round(sum(p.stat().st_size for p in files) / 2**20, 1)}


# -- calibration and model ----------------------------------------------------------------------------------


def shared_calibration(path: Path, tokenizer, tokens_needed: int) -> Path:
    """A parquet file (``text`` column) of exl2core's calibration texts, cut into paragraphs-aligned
    chunks and interleaved across files, so any prefix of it mixes every domain. Both converters read a
    parquet file from its start (exl2-format §10.2), so they calibrate on the same tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from exl2core.errors import Exl2Error

    folder = resources.files("exl2core").joinpath("data", "calibration")
    queues = []
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if not item.name.endswith(".txt"):
            continue
        chunks, current = [], ""
        for paragraph in item.read_text(encoding="utf-8").split("\n\n"):
            current = f"{current}\n\n{paragraph}" if current else paragraph
            if len(current) >= SHARED_CHUNK_CHARS:
                chunks.append(current)
                current = ""
        queues.append(chunks + ([current] if current else []))
    rows = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    available = sum(len(tokenizer.encode(r, add_special_tokens=False).ids) for r in rows)
    if available < tokens_needed:
        raise Exl2Error(f"the shared calibration text holds {available} tokens, fewer than the "
                        f"{tokens_needed} asked for; use fewer rows or shorter rows")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": rows}), str(path))
    return path


def calibration_choice(args: argparse.Namespace) -> str:
    """``builtin``, ``shared`` or a parquet path, after the rule for non-default row counts."""
    if args.cal != "builtin":
        return args.cal
    changed = (args.measurement_rows, args.rows) != (DEFAULT_ROWS["measurement_rows"], DEFAULT_ROWS["rows"])
    return "shared" if changed else "builtin"


def prepare_model(args: argparse.Namespace) -> Path:
    """The FP16 HF directory: ``--model`` (a directory, or a GGUF file dequantized once into WORK), else
    exl2core's default model (SmolLM2-135M-Instruct)."""
    if args.model is None:
        from exl2core.model.gguf_import import default_model_dir

        return default_model_dir()
    model = Path(args.model)
    if model.suffix.lower() != ".gguf":
        return model
    from exl2core.model.gguf_import import gguf_to_hf

    target = Path(args.work) / "fp16" / f"{model.stem}-fp16"
    if not (target / "model.safetensors").is_file():
        shutil.rmtree(target, ignore_errors=True)
        gguf_to_hf(model, target)
    return target


# -- the report ---------------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _cell(record: dict | None, text) -> str:
    if record is None:
        return "not run"
    if record.get("skipped"):
        return "not run"
    if not record.get("ok"):
        return f"failed: {record.get('error', '?')[:120]}".replace("|", "\\|")
    return text(record)


def _versions() -> str:
    import torch

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"exllamav2 {version('exllamav2')}, exl2core {version('exl2core')}, torch {torch.__version__}"


def gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown GPU"


PASS_LABELS = {"warmup": "one-time build", "measure": "measurement (-om)", "quant": "quantization (-m)",
               "full": "full conversion"}


def render(args: argparse.Namespace, model: Path, cal: str, results: dict, steps: list[Step],
           command: str) -> str:
    """The markdown section: settings, the passes table and the quality table."""
    if cal == "builtin":
        cal_text = "each tool's built-in set (exllamav2: its fixed row counts; exl2core: -mr/-r rows)"
    else:
        origin = "built from exl2core/data/calibration" if cal == "shared" else cal
        cal_text = f"one parquet file for both ({origin})"
    windows = f"{args.eval_rows or 'all'} windows × {args.eval_length} tokens"
    lines = [
        f"## exllamav2 vs exl2core conversion: {model.name}, {gpu_name()} ({date.today().isoformat()})",
        "",
        f"`{command}`",
        "",
        f"{_versions()}; EXLLAMA_NO_SDPA=1 for every run. Measurement {args.measurement_rows} × "
        f"{args.measurement_length} tokens, quantization {args.rows} × {args.length}, head "
        f"{args.head_bits} bits; calibration: {cal_text}. Peak GPU memory is the device memory in use "
        "(driver) above what was in use before the pass; peak RSS the converter process's host memory "
        "high-water mark (VmHWM). Quality: exl2core's evaluator on "
        f"{windows} of its held-out text (python-tutorial.txt), KL(FP16 ‖ model) in nats per token; the "
        "last column is the perplexity of the same windows through exllamav2's own forward.",
        "",
        "| pass | bpw | tool | wall (s) | stages (s) | peak GPU (MiB) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for step in steps:
        if step.kind not in PASS_LABELS:
            continue
        record = results.get(step.name)
        stages = ", ".join(f"{k} {v:.1f}" for k, v in (record or {}).get("stages", {}).items()) or "—"
        lines.append(f"| {PASS_LABELS[step.kind]} | {step.bits or '—'} | {step.tool} | "
                     f"{_cell(record, lambda r: _seconds(r['wall_s']))} | "
                     f"{stages if record and record.get('ok') else '—'} | "
                     f"{_mib((record or {}).get('peak_gpu_mib'))} | {_mib((record or {}).get('peak_rss_mib'))} |")
    lines += ["", "| model | stored bpw (decoder) | size (MiB) | perplexity | KL vs FP16 | top-1 vs FP16 | "
                  "perplexity (exllamav2 forward) |", "|---|---|---|---|---|---|---|"]
    ref_ppl = next((r["result"]["ref_perplexity"] for r in results.values()
                    if r.get("ok") and (r.get("result") or {}).get("ref_perplexity")), None)
    source = source_size(model)
    lines.append(f"| source | {source.get('bits', '—')} | {source.get('size_mib', '—')} | "
                 f"{'—' if ref_ppl is None else f'{ref_ppl:.4f}'} | — | — | "
                 f"{_cell(results.get('fp16/ev2ppl'), _ppl)} |")
    for bits in args.bits:
        for tool in args.tools:
            quant = results.get(f"{tool}/quant-{bits}")
            stored = (quant or {}).get("stored") or {}
            ev = results.get(f"{tool}/eval-{bits}")
            lines.append(
                f"| {bits} bpw, {tool} | {stored.get('decoder_bpw') or '—'} | "
                f"{stored.get('size_mib') or '—'} | "
                f"{_cell(ev, _ppl)} | {_cell(ev, _kl)} | {_cell(ev, _top1)} | "
                f"{_cell(results.get(f'{tool}/ev2ppl-{bits}'), _ppl)} |")
    return "\n".join(lines) + "\n"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _ppl(record: dict) -> str:
    return f"{record['result']['perplexity']:.4f}"


def _kl(record: dict) -> str:
    return f"{record['result']['kl_divergence']:.5f}"


def _top1(record: dict) -> str:
    return f"{100 * record['result']['top1_agreement']:.2f} %"


# -- exllamav2's forward perplexity (run as its own subprocess) ---------------------------------------------


def exllamav2_perplexity(model_dir: str, length: int, rows: int | None) -> dict:
    """Perplexity of ``model_dir`` (FP16 or EXL2) through exllamav2's own forward, on the windows
    exl2core's evaluator uses (same text, same tokenization)."""
    os.environ.update(RUN_ENV)  # read by exllamav2 at import time
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    from exl2core.eval.data import load_text, token_windows
    from exl2core.eval.perplexity import WindowScore, score_window
    from exl2core.model.source import SourceModel

    windows = token_windows(SourceModel(model_dir).tokenizer, load_text(), length, rows)
    config = ExLlamaV2Config(model_dir)  # the constructor runs prepare()
    # Without a cache, model.forward() runs a whole window at once, within these preallocated sizes.
    config.max_input_len = max(config.max_input_len, length)
    config.max_attention_size = max(config.max_attention_size, length * length)
    model = ExLlamaV2(config)
    model.load()
    total = WindowScore()
    for ids in windows:
        # Logits come back in fp16, padded to a multiple of 32 columns (padding at −65504): cut to vocab.
        logits = model.forward(ids.unsqueeze(0))[0, :-1, :config.vocab_size]
        total.add(score_window(logits, ids))
    model.unload()
    return {"perplexity": math.exp(total.nll / total.positions), "tokens": total.positions,
            "windows": int(windows.shape[0])}


# -- main ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="FP16 HF directory or a llama GGUF file (default: SmolLM2-135M-Instruct "
                                   "from exl2core's default_model_dir())")
    p.add_argument("--bits", type=float, nargs="+", default=[3.0, 4.0, 5.0], help="target bitrates")
    p.add_argument("--full-bits", type=float, default=4.0,
                   help="bitrate of the timed full conversion per tool (default 4.0)")
    p.add_argument("--no-full", dest="full_bits", action="store_const", const=None,
                   help="skip the full conversions")
    p.add_argument("-hb", "--head-bits", type=int, default=6)
    p.add_argument("-mr", "--measurement-rows", type=int, default=DEFAULT_ROWS["measurement_rows"])
    p.add_argument("-ml", "--measurement-length", type=int, default=DEFAULT_ROWS["measurement_length"])
    p.add_argument("-r", "--rows", type=int, default=DEFAULT_ROWS["rows"])
    p.add_argument("-l", "--length", type=int, default=DEFAULT_ROWS["length"])
    p.add_argument("--cal", default="builtin",
                   help="builtin (each tool's own set), shared (one parquet file of exl2core's texts for "
                        "both) or a parquet file; non-default row counts imply shared")
    p.add_argument("--eval-rows", type=int, help="evaluation windows (default: all the held-out text gives)")
    p.add_argument("--eval-length", type=int, default=2048, help="tokens per evaluation window")
    p.add_argument("--no-eval", action="store_true", help="conversions only")
    p.add_argument("--no-exllamav2-eval", action="store_true", help="skip the exllamav2-forward perplexity")
    p.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    p.add_argument("--device", default="cuda",
                   help="exl2core's device (default cuda; cpu only to try the harness: exllamav2 needs CUDA)")
    p.add_argument("--work", default="work/compare_exllamav2", help="jobs, outputs, logs and results")
    p.add_argument("--append-to", default="bench/RESULTS.md",
                   help="markdown file the finished table is appended to ('' for none)")
    p.add_argument("--step-timeout", type=float, help="kill a step after this many seconds")
    p.add_argument("--redo", action="store_true", help="rerun steps that already succeeded")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--exllamav2-perplexity", metavar="DIR", help=argparse.SUPPRESS)
    return p


def fingerprint(args: argparse.Namespace, model: Path, cal: str) -> dict:
    """What makes a saved step result reusable: the same model, calibration and evaluation settings
    (bitrates and tools are part of the step names)."""
    return {"model": str(model), "cal": cal, "head_bits": args.head_bits,
            "measurement": [args.measurement_rows, args.measurement_length],
            "quant": [args.rows, args.length],
            "eval": [args.eval_rows, args.eval_length]}


def _print_plan(args: argparse.Namespace, steps: list[Step], model: str, cal: str) -> None:
    print(f"model: {model}")
    print(f"tools: {', '.join(args.tools)}; bitrates: {', '.join(map(str, args.bits))}; full conversion: "
          f"{args.full_bits if args.full_bits is not None else 'none'}")
    print(f"measurement {args.measurement_rows} x {args.measurement_length}, quantization {args.rows} x "
          f"{args.length}, head {args.head_bits} bits; calibration: {cal}")
    print(f"work: {args.work}; table appended to: {args.append_to or '(none)'}")
    print(f"environment of every step: {' '.join(f'{k}={v}' for k, v in RUN_ENV.items())}")
    for i, step in enumerate(steps, 1):
        after = f"   (after {', '.join(step.needs)})" if step.needs else ""
        print(f"{i:3d}. {step.name}{after}\n     {shlex.join(step.argv)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.exllamav2_perplexity:
        print(json.dumps(exllamav2_perplexity(args.exllamav2_perplexity, args.eval_length, args.eval_rows)))
        return 0
    from exl2core.errors import Exl2Error

    command = shlex.join(["python", "bench/compare_exllamav2.py", *(sys.argv[1:] if argv is None else argv)])
    work = Path(args.work).resolve()
    args.work = str(work)
    cal = calibration_choice(args)
    cal_path = {"builtin": None, "shared": work / "calibration.parquet"}.get(cal, Path(cal).resolve())
    if args.dry_run:
        shown = Path(args.model or "<default_model_dir(): SmolLM2-135M-Instruct-fp16>")
        if shown.suffix.lower() == ".gguf":
            shown = work / "fp16" / f"{shown.stem}-fp16"
        _print_plan(args, plan_steps(args, shown, cal_path), str(shown), cal)
        return 0
    try:
        model = prepare_model(args)
        if cal == "shared":
            from exl2core.model.source import SourceModel

            needed = max(args.measurement_rows * args.measurement_length, args.rows * args.length)
            shared_calibration(cal_path, SourceModel(model).tokenizer, needed)
    except Exl2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    steps = plan_steps(args, model, cal_path)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / DONE_MARKER).unlink(missing_ok=True)
    results_path = work / RESULTS_JSON
    settings = fingerprint(args, model, cal)
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if saved and saved.get("settings") != settings:
        print(f"{results_path} holds results of other settings: starting over", flush=True)
        saved = {}
    results = saved.get("steps", {})
    for i, step in enumerate(steps, 1):
        if results.get(step.name, {}).get("ok") and not args.redo:
            print(f"[{i}/{len(steps)}] {step.name}: done before, kept", flush=True)
            continue
        missing = [n for n in step.needs if not results.get(n, {}).get("ok")]
        if missing:
            results[step.name] = {"ok": False, "skipped": True, "error": f"{', '.join(missing)} failed"}
            print(f"[{i}/{len(steps)}] {step.name}: skipped ({', '.join(missing)} failed)", flush=True)
            continue
        print(f"[{i}/{len(steps)}] {step.name}: {shlex.join(step.argv)}", flush=True)
        results[step.name] = record = run_step(step, work / "logs", args.step_timeout)
        status = "ok" if record["ok"] else f"FAILED: {record.get('error')}"
        print(f"[{i}/{len(steps)}] {step.name}: {status} ({record.get('wall_s', 0):.1f} s)", flush=True)
        results_path.write_text(json.dumps({"settings": settings, "steps": results}, indent=2) + "\n")
        (work / RESULTS_MD).write_text(render(args, model, cal, results, steps, command))
    table = render(args, model, cal, results, steps, command)
    (work / RESULTS_MD).write_text(table)
    if args.append_to:
        with open(args.append_to, "a", encoding="utf-8") as f:
            f.write("\n" + table)
    (work / DONE_MARKER).write_text("")
    print(table)
    return 0 if all(results.get(s.name, {}).get("ok") for s in steps) else 2


if __name__ == "__main__":
    sys.exit(main())
