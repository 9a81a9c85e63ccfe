"""Quantization settings (exl2-format §3): serialization, group layout, size accounting, candidate tables."""

from __future__ import annotations

import json

import pytest

from exl2core.errors import Exl2Error
from exl2core.quant.qparams import (
    ATTN_TABLE,
    HEAD_OPTIONS,
    MLP_TABLE,
    TABLES,
    QParams,
    distinct_settings,
    pad32,
    table_setting,
)

LLAMA7B_SHAPES = {  # role -> (rows = in_features, columns = out_features)
    "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096),
}


def test_desc_strings():
    assert QParams(64, [3, 2], [0.05, 0.95]).desc == "0.05:3b_64g/0.95:2b_64g s4"
    assert QParams(128, [4], [1]).desc == "1:4b_128g s4"
    assert QParams(128, [8], [1.0]).desc == "1.0:8b_128g s4"
    assert QParams({8: 32, 4: 128}, [8, 4], [0.05, 0.95]).desc == "0.05:8b_32g/0.95:4b_128g s4"


@pytest.mark.parametrize("group_size", [64, [64, 64], {"3": 64, "2": 64}, {3: 64, 2: 64}])
def test_from_dict_accepts_all_group_size_forms(group_size):
    qp = QParams.from_dict({"group_size": group_size, "bits": [3, 2], "bits_prop": [0.05, 0.95],
                            "scale_bits": 4})
    assert qp.group_size == {3: 64, 2: 64}
    assert qp == QParams(64, [3, 2], [0.05, 0.95])


def test_to_dict_json_round_trip_keeps_types():
    for qp in [table_setting("mlp", 4, "down_proj"), HEAD_OPTIONS[8], table_setting("attn", 6, "q_proj")]:
        d = qp.to_dict()
        assert list(d["group_size"]) == [str(b) for b in qp.bits]
        assert d["bits"] == list(qp.bits) and d["bits_prop"] == list(qp.bits_prop) and d["scale_bits"] == 4
        back = QParams.from_dict(json.loads(json.dumps(d)))
        assert back == qp and back.desc == qp.desc and hash(back) == hash(qp)


def test_group_layout_example():
    qp = QParams(32, [6, 4], [0.15, 0.85])
    assert qp.group_counts(256) == [2, 6]
    assert qp.groups(256) == [(6, 32)] * 2 + [(4, 32)] * 6


def test_group_layout_short_last_group():
    groups = QParams(128, [8], [1.0]).groups(352)
    assert groups == [(8, 128), (8, 128), (8, 96)]
    assert sum(r for _, r in groups) == 352


@pytest.mark.parametrize("row, attn_bits, attn_bpw, mlp_row, mlp_bits, mlp_bpw", [
    (0, 143142912, 2.1330, 0, 304011760, 2.2475),
    (4, 212342784, 3.1642, 4, 444300992, 3.2846),
    (6, 271063040, 4.0392, 7, 559812800, 4.1386),
    (9, 277372928, 4.1332, 10, 588492928, 4.3506),
    (14, 361240576, 5.3829, 11, 710115008, 5.2498),
    (16, 405280768, 6.0392, 13, 821395136, 6.0724),
    (18, 539498496, 8.0392, 16, 1086979104, 8.0358),
])
def test_reference_block_sizes(row, attn_bits, attn_bpw, mlp_row, mlp_bits, mlp_bpw):
    for table, r, bits, bpw in (("attn", row, attn_bits, attn_bpw), ("mlp", mlp_row, mlp_bits, mlp_bpw)):
        settings = TABLES[table][r]
        total = sum(qp.total_bits(*LLAMA7B_SHAPES[role]) for role, qp in settings.items())
        numel = sum(LLAMA7B_SHAPES[role][0] * LLAMA7B_SHAPES[role][1] for role in settings)
        assert total == bits
        assert round(total / numel, 4) == bpw


def test_reference_single_matrix():
    qp = QParams(64, [3, 2], [0.05, 0.95])
    assert qp.total_bits(4096, 4096) == 35785728
    assert round(qp.bpw(4096, 4096), 5) == 2.13300


@pytest.mark.parametrize("head_bits, bpw", [(2, 2.7354), (3, 3.2823), (4, 4.4385), (5, 5.1885),
                                            (6, 6.3448), (8, 8.0323)])
def test_reference_head_bpw(head_bits, bpw):
    assert round(HEAD_OPTIONS[head_bits].bpw(4096, 32000), 4) == bpw


