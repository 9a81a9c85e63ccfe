"""EXL2 tensor layout (exl2-format §2): worked example §2.11, validated layouts, round trips, size accounting."""

from __future__ import annotations

import pytest
import torch

from exl2core.errors import Exl2Error
from exl2core.quant.pack import (
    dequantize,
    make_q_groups,
    pack_codes,
    pack_scales,
    unpack_codes,
    unpack_scales,
)
from exl2core.quant.qparams import QParams


def hex_words(column: torch.Tensor) -> list[str]:
    return [f"{v & 0xFFFFFFFF:08x}" for v in column.tolist()]


def reference_pack(codes: torch.Tensor, group_bits: list[int], group_rows: list[int]) -> torch.Tensor:
    """Independent, literal bit-stream packer of exl2-format §2.5 (one Python int per column and group)."""
    words = []
    start = 0
    for bits, rows in zip(group_bits, group_rows):
        block = [[0] * codes.shape[1] for _ in range(rows * bits // 32)]
        for n in range(codes.shape[1]):
            stream = 0
            for i in range(rows):
                stream |= int(codes[start + i, n]) << (i * bits)
            for w in range(len(block)):
                block[w][n] = (stream >> (32 * w)) & 0xFFFFFFFF
        words += block
        start += rows
    return torch.tensor(words, dtype=torch.int64)


def random_layer(qp: QParams, k: int, n: int, seed: int, bias: bool = False) -> dict[str, torch.Tensor]:
    """A packed layer with random codes, scales and permutation for the given setting."""
    gen = torch.Generator().manual_seed(seed)
    groups = qp.groups(k)
    bits = [b for b, _ in groups]
    rows = [r for _, r in groups]
    codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=gen) for b, r in groups])
    qscale = torch.randint(1, 17, (len(groups), n), generator=gen)
    perm = torch.randperm(k, generator=gen)
    tensors = {
        "q_weight": pack_codes(codes, bits, rows),
        "q_scale": pack_scales(qscale),
        "q_scale_max": (torch.rand(len(groups), generator=gen) * 0.1 + 0.01).half(),
        "q_groups": make_q_groups(bits, rows),
        "q_invperm": torch.argsort(perm).to(torch.int32),
    }
    if bias:
        tensors["bias"] = torch.randn(n, generator=gen).half()
    tensors["_codes"], tensors["_qscale"], tensors["_perm"] = codes, qscale, perm
    return tensors


def on_disk(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith("_")}


@pytest.fixture()
def worked_example() -> dict[str, torch.Tensor]:
    k, n = 64, 32
    rows = torch.arange(32).unsqueeze(1)
    cols = torch.arange(n).unsqueeze(0)
    codes = torch.cat([(rows % 16).expand(32, n), (rows + cols) % 8])
    qscale = torch.stack([torch.full((n,), 16), torch.full((n,), 4)])
    qscale[0, 1] = 8
    perm = (5 * torch.arange(k)) % k
    return {
        "q_weight": pack_codes(codes, [4, 3], [32, 32]),
        "q_scale": pack_scales(qscale),
        "q_scale_max": torch.tensor([0.5, 2.0], dtype=torch.float16),
        "q_groups": make_q_groups([4, 3], [32, 32]),
        "q_invperm": torch.argsort(perm).to(torch.int32),
        "_codes": codes,
    }


def test_worked_example_packed_words(worked_example):
    q_weight = worked_example["q_weight"]
    assert q_weight.dtype == torch.int32 and tuple(q_weight.shape) == (7, 32)
    assert hex_words(q_weight[:, 0]) == [
        "76543210", "fedcba98", "76543210", "fedcba98", "88fac688", "c688fac6", "fac688fa"]
    assert hex_words(q_weight[:, 1]) == [
        "76543210", "fedcba98", "76543210", "fedcba98", "d11f58d1", "58d11f58", "1f58d11f"]
    assert worked_example["q_groups"].tolist() == [4, 0, 3, 4]
    assert worked_example["q_groups"].dtype == torch.int16


def test_worked_example_scales_and_perm(worked_example):
    q_scale = worked_example["q_scale"]
    assert q_scale.dtype == torch.int32 and tuple(q_scale.shape) == (2, 4)
    assert hex_words(q_scale[0]) == ["ffffff7f", "ffffffff", "ffffffff", "ffffffff"]
    assert hex_words(q_scale[1]) == ["33333333"] * 4
    assert worked_example["q_invperm"][:8].tolist() == [0, 13, 26, 39, 52, 1, 14, 27]


def test_worked_example_dequantized_values(worked_example):
    w = dequantize(on_disk(worked_example))  # [N, K]: W[perm[k], n] of exl2-format §2.9 is w[n, perm[k]]
    assert w.dtype == torch.float16 and tuple(w.shape) == (32, 64)
    expected = {(0, 0): -4.0, (0, 1): -1.0, (5, 0): -3.5, (10, 0): -3.0, (1, 0): 2.5, (1, 1): 0.625,
                (32, 0): -0.5, (32, 2): -0.25, (18, 2): 0.0, (59, 0): 0.375}
    for (feature, column), value in expected.items():
        got = w[column, feature]
        assert got.view(torch.int16).item() == torch.tensor(value).half().view(torch.int16).item()


def test_worked_example_unpacks(worked_example):
    codes, bits, rows = unpack_codes(worked_example["q_weight"], worked_example["q_groups"])
    assert bits == [4, 3] and rows == [32, 32]
    assert torch.equal(codes.long(), worked_example["_codes"])


