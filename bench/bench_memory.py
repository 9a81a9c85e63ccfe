"""Peak memory of a conversion at Llama-2-7B and Llama-2-70B layer widths, on synthetic random weights.

    python bench/bench_memory.py --shape 7b --depths 1 2 4 --device cpu      # host RAM against depth
    python bench/bench_memory.py --shape 70b --depths 2 --device cuda         # both converters, GPU memory

For each depth a Llama model with the layer widths of ``--shape`` (7b: hidden 4096, MLP 11008, 32 heads;
70b: hidden 8192, MLP 28672, 64 heads, 8 KV heads) and random FP16 weights is written under ``--work``
(tokenizer and vocabulary from ``--tokenizer-from``, by default SmolLM2-135M's). Each model goes through
``compare_exllamav2.py`` (measurement, then one quantization), which records every pass's wall time, peak
GPU memory (driver) and the converter process's peak RSS. The table lines the depths up: a converter whose
memory is bounded by one layer plus the calibration state shows the same peaks at every depth, and the
columns on the right give those two sizes for comparison.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import compare_exllamav2 as compare

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
#: Standard deviation of the random weights (the Llama initializer's), so activations stay in fp16 range.
INIT_STD = 0.02


def layer_tensors(shape: dict, layer: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random FP16 tensors of one decoder layer in HF Llama naming."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    prefix = f"model.layers.{layer}"
    dims = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
            "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
    tensors = {f"{prefix}.{name}.weight": (torch.randn(dim, generator=gen) * INIT_STD).half()
               for name, dim in dims.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"{prefix}.{norm}.weight"] = torch.ones(hidden, dtype=torch.float16)
    return tensors


def write_model(path: Path, shape: dict, depth: int, tokenizer_dir: Path, vocab: int) -> Path:
    """A ``depth``-layer synthetic Llama at ``path`` (one shard per layer plus one for embedding, norm and
    head), skipped if already complete."""
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape,
              "num_hidden_layers": depth, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "float16",
              "hidden_act": "silu"}
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    gen = torch.Generator().manual_seed(0)
    hidden = shape["hidden_size"]
    shards = {f"layer-{i:03d}.safetensors": (lambda i=i: layer_tensors(shape, i, gen)) for i in range(depth)}
    shards["outer.safetensors"] = lambda: {
        "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * INIT_STD).half(),
        "model.norm.weight": torch.ones(hidden, dtype=torch.float16),
        "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * INIT_STD).half()}
    weight_map = {}
    for file, make in shards.items():
        tensors = make()
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return path


def sizes_mib(shape: dict, args: argparse.Namespace) -> tuple[float, float]:
    """One decoder layer's FP16 weights and the quantization pass's calibration state (fp32 hidden states
    on the CPU, fp16 on a GPU, an input and an output copy), in MiB."""
    hidden, inner = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * hidden // shape["num_attention_heads"]
    layer = 2 * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * inner)
    width = 2 if args.device.startswith("cuda") else 4
    rows = max(args.rows * args.length, args.measurement_rows * args.measurement_length)
    return layer / 2**20, 2 * rows * hidden * width / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="7b")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2], help="decoder layers of each model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tools", nargs="+", choices=compare.TOOLS, help="default: both on CUDA, exl2core on CPU")
    p.add_argument("--bits", type=float, default=4.0)
    p.add_argument("-mr", "--measurement-rows", type=int, default=2)
    p.add_argument("-ml", "--measurement-length", type=int, default=512)
    p.add_argument("-r", "--rows", type=int, default=8)
    p.add_argument("-l", "--length", type=int, default=512)
    p.add_argument("--tokenizer-from", help="HF directory or GGUF file whose tokenizer and vocabulary to use "
                                            "(default: exl2core's SmolLM2-135M-Instruct)")
    p.add_argument("--work", default="work/bench_memory")
    p.add_argument("--step-timeout", type=float)
    p.add_argument("--append-to", default="", help="append the table to this file (e.g. bench/RESULTS.md)")
    args = p.parse_args(argv)
    tools = args.tools or (list(compare.TOOLS) if args.device.startswith("cuda") else [compare.EXL2CORE])
    work = Path(args.work).resolve()

    tokenizer_dir = compare.prepare_model(argparse.Namespace(model=args.tokenizer_from, work=str(work)))
    shape = SHAPES[args.shape]
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    layer_mib, state_mib = sizes_mib(shape, args)
    rows = ["| depth | pass | tool | wall (s) | peak RSS (MiB) | peak GPU (MiB) |", "|---|---|---|---|---|---|"]
    status = 0
    for depth in args.depths:
        model = write_model(work / f"{args.shape}-{depth}L", shape, depth, tokenizer_dir, vocab)
        run_dir = work / f"run-{args.shape}-{depth}L"
        status |= compare.main([
            "--model", str(model), "--bits", str(args.bits), "--no-full", "--no-eval", "--tools", *tools,
            "--device", args.device, "-mr", str(args.measurement_rows), "-ml", str(args.measurement_length),
            "-r", str(args.rows), "-l", str(args.length), "--work", str(run_dir), "--append-to", "",
            *(["--step-timeout", str(args.step_timeout)] if args.step_timeout else [])])
        steps = json.loads((run_dir / compare.RESULTS_JSON).read_text())["steps"]
        for tool in tools:
            for name, label in ((f"{tool}/measure", "measurement"), (f"{tool}/quant-{args.bits}", "quantization")):
                record = steps.get(name, {})
                wall = f"{record['wall_s']:.1f}" if record.get("ok") else f"failed: {record.get('error')}"
                rows.append(f"| {depth} | {label} | {tool} | {wall} | {compare._mib(record.get('peak_rss_mib'))} "
                            f"| {compare._mib(record.get('peak_gpu_mib'))} |")
    command = shlex.join(["python", "bench/bench_memory.py", *(sys.argv[1:] if argv is None else argv)])
    table = "\n".join([
        f"## Peak memory against depth: Llama-2-{args.shape.upper()} layer widths, random weights",
        "", f"`{command}`", "",
        f"Device {args.device}; measurement {args.measurement_rows} × {args.measurement_length} tokens, "
        f"quantization {args.rows} × {args.length}, {args.bits} bpw, vocabulary {vocab}. One decoder layer's "
        f"FP16 weights: {layer_mib:,.0f} MiB; calibration state (input and output hidden states of the "
        f"larger pass): {state_mib:,.0f} MiB.", "", *rows, ""])
    print(table)
    if args.append_to:
        with open(args.append_to, "a", encoding="utf-8") as f:
            f.write("\n" + table)
    return status


if __name__ == "__main__":
    sys.exit(main())
