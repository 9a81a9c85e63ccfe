"""Fingerprints of every test architecture's conversion output, to show that a refactor changes no byte.

    .venv/bin/python tests/output_bytes.py --work /tmp/ob record baseline.json   # before the change
    .venv/bin/python tests/output_bytes.py --work /tmp/ob check baseline.json    # after it: exit 1 on a diff

Each case converts a tiny random model (the test suite's builders, one or two layers, 2 × 64 measurement
and 4 × 64 quantization rows) through ``exl2 convert`` and hashes ``measurement.json``, ``job.json``'s plan
digest and strategy, the output ``config.json`` and every output tensor. The source models are written once
under ``--work/src`` and reused, so a check reads the very checkpoints the record did.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from conftest import make_tiny_model, write_bpe_tokenizer  # noqa: E402

DIMS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            vocab_size=320, max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2, intermediate_size=64)
GEMMA_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
              "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}}

#: case → (model_type or "vlm:NAME[:nested]", config overrides, extra convert arguments, environment).
CASES: dict[str, tuple[str, dict, list[str], dict[str, str]]] = {
    "llama": ("llama", dict(num_hidden_layers=2), [], {}),
    "llama-fast": ("llama", dict(num_hidden_layers=2), ["--measure", "fast"], {}),
    "llama-hessian-rs": ("llama", dict(num_hidden_layers=2), ["--measure", "hessian", "-rs", "2.0"], {}),
    "llama-tied-bias": ("llama", dict(num_hidden_layers=1, tie_word_embeddings=True, attention_bias=True,
                                      mlp_bias=True), [], {}),
    "mistral-window": ("mistral", dict(num_hidden_layers=1, sliding_window=16), ["-ra", "1.5"], {}),
    "qwen2": ("qwen2", dict(num_hidden_layers=1), [], {}),
    "mixtral": ("mixtral", dict(num_hidden_layers=1, num_local_experts=4, **MOE), [], {}),
    "mixtral-all-experts": ("mixtral", dict(num_hidden_layers=1, num_local_experts=4, **MOE), [],
                            {"EXL2_MOE_ALL_EXPERTS": "1"}),
    "qwen3-moe": ("qwen3_moe", dict(num_hidden_layers=1, num_experts=4, moe_intermediate_size=64,
                                    norm_topk_prob=True, **MOE), ["--measure", "fast"], {}),
    "cohere": ("cohere", dict(num_hidden_layers=1, use_qk_norm=True), [], {}),
    "cohere2": ("cohere2", dict(num_hidden_layers=2, sliding_window=8, sliding_window_pattern=2),
                ["--measure", "fast"], {}),
    "gemma": ("gemma", dict(num_hidden_layers=1), [], {}),
    "gemma2": ("gemma2", dict(num_hidden_layers=2, sliding_window=8, query_pre_attn_scalar=24,
                              attn_logit_softcapping=10.0, final_logit_softcapping=5.0), [], {}),
    "gemma3-text": ("gemma3_text", dict(num_hidden_layers=2, sliding_window=8, query_pre_attn_scalar=24,
                                        sliding_window_pattern=2, rope_parameters=GEMMA_ROPE), [], {}),
    "llava": ("vlm:llava", {}, [], {}),
    "llava-nested": ("vlm:llava:nested", {}, [], {}),
    "qwen2-vl": ("vlm:qwen2_vl", {}, [], {}),
    "gemma3-vlm": ("vlm:gemma3", {}, [], {}),
    "gemma3-vlm-nested": ("vlm:gemma3:nested", {}, ["--measure", "fast"], {}),
}

CONVERT = ["-mr", "2", "-ml", "64", "-r", "4", "-l", "64", "-b", "4.0", "--device", "cpu"]


def make_source(root: Path, kind: str, overrides: dict) -> Path:
    """The case's source model under ``root`` (written once)."""
    path = root / (kind.replace(":", "-") + "-" + hashlib.sha256(json.dumps(overrides, sort_keys=True)
                                                               .encode()).hexdigest()[:8])
    if (path / "tokenizer.json").is_file():
        return path
    shutil.rmtree(path, ignore_errors=True)
    if kind.startswith("vlm:"):
        from test_vision import make_vlm, to_nested

        _, name, *nested = kind.split(":")
        if nested:
            plain = make_source(root, f"vlm:{name}", overrides)
            to_nested(plain, path, name)
        else:
            make_vlm(path, name, layers=1, bpe=True)
        return path
    model = make_tiny_model(path, kind, **{**DIMS, **overrides})
    if kind.startswith("gemma"):
        with torch.no_grad():
            model.hf.get_input_embeddings().weight.mul_(0.1)
        model.hf.save_pretrained(path)
    write_bpe_tokenizer(path, DIMS["vocab_size"])
    return path


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_hashes(out: Path) -> dict[str, str]:
    from safetensors import safe_open

    hashes = {}
    for shard in sorted(out.glob("output*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                hashes[key] = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode()
                                             + t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
    return hashes


def run_case(work: Path, name: str) -> dict:
    from exl2core.cli import main

    kind, overrides, extra, env = CASES[name]
    src = make_source(work / "src", kind, overrides)
    job, out = work / "jobs" / name, work / "out" / name
    shutil.rmtree(job, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(["convert", "-i", str(src), "-o", str(job), "-cf", str(out), *CONVERT, *extra])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if code != 0:
        raise SystemExit(f"{name}: exl2 convert exited with {code}")
    state = json.loads((job / "job.json").read_text())["state"]
    return {
        "measurement.json": file_hash(job / "measurement.json"),
        "config.json": file_hash(out / "config.json"),
        "shards": {p.name: file_hash(p) for p in sorted(out.glob("output*.safetensors"))},
        "tensors": tensor_hashes(out),
        "plan_digest": state["plan_digest"],
        "strategy": hashlib.sha256(json.dumps(state["strategy"], sort_keys=True).encode()).hexdigest()[:16],
    }


def diff(name: str, want: dict, got: dict) -> list[str]:
    lines = []
    for key in sorted(set(want) | set(got)):
        a, b = want.get(key), got.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            bad = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            lines.append(f"{name}: {key} differ: {', '.join(bad[:8])}{' …' if len(bad) > 8 else ''}")
        else:
            lines.append(f"{name}: {key} {a} → {b}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (sources are kept)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--ignore", nargs="*", default=[], help="fingerprint keys not compared (plan_digest)")
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("file", type=Path, help="the recorded fingerprints (JSON)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recorded = json.loads(args.file.read_text()) if args.file.is_file() else {}
    problems = []
    for name in args.cases:
        got = run_case(args.work, name)
        if args.mode == "record":
            recorded[name] = got
            args.file.write_text(json.dumps(recorded, indent=1, sort_keys=True))
            print(f"{name}: recorded ({len(got['tensors'])} tensors)", flush=True)
        else:
            want = {k: v for k, v in recorded.get(name, {}).items() if k not in args.ignore}
            lines = diff(name, want, {k: v for k, v in got.items() if k not in args.ignore})
            problems += lines
            print("\n".join(lines) if lines else f"{name}: identical ({len(got['tensors'])} tensors)", flush=True)
    if problems:
        print(f"{len(problems)} difference(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