def test_head_option_descs():
    assert HEAD_OPTIONS[6].desc == "0.15:8b_128g/0.85:6b_128g s4"
    assert HEAD_OPTIONS[2].desc == "0.3:4b_32g/0.7:2b_32g s4"
    assert HEAD_OPTIONS[8].desc == "1.0:8b_128g s4"


def test_bias_term_and_bpw():
    qp = QParams(32, [4], [1])
    assert qp.total_bits(256, 96, bias=True) - qp.total_bits(256, 96) == 16 * 96
    assert qp.bpw(256, 96, bias=True) == qp.total_bits(256, 96, bias=True) / (256 * 96 + 96)


def test_tables_shape_and_dedup_counts():
    assert len(ATTN_TABLE) == 19 and len(MLP_TABLE) == 17
    assert all(set(row) == {"q_proj", "k_proj", "v_proj", "o_proj"} for row in ATTN_TABLE)
    roles = ("q_proj", "k_proj", "v_proj", "o_proj")
    counts = {role: len(distinct_settings("attn", role)[0]) for role in roles}
    assert counts == {"q_proj": 14, "k_proj": 14, "v_proj": 15, "o_proj": 14}
    counts = {role: len(distinct_settings("mlp", role)[0]) for role in ("gate_proj", "up_proj", "down_proj")}
    assert counts == {"gate_proj": 13, "up_proj": 13, "down_proj": 14}


def test_dedup_indices_point_at_row_settings():
    for table, role in (("attn", "v_proj"), ("mlp", "down_proj")):
        distinct, index = distinct_settings(table, role)
        assert len(index) == len(TABLES[table])
        for row, i in enumerate(index):
            assert distinct[i].desc == TABLES[table][row][role].desc
        assert index[0] == 0 and sorted(set(index)) == list(range(len(distinct)))


def test_table_settings_pack_whole_words_for_llama_shapes():
    for rows in TABLES.values():
        for row in rows:
            for role, qp in row.items():
                k = LLAMA7B_SHAPES[role][0]
                assert all(r * b % 32 == 0 for b, r in qp.groups(k))


def test_moe_roles_map_to_mlp_columns():
    for row in range(len(MLP_TABLE)):
        assert table_setting("mlp", row, "w1") == MLP_TABLE[row]["gate_proj"]
        assert table_setting("mlp", row, "w3") == MLP_TABLE[row]["up_proj"]
        assert table_setting("mlp", row, "w2") == MLP_TABLE[row]["down_proj"]
    assert table_setting("attn", 17, "v_proj").desc == "1:8b_32g s4"
    with pytest.raises(Exl2Error):
        table_setting("attn", 19, "q_proj")
    with pytest.raises(Exl2Error):
        table_setting("attn", 0, "w1")
    with pytest.raises(Exl2Error):
        table_setting("moe", 0, "w1")


@pytest.mark.parametrize("kwargs", [
    {"group_size": 32, "bits": [4, 2], "bits_prop": [0.3, 0.6]},        # does not sum to 1
    {"group_size": 32, "bits": [2, 4], "bits_prop": [0.3, 0.7]},        # ascending
    {"group_size": 32, "bits": [7], "bits_prop": [1]},                  # unsupported width
    {"group_size": 48, "bits": [4], "bits_prop": [1]},                  # group size not multiple of 32
    {"group_size": [32], "bits": [4, 2], "bits_prop": [0.3, 0.7]},      # list length mismatch
    {"group_size": {"4": 32}, "bits": [4, 2], "bits_prop": [0.3, 0.7]},  # missing width
    {"group_size": 32, "bits": [4], "bits_prop": [1], "scale_bits": 3},
    {"bits": [4], "bits_prop": [1]},                                    # no group size
])
def test_invalid_settings_raise(kwargs):
    with pytest.raises(Exl2Error):
        QParams.from_dict(kwargs)


def test_over_covering_layout_is_rejected():
    qp = QParams({8: 128, 4: 32}, [8, 4], [0.5, 0.5])
    with pytest.raises(Exl2Error):
        qp.groups(64)  # 8-bit groups cover 128 rows: remaining -64 gives a negative 4-bit count


def test_pad32():
    assert [pad32(n) for n in (1, 32, 33, 32000, 32001)] == [32, 32, 64, 32000, 32032]


def test_equality_follows_desc():
    assert QParams(128, [8], [1]) != QParams(128, [8], [1.0])
    assert len({QParams(64, [4], [1]), QParams([64], [4], [1]), QParams({"4": 64}, [4], [1])}) == 1
