"""The source model: config, tokenizer and a lazy, memory-mapped index of its safetensors.

Only shard headers are read up front; a tensor's data is read when it is asked for, so a converter
holding a 70B model open uses no more memory than the module it is working on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from exl2core.errors import Exl2Error
from exl2core.model.config import ModelConfig
from exl2core.plan import Module
from exl2core.plugins import Plugins, installed

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SourceModel:
    """A HuggingFace model directory opened for reading; its config is read with ``plugins``' defaults
    (the installed plugins unless given)."""

    def __init__(self, model_dir: str | Path, plugins: Plugins | None = None):
        self.path = Path(model_dir)
        if not self.path.is_dir():
            raise Exl2Error(f"{model_dir}: no such model directory")
        self.config: ModelConfig = (plugins or installed()).load_config(self.path)
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for shard in self._shard_files():
            handle = self._open(shard)
            for key in handle.keys():
                if key in self._file_of:
                    raise Exl2Error(f"{self.path}: tensor {key!r} is in both {self._file_of[key].name} "
                                    f"and {shard.name}; remove the stray file")
                self._file_of[key] = shard
                self._shapes[key] = tuple(handle.get_slice(key).get_shape())

    def _shard_files(self) -> list[Path]:
        """The files holding the weights: the index's shards, model.safetensors, else every *.safetensors."""
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise Exl2Error(f"{index}: unreadable safetensors index ({e})") from None
            shards = [self.path / name for name in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise Exl2Error(f"{self.path}: shard {missing[0]} named in {INDEX_FILE} is missing")
            return shards
        if (self.path / SINGLE_FILE).is_file():
            return [self.path / SINGLE_FILE]
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise Exl2Error(f"{self.path}: no .safetensors weights "
                            "(only safetensors checkpoints are supported)")
        return shards

    def _open(self, shard: Path):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(shard), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise Exl2Error(f"{shard}: unreadable safetensors file, truncated or corrupt ({e})") from None
        return self._handles[shard]

    def keys(self) -> list[str]:
        return list(self._file_of)

    def has(self, key: str) -> bool:
        return key in self._file_of

    def _require(self, key: str) -> Path:
        if key not in self._file_of:
            raise Exl2Error(f"{self.path}: the checkpoint has no tensor {key!r}")
        return self._file_of[key]

    def shape(self, key: str) -> tuple[int, ...]:
        self._require(key)
        return self._shapes[key]

    def tensor(self, key: str, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Read one tensor from its shard (nothing else is read), optionally cast and moved."""
        shard = self._require(key)
        try:
            t = self._open(shard).get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise Exl2Error(f"{shard}: cannot read tensor {key!r} ({e})") from None
        return t.to(device=device, dtype=dtype)

    def finite_tensor(self, key: str, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
        """``tensor``, refusing one with NaN or infinite values: a damaged checkpoint would otherwise
        surface much later as non-finite activations of some module, with the tensor unnamed."""
        raw = self.tensor(key)
        t = raw.to(device=device, dtype=dtype)
        if t.is_floating_point() and not torch.isfinite(t.sum(dtype=torch.float32)):
            problem = non_finite_summary(raw)
            if problem:
                raise Exl2Error(f"{self._file_of[key].name}: source tensor {key!r} holds {problem}; the "
                                "checkpoint is damaged, re-download or repair it")
            overflow = non_finite_summary(t)
            if overflow:
                raise Exl2Error(f"source tensor {key!r}: {overflow} after conversion to {dtype} (values "
                                f"beyond its range, largest magnitude {raw.abs().max().item():.4g})")
        return t

    def module_weights(self, module: Module, dtype: torch.dtype | None, device: torch.device | str | None,
                       skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """The weight dict a module's forward takes: linears by name (``name.bias`` for biases) and the
        module's unquantized tensors by role. Names in ``skip`` are not read (the caller supplies them)."""
        skip = set(skip)
        wanted: dict[str, str] = {}
        rows: dict[str, tuple[tuple[int, int], ...]] = {}  # linears that are row blocks of a fused tensor
        transposed = set()  # weights stored [in, out]
        normalized = {lin.name for lin in module.linears if lin.normalized}  # rows scaled to unit norm
        for lin in module.linears:
            wanted[lin.name] = lin.source + lin.weight_suffix
            if lin.bias:
                wanted[lin.name + ".bias"] = lin.source + ".bias"
            if lin.rows is not None:
                rows[lin.name] = rows[lin.name + ".bias"] = lin.row_ranges()
            if lin.transposed:
                transposed.add(lin.name)
        wanted.update(module.tensors)
        weights = {name: self.finite_tensor(key, dtype, device) for name, key in wanted.items()
                   if name not in skip}
        for name in transposed & weights.keys():
            weights[name] = weights[name].T.contiguous()
        for name, ranges in rows.items():
            if name in weights:
                weights[name] = torch.cat([weights[name][start:end] for start, end in ranges]).contiguous()
        for lin in module.linears:
            if lin.columns is not None and lin.name in weights:
                weights[lin.name] = weights[lin.name][:, lin.columns[0]:lin.columns[1]].contiguous()
        for name in normalized & weights.keys():
            w = weights[name]
            weights[name] = torch.nn.functional.normalize(w.float(), dim=1).to(w.dtype)
        # Closing the shards unmaps them: pages read through an open map stay in this process's resident
        # memory, so a long conversion would otherwise hold every layer's file pages it ever read.
        self._handles.clear()
        return weights

    @property
    def tokenizer(self):
        """The HF tokenizer (``tokenizers.Tokenizer``) read from tokenizer.json."""
        from tokenizers import Tokenizer

        path = self.path / "tokenizer.json"
        if not path.is_file():
            raise Exl2Error(f"{self.path}: no tokenizer.json (exllamav2 needs the HF tokenizers format)")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises bare Exception subclasses
            raise Exl2Error(f"{path}: unreadable tokenizer ({e})") from None

    def numel(self) -> int:
        """Total element count of every tensor in the checkpoint (from the headers alone)."""
        return sum(math.prod(shape) for shape in self._shapes.values())


def non_finite_summary(t: torch.Tensor) -> str:
    """"3 non-finite values (2 NaN, 1 inf) of 4096" for a tensor with any, else ""."""
    if not t.is_floating_point():
        return ""
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    if not nan + inf:
        return ""
    return (f"{nan + inf} non-finite value{'s' if nan + inf > 1 else ''} ({nan} NaN, {inf} inf) "
            f"of {t.numel()}")