VALIDATED_LAYOUTS = [
    # (K, N, setting, q_groups (None = check prefix/suffix/count only), q_weight rows, groups)
    (256, 64, QParams(32, [6, 4], [0.15, 0.85]), [6, 0, 6, 6, 4, 12, 4, 16, 4, 20, 4, 24, 4, 28, 4, 32],
     36, 8),
    (256, 96, QParams(64, [3, 2], [0.05, 0.95]), [3, 0, 2, 6, 2, 10, 2, 14], 18, 4),
    (512, 64, QParams({6: 32, 3: 64, 2: 64}, [6, 3, 2], [0.05, 0.2, 0.75]), None, 40, 9),
    (512, 128, QParams({8: 32, 5: 128, 4: 128}, [8, 5, 4], [0.05, 0.1, 0.85]),
     [8, 0, 5, 8, 4, 28, 4, 44, 4, 60], 72, 5),
    (384, 64, QParams(128, [8], [1.0]), [8, 0, 8, 32, 8, 64], 96, 3),
    (320, 32, QParams(32, [5, 4], [0.1, 0.9]), None, 41, 10),
]


@pytest.mark.parametrize("k, n, qp, q_groups, q_rows, num_groups", VALIDATED_LAYOUTS)
def test_validated_layouts(k, n, qp, q_groups, q_rows, num_groups):
    layer = random_layer(qp, k, n, seed=k + n, bias=(k, n) == (256, 96))
    groups = layer["q_groups"].tolist()
    assert len(groups) == 2 * num_groups
    if q_groups is not None:
        assert groups == q_groups
    assert tuple(layer["q_weight"].shape) == (q_rows, n)
    if (k, n) == (512, 64):
        assert groups[:6] == [6, 0, 3, 6, 3, 12] and groups[6:8] == [2, 18] and groups[-2:] == [2, 38]
    if (k, n) == (320, 32):
        assert groups[:4] == [5, 0, 4, 5] and groups[4:6] == [4, 9] and groups[-2:] == [4, 37]


@pytest.mark.parametrize("k, n, qp, q_groups, q_rows, num_groups", VALIDATED_LAYOUTS)
def test_total_bits_equals_packed_size(k, n, qp, q_groups, q_rows, num_groups):
    for bias in (False, True):
        layer = on_disk(random_layer(qp, k, n, seed=1, bias=bias))
        packed_bits = sum(t.numel() * t.element_size() * 8 for t in layer.values())
        assert packed_bits == qp.total_bits(k, n, bias=bias)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_literal_bit_stream(bits):
    gen = torch.Generator().manual_seed(bits)
    rows = [64, 32, 96]
    codes = torch.randint(0, 1 << bits, (sum(rows), 16), generator=gen)
    packed = pack_codes(codes, [bits] * 3, rows)
    assert torch.equal(packed.to(torch.int64) & 0xFFFFFFFF, reference_pack(codes, [bits] * 3, rows))
    unpacked, _, unpacked_rows = unpack_codes(packed, make_q_groups([bits] * 3, rows))
    assert unpacked_rows == rows and torch.equal(unpacked.long(), codes)


def test_mixed_layout_round_trip_and_reference():
    qp = QParams({8: 32, 6: 64, 5: 32, 3: 64, 2: 32}, [8, 6, 5, 3, 2], [0.1, 0.2, 0.2, 0.25, 0.25])
    layer = random_layer(qp, 640, 64, seed=3)
    bits, rows = zip(*qp.groups(640))
    reference = reference_pack(layer["_codes"], list(bits), list(rows))
    assert torch.equal(layer["q_weight"].to(torch.int64) & 0xFFFFFFFF, reference)
    codes, got_bits, got_rows = unpack_codes(layer["q_weight"], layer["q_groups"])
    assert torch.equal(codes.long(), layer["_codes"]) and (got_bits, got_rows) == (list(bits), list(rows))
    assert torch.equal(unpack_scales(layer["q_scale"]).long(), layer["_qscale"])


def test_dequantize_matches_formula_with_prescale():
    qp = QParams(32, [6, 4], [0.15, 0.85])
    layer = random_layer(qp, 256, 64, seed=5)
    prescale = 0.375  # exact binary fraction: the fp16 product is then a single rounding
    w = dequantize(on_disk(layer), prescale=prescale)
    perm = layer["_perm"]
    m = (layer["q_scale_max"].double() * prescale / 256).half()  # one fp16 rounding of the product
    start = 0
    for group, (bits, rows) in enumerate(qp.groups(256)):
        s = (layer["_qscale"][group].double() ** 2 * m[group].double()).half()
        q = layer["_codes"][start:start + rows].double() - (1 << (bits - 1))
        expected = (q * s.double()).half()
        got = w[:, perm[start:start + rows]].T
        assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
        start += rows


def test_dequantize_rejects_inconsistent_tensors():
    layer = on_disk(random_layer(QParams(32, [4], [1]), 64, 32, seed=0))
    with pytest.raises(Exl2Error):
        dequantize({k: v for k, v in layer.items() if k != "q_invperm"})
    with pytest.raises(Exl2Error):
        dequantize({**layer, "q_scale": layer["q_scale"][:, :2]})
    with pytest.raises(Exl2Error):
        dequantize({**layer, "q_weight": layer["q_weight"].to(torch.int64)})


def test_pack_rejects_partial_words_and_bad_values():
    with pytest.raises(Exl2Error):
        pack_codes(torch.zeros(16, 8, dtype=torch.int64), [3], [16])
    with pytest.raises(Exl2Error):
        pack_codes(torch.full((32, 8), 16), [4], [32])
    with pytest.raises(Exl2Error):
        pack_scales(torch.zeros(1, 8, dtype=torch.int64))
