"""Compilation: packed and unquantized tensors into sharded safetensors, plus config and files.

Shards are filled greedily in module order and never exceed the shard size unless one tensor alone
does. With ``compile_full`` every non-tensor file of the source is copied and config.json gains the
``quantization_config`` block exllamav2 writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from exl2core.errors import Exl2Error
from exl2core.model.source import SourceModel
from exl2core.plan import ModelPlan
from exl2core.pipeline.job import WriteError, atomic_write, disk_error, load_tensors, save_tensors, write_json
from exl2core.pipeline.quantize import tensor_file

LOADABLE = (torch.int32, torch.int16, torch.float16, torch.bfloat16, torch.float32)
SHARD_UNLIMITED = 1024 ** 4


def module_tensors(plan: ModelPlan, source: SourceModel, tensor_dir: Path):
    """Yield, module by module, the ``{output name: tensor}`` the compiled model holds."""
    for module in plan.modules:
        tensors = {}
        for key in module.tensors.values():
            tensors[plan.output_name(key)] = source.tensor(key, dtype=torch.float16)
        for lin in module.linears:
            path = tensor_file(tensor_dir, lin)
            if not path.is_file():
                raise Exl2Error(f"{path} is missing; rerun the conversion to requantize it")
            tensors.update(load_tensors(path))
        yield tensors
    carried = {}
    for prefix in plan.carry:
        for key in source.keys():
            if key.startswith(prefix):
                t = source.tensor(key)
                if t.dtype not in LOADABLE:
                    t = t.to(torch.float32 if t.is_floating_point() else torch.int32)
                carried[plan.output_name(key)] = t
    yield carried


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_shards(chunks, target: Path, shard_mb: float) -> list[Path]:
    """Write the tensors of ``chunks`` into ``output*.safetensors`` shards in ``target``.

    Shards are written under temporary names and renamed once all exist; if a write fails (disk full,
    read-only), every temporary shard is removed and the error names ``target``.
    """
    limit = SHARD_UNLIMITED if shard_mb <= 0 else int(shard_mb * 1024 ** 2)
    for old in list(target.glob("output*.safetensors")) + list(target.glob(".output*")):
        try:
            old.unlink()
        except OSError as e:
            raise disk_error(old, e) from None
    written: list[Path] = []
    pending: dict[str, torch.Tensor] = {}

    def flush(final: bool) -> None:
        while pending and (final or sum(map(_nbytes, pending.values())) > limit):
            shard, size = {}, 0
            for name, t in list(pending.items()):
                if size + _nbytes(t) <= limit or not shard and _nbytes(t) > limit:
                    shard[name] = pending.pop(name)
                    size += _nbytes(t)
            path = target / f".output_temp_{len(written) + 1}.safetensors"
            written.append(path)
            save_tensors(path, shard)

    try:
        for chunk in chunks:
            overlap = pending.keys() & chunk.keys()
            if overlap:
                raise Exl2Error(f"two tensors map to the same output name {sorted(overlap)[0]!r}")
            pending.update(chunk)
            flush(final=False)
        flush(final=True)
    except WriteError as e:
        for path in written:
            path.unlink(missing_ok=True)
        raise WriteError(f"the model's shards in {target}", e.reason) from None
    n = len(written)
    final = []
    for i, path in enumerate(written, 1):
        name = "output.safetensors" if n == 1 else f"output-{i:05d}-of-{n:05d}.safetensors"
        path.replace(target / name)
        final.append(target / name)
    return final


def copy_source_files(in_dir: Path, out_dir: Path) -> None:
    """Copy every top-level non-tensor file: never weights (.safetensors, .bin) nor their index."""
    for path in sorted(in_dir.iterdir()):
        name = path.name
        if not path.is_file() or name.endswith((".safetensors", ".bin", ".safetensors.index.json",
                                                 ".bin.index.json")):
            continue
        atomic_write(out_dir / name, lambda p, src=path: shutil.copyfile(src, p))


def with_classic_keys(section: dict) -> dict:
    """Add the classic keys exllamav2 0.3.2 reads (``rope_theta``, ``rope_scaling``, ``partial_rotary_factor``,
    ``rope_local_base_freq``, ``sliding_window_pattern``) to a config section written in the
    transformers-5 style (``rope_parameters``, ``layer_types``); keys already present are kept."""
    params = section.get("rope_parameters")
    if isinstance(params, dict) and params:
        nested = all(isinstance(v, dict) for v in params.values())
        main = params.get("full_attention", next(iter(params.values()))) if nested else params
        if "rope_theta" in main:
            section.setdefault("rope_theta", main["rope_theta"])
        if "partial_rotary_factor" in main:
            section.setdefault("partial_rotary_factor", main["partial_rotary_factor"])
        if main.get("rope_type", "default") != "default":
            section.setdefault("rope_scaling", {k: v for k, v in main.items() if k != "rope_theta"})
        if nested and "rope_theta" in params.get("sliding_attention", {}):
            section.setdefault("rope_local_base_freq", params["sliding_attention"]["rope_theta"])
    types = section.get("layer_types")
    if isinstance(types, list) and "full_attention" in types:
        period = types.index("full_attention") + 1
        if all((t == "full_attention") == ((i + 1) % period == 0) for i, t in enumerate(types)):
            section.setdefault("sliding_window_pattern", period)
    return section


def with_classic_vision_keys(section: dict) -> dict:
    """Add the ``vision_config`` keys exllamav2 0.3.2 requires and transformers 5 no longer writes:
    ``rope_theta`` (Pixtral, now inside ``rope_parameters``) and ``spatial_patch_size`` (Qwen2-VL, equal to
    ``patch_size``); keys already present are kept."""
    params = section.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        section.setdefault("rope_theta", params["rope_theta"])
    if str(section.get("model_type", "")).startswith("qwen2") and "patch_size" in section:
        section.setdefault("spatial_patch_size", section["patch_size"])
    return section


def write_quantization_config(config_path: Path, bits: float, head_bits: int, rows: int, length: int,
                              dataset: str, output_config=None) -> None:
    """The copied config.json, rewritten by the plan's ``output_config`` when it has one, with the classic
    keys and the ``quantization_config`` block."""
    config = json.loads(config_path.read_text())
    if output_config is not None:
        config = output_config(config)
    config = with_classic_keys(config)
    if isinstance(config.get("text_config"), dict):
        with_classic_keys(config["text_config"])
    if isinstance(config.get("vision_config"), dict):
        with_classic_vision_keys(config["vision_config"])
    config["quantization_config"] = {
        "quant_method": "exl2",
        "version": "0.3.2",
        "bits": float(bits),
        "head_bits": int(head_bits),
        "calibration": {"rows": int(rows), "length": int(length), "dataset": dataset},
    }
    write_json(config_path, config)
