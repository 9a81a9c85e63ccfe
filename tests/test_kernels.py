"""CUDA kernels (exl2core.kernels): loader fallback, CPU dispatch, ``exl2 doctor``; on CUDA, every kernel
against the PyTorch reference (bit-exact for codes, packing and dequantization; float / fp16 tolerance
for the scale-search sums and the matmul)."""

from __future__ import annotations

import os
import re
import threading
import time

import numpy as np
import pytest
import torch

from exl2core import kernels
from exl2core.cli import main
from exl2core.errors import Exl2Error
from exl2core.kernels import build, selfcheck
from exl2core.quant import gptq, pack, rounding
from exl2core.quant.gptq import Hessian, quantize_linear
from exl2core.quant.qparams import table_setting

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL_BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture
def fresh_loader():
    """A loader (and kernel self-check) that has not decided yet, restored to undecided afterwards."""
    build.reset()
    selfcheck.reset()
    yield build
    build.reset()
    selfcheck.reset()


def load_lines(capsys, count: int = 2) -> tuple[list, list[str]]:
    """``count`` loads and the stderr lines they printed."""
    results = [build.load_extension() for _ in range(count)]
    return results, capsys.readouterr().err.splitlines()


# -- loader -------------------------------------------------------------------------------------------


def test_loader_without_cuda_says_so_once(fresh_loader, monkeypatch, capsys):
    monkeypatch.delenv(build.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results, lines = load_lines(capsys)
    assert results == [None, None]
    assert lines == ["exl2core: CUDA kernels not used (CUDA is not available); using the PyTorch path"]


def test_env_override_forces_reference_without_building(fresh_loader, monkeypatch, capsys):
    monkeypatch.setenv(build.DISABLE_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(build, "build_extension", lambda **_: pytest.fail("must not build"))
    results, lines = load_lines(capsys)
    assert results == [None, None]
    assert len(lines) == 1 and "EXL2_NO_KERNELS=1" in lines[0]


def test_build_failure_is_one_line_with_reason(fresh_loader, monkeypatch, capsys):
    monkeypatch.delenv(build.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def fail(**_):
        raise Exl2Error("building the CUDA kernels failed: nvcc fatal: unsupported gpu architecture")

    monkeypatch.setattr(build, "build_extension", fail)
    results, lines = load_lines(capsys)
    assert results == [None, None] and len(lines) == 1
    assert re.match(r"^exl2core: CUDA kernels quantize_rows, .*, exl2_matmul disabled \(building the CUDA "
                    r"kernels failed: nvcc fatal: unsupported gpu architecture\); using the PyTorch path$", lines[0])
    assert "unsupported gpu architecture" in build.load_result().reason


def test_concurrent_loads_build_once(fresh_loader, monkeypatch):
    monkeypatch.delenv(build.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    module = object()

    def slow_build(**_):
        calls.append(1)
        time.sleep(0.05)
        return module

    monkeypatch.setattr(build, "build_extension", slow_build)
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(build.load_extension())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and seen == [module] * 8


def test_build_without_toolkit_or_arch_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with pytest.raises(Exl2Error, match="CPU-only build|TORCH_CUDA_ARCH_LIST"):
        build.build_extension()


def test_cache_dir_is_keyed_by_torch_cuda_and_arch(monkeypatch, tmp_path):
    monkeypatch.setenv("EXL2_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    first = build.build_dir()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    second = build.build_dir()
    assert first.parent == second.parent == tmp_path / "kernels" and first != second
    assert torch.__version__ in second.name and "9.0" in second.name
    assert not build.is_built()


def test_cpu_tensors_never_trigger_a_load(fresh_loader):
    assert kernels.extension_for(torch.zeros(3)) is None
    assert build.load_result() is None


# -- dispatch on CPU tensors --------------------------------------------------------------------------


def rows_and_scale(bits: int, rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.exp(torch.randn(cols, generator=gen))
    found = gptq.search_scales(w, bits)
    scale = found.scale.clone()
    scale[:3] = 0.0  # all-zero columns have scale 0 and must round to code z
    w[:, :3] = 0.0
    return w, scale


@pytest.mark.parametrize("bits", ALL_BITS)
def test_cpu_quantize_group_matches_formula(bits):
    w, scale = rows_and_scale(bits, 6, 64, bits)
    zero, maxq = 1 << (bits - 1), (1 << bits) - 1
    diag = torch.rand(6) + 0.5
    codes, q, err = kernels.quantize_group(w, scale, zero, maxq, diag)
    wn, sn = w.numpy(), scale.numpy()
    divisor = np.where(sn > 0, sn, np.float32(1))
    expect_codes = np.clip(np.rint(wn / divisor) + np.float32(zero), 0, maxq)
    expect_q = ((expect_codes - zero) * sn).astype(np.float16).astype(np.float32)
    assert codes.dtype == torch.int16 and np.array_equal(codes.numpy(), expect_codes.astype(np.int16))
    assert np.array_equal(q.numpy(), expect_q)
    assert np.array_equal(err.numpy(), (wn - expect_q) / diag.numpy()[:, None])
    assert (codes[:, :3] == zero).all() and (q[:, :3] == 0).all()


def test_cpu_quantize_group_writes_outputs_in_place():
    w, scale = rows_and_scale(4, 1, 32, 0)
    codes, fake = torch.zeros(32, dtype=torch.int16), torch.zeros(32)
    returned = kernels.quantize_group(w[0], scale, 8, 15, out=(codes, fake, None))
    expected = kernels.quantize_group(w[0], scale, 8, 15)
    assert returned[0] is codes and returned[2] is None
    assert torch.equal(codes, expected[0]) and torch.equal(fake, expected[1])


def literal_grid_errors(x, multipliers, column_scale, zero, maxq) -> list[float]:
    out = []
    for m in multipliers.tolist():
        trial = (torch.tensor(m, dtype=torch.float32) * column_scale).double()
        q = torch.clamp(torch.round(x.double() / trial), -zero, maxq - zero) * trial
        out.append(((q - x.double()).abs() ** 3.5).sum().item())
    return out


def test_cpu_grid_errors_match_literal_sum():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 48, generator=gen)
    column_scale = torch.rand(48, generator=gen) * 0.2 + 0.05
    multipliers = torch.linspace(0.7, 1.2, 13)
    errors = kernels.grid_errors(x, multipliers, column_scale, 8, 15)
    assert errors.shape == (13,)
    expected = literal_grid_errors(x, multipliers, column_scale, 8, 15)
    assert errors.tolist() == pytest.approx(expected, rel=1e-4)


def worked_example_codes() -> torch.Tensor:
    """exl2-format §2.11: 4-bit group q = i mod 16, 3-bit group q = (i + n) mod 8, K = 64, N = 32."""
    i = torch.arange(32).unsqueeze(1)
    n = torch.arange(32).unsqueeze(0)
    return torch.cat([(i % 16).expand(32, 32), (i + n) % 8])


def test_cpu_pack_matches_worked_example():
    q_weight = kernels.pack_codes(worked_example_codes(), [4, 3], [32, 32])
    words = [f"{v & 0xFFFFFFFF:08x}" for v in q_weight[:, 1].tolist()]
    assert words == ["76543210", "fedcba98", "76543210", "fedcba98", "d11f58d1", "58d11f58", "1f58d11f"]
    codes, bits, rows = kernels.unpack_codes(q_weight, pack.make_q_groups([4, 3], [32, 32]))
    assert torch.equal(codes, worked_example_codes().to(torch.int16)) and bits == [4, 3] and rows == [32, 32]


def random_layer(group_bits: list[int], group_rows: list[int], n: int, seed: int,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = sum(group_rows)
    codes = torch.cat([torch.randint(0, 1 << b, (r, n), generator=gen)
                       for b, r in zip(group_bits, group_rows)])
    tensors = {
        "q_weight": pack.pack_codes(codes, group_bits, group_rows),
        "q_scale": pack.pack_scales(torch.randint(1, 17, (len(group_bits), n), generator=gen)),
        "q_scale_max": (torch.rand(len(group_bits), generator=gen) * 0.1 + 0.01).half(),
        "q_groups": pack.make_q_groups(group_bits, group_rows),
        "q_invperm": torch.argsort(torch.randperm(k, generator=gen)).to(torch.int32),
    }
    return {name: t.to(device) for name, t in tensors.items()}


def test_cpu_matmul_matches_dequantized_product():
    tensors = random_layer([6, 4, 4, 2], [32, 64, 64, 96], 64, seed=3)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(0)).half()
    y = kernels.exl2_matmul(x, tensors, prescale=0.5)
    weight = pack.dequantize(tensors, prescale=0.5).double()
    assert y.dtype == torch.float16 and y.shape == (2, 3, 64)
    torch.testing.assert_close(y.double(), x.double() @ weight.T, rtol=2e-3, atol=2e-3)
    with pytest.raises(Exl2Error, match="fp16"):
        kernels.exl2_matmul(x.float(), tensors)
    with pytest.raises(Exl2Error, match="256 rows"):
        kernels.exl2_matmul(x[..., :128], tensors)


# -- exl2 doctor --------------------------------------------------------------------------------------


def test_doctor_prints_environment(capsys, monkeypatch, fresh_loader):
    monkeypatch.setenv(build.DISABLE_ENV, "1")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for field in ("torch:", "CUDA available:", "CUDA devices:", "CUDA toolkit:", "nvcc:", "C++ compiler:",
                  "ninja:", "kernel cache:", "kernels:"):
        assert field in out
    assert torch.__version__ in out and "forced off (EXL2_NO_KERNELS=1)" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only report")
def test_doctor_without_cuda_reports_reference_path(capsys, monkeypatch, fresh_loader):
    monkeypatch.delenv(build.DISABLE_ENV, raising=False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^CUDA available: +no$", out, re.M) and "not used (CUDA is not available" in out
    for name in selfcheck.KERNELS:
        assert re.search(rf"^  {name}: +PyTorch path \(extension not loaded\)$", out, re.M), name


# -- self-check: a wrong kernel is disabled, the PyTorch path runs -------------------------------------


def _layout_of(bits: torch.Tensor, row_start: torch.Tensor, rows: int) -> tuple[list[int], list[int]]:
    starts = row_start.tolist() + [rows]
    return bits.tolist(), [b - a for a, b in zip(starts, starts[1:])]


def _q_groups(bits: torch.Tensor, qrow_start: torch.Tensor) -> torch.Tensor:
    return torch.stack([bits, qrow_start], 1).reshape(-1).to(torch.int16)


def _weight(q_weight, q_scale, scale_max, invperm, bits, qrow_start) -> torch.Tensor:
    """The reference dequantization from the extension's arguments (scale_max already holds /256)."""
    tensors = {"q_weight": q_weight, "q_scale": q_scale, "q_scale_max": (scale_max.float() * 256).half(),
               "q_groups": _q_groups(bits, qrow_start), "q_invperm": invperm}
    return pack.dequantize(tensors)


class FakeExtension:
    """CPU stand-ins with the extension's signatures, computing the reference (``wrong`` names kernels
    whose result is corrupted in one element); ``calls`` counts each kernel's calls."""

    def __init__(self, wrong: tuple[str, ...] = (), raises: tuple[str, ...] = ()):
        self.wrong, self.raises = wrong, raises
        self.calls = dict.fromkeys(selfcheck.KERNELS, 0)

    def _result(self, name: str, value: torch.Tensor) -> torch.Tensor:
        self.calls[name] += 1
        if name in self.raises:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if name in self.wrong:
            value = value.clone()
            value.view(-1)[value.numel() // 2] += 1
        return value

    def quantize_rows(self, w, scale, diag, zero, maxq, codes, q, err):
        gptq.quantize_rows(w, scale, zero, maxq, diag, out=(codes, q, err))
        self._result("quantize_rows", q)
        if "quantize_rows" in self.wrong:
            q.view(-1)[0] += 1

    def grid_errors(self, x, multipliers, column_scale, zero, maxq):
        return self._result("grid_errors", rounding.grid_errors(x, multipliers, column_scale, zero, maxq))

    def pack_codes(self, codes, bits, row_start, qrow_start, word_group):
        group_bits, group_rows = _layout_of(bits, row_start, codes.shape[0])
        return self._result("pack_codes", pack.pack_codes(codes, group_bits, group_rows))

    def unpack_codes(self, q_weight, bits, row_start, qrow_start, row_group):
        codes, _, _ = pack.unpack_codes(q_weight, _q_groups(bits, qrow_start))
        return self._result("unpack_codes", codes)

    def dequantize(self, q_weight, q_scale, scale_max, invperm, bits, row_start, qrow_start, row_group):
        return self._result("dequantize", _weight(q_weight, q_scale, scale_max, invperm, bits, qrow_start))

    def exl2_matmul(self, x, perm, q_weight, q_scale, scale_max, bits, qrow_start, row_start, chunk_group):
        weight = _weight(q_weight, q_scale, scale_max, torch.argsort(perm.long()).int(), bits, qrow_start)
        return self._result("exl2_matmul", (x.float() @ weight.float().T).half())


DISABLED_LINE = r"^exl2core: CUDA kernel {} disabled \(.+\); using the PyTorch path$"


def test_correct_kernels_pass_their_self_check(fresh_loader, capsys):
    fake = FakeExtension()
    checked = selfcheck.install(fake, "cpu")
    assert capsys.readouterr().err == ""
    assert all(state.usable for state in checked.states.values())
    assert all(count == selfcheck.CASES for count in fake.calls.values())
    assert "bit-exact" in checked.states["dequantize"].detail
    assert "rtol" in checked.states["grid_errors"].detail


def test_wrong_kernel_result_is_disabled_with_one_line_and_the_reference_runs(fresh_loader, capsys):
    fake = FakeExtension(wrong=("dequantize",))
    checked = selfcheck.install(fake, "cpu")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.match(DISABLED_LINE.format("dequantize"), lines[0]), lines
    assert "differs from the PyTorch reference: weight: 1 of" in lines[0] and "not bit-exact" in lines[0]
    assert [n for n, s in checked.states.items() if not s.usable] == ["dequantize"]

    tensors = random_layer([6, 4, 2], [32, 64, 32], 64, seed=5)
    before = dict(fake.calls)
    got = kernels.dequantize(tensors)
    assert torch.equal(got.view(torch.int16), pack.dequantize(tensors).view(torch.int16))
    assert fake.calls["dequantize"] == before["dequantize"]  # the disabled kernel is not called again
    codes, _, _ = kernels.unpack_codes(tensors["q_weight"], tensors["q_groups"])
    assert fake.calls["unpack_codes"] == before["unpack_codes"] + 1  # a kernel that passed is used
    assert torch.equal(codes, pack.unpack_codes(tensors["q_weight"], tensors["q_groups"])[0])
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0)).half()
    kernels.exl2_matmul(x, tensors)
    assert fake.calls["exl2_matmul"] == before["exl2_matmul"] + 1
    assert capsys.readouterr().err == ""  # the warning is printed once, at the check


def test_kernel_that_raises_is_disabled(fresh_loader, capsys):
    checked = selfcheck.install(FakeExtension(raises=("exl2_matmul",), wrong=("quantize_rows",)), "cpu")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert re.match(DISABLED_LINE.format("quantize_rows"), lines[0])
    assert re.match(DISABLED_LINE.format("exl2_matmul"), lines[1]) and "illegal memory access" in lines[1]
    assert checked.states["exl2_matmul"].raised and not checked.states["quantize_rows"].raised
    w, scale = rows_and_scale(4, 2, 32, 0)
    codes, q, _ = kernels.quantize_group(w, scale, 8, 15)
    assert torch.equal(q, gptq.quantize_rows(w, scale, 8, 15)[1])
    assert not checked.states["exl2_matmul"].usable


def test_doctor_shows_each_kernel_state(fresh_loader, monkeypatch, capsys):
    monkeypatch.delenv(build.DISABLE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake = FakeExtension(wrong=("grid_errors",))
    monkeypatch.setattr(selfcheck, "checked_extension", lambda: selfcheck.install(fake, "cpu"))
    assert main(["doctor"]) == 0
    captured = capsys.readouterr()
    assert re.search(DISABLED_LINE.format("grid_errors"), captured.err, re.M)
    out = captured.out
    assert "loaded (5 of 6 kernels passed their self-check)" in out
    assert re.search(r"^  grid_errors: +disabled, PyTorch path \(differs from the PyTorch reference", out, re.M)
    for name in ("quantize_rows", "pack_codes", "unpack_codes", "dequantize", "exl2_matmul"):
        assert re.search(rf"^  {name}: +in use \(passed 3 random cases", out, re.M), name


def test_self_check_outcome_is_cached_per_build(fresh_loader, monkeypatch, tmp_path, capsys):
    library = tmp_path / f"{build.EXTENSION_NAME}.so"
    library.write_bytes(b"built library")
    fake = FakeExtension(wrong=("pack_codes",))
    states = selfcheck.check_all(fake, "cpu")
    selfcheck.write_cache(tmp_path, states)
    assert selfcheck.read_cache(tmp_path) == states
    # a later process of the same build reads the outcome instead of running the cases
    monkeypatch.setattr(build, "load_extension", lambda: fake)
    monkeypatch.setattr(build, "build_dir", lambda: tmp_path)
    calls = dict(fake.calls)
    checked = selfcheck.checked_extension()
    assert checked.states == states and fake.calls == calls
    assert re.match(DISABLED_LINE.format("pack_codes"), capsys.readouterr().err)
    # a rebuilt library (other size or mtime) invalidates the cache
    library.write_bytes(b"rebuilt library, longer")
    assert selfcheck.read_cache(tmp_path) is None
    os.utime(library, ns=(1, 1))
    assert selfcheck.read_cache(tmp_path) is None
    # an outcome with a kernel that raised (out of memory, say) is not kept: the next process checks again
    (tmp_path / selfcheck.CACHE_NAME).unlink()
    selfcheck.write_cache(tmp_path, selfcheck.check_all(FakeExtension(raises=("grid_errors",)), "cpu"))
    assert not (tmp_path / selfcheck.CACHE_NAME).exists()


# -- CUDA: kernels against the reference --------------------------------------------------------------


@pytest.fixture(scope="module")
def ext():
    """The loaded extension; on a CUDA machine a failed build or self-check is a failure, not a skip (a
    disabled kernel would let the tests below pass on the PyTorch path)."""
    module = build.load_extension()
    result = build.load_result()
    assert module is not None, f"CUDA kernels did not load: {result.reason if result else '?'}"
    checked = selfcheck.checked_extension()
    failed = {name: state.detail for name, state in checked.states.items() if not state.usable}
    assert not failed, f"kernels failed their self-check: {failed}"
    return module


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype == torch.float16 else t.view(torch.int32)


@cuda
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("seed", range(3))
def test_cuda_quantize_group_bit_exact(ext, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 40, (1,), generator=gen))
    cols = 32 * int(torch.randint(1, 40, (1,), generator=gen))
    w, scale = rows_and_scale(bits, rows, cols, seed)
    zero, maxq = 1 << (bits - 1), (1 << bits) - 1
    diag = torch.rand(rows, generator=gen) + 0.1
    expected = gptq.quantize_rows(w, scale, zero, maxq, diag)
    got = kernels.quantize_group(w.cuda(), scale.cuda(), zero, maxq, diag.cuda())
    for e, g in zip(expected, got):
        assert g.is_cuda and torch.equal(bits_of(g.cpu()), bits_of(e))
    row_out = (torch.empty(cols, dtype=torch.int16, device="cuda"), torch.empty(cols, device="cuda"), None)
    kernels.quantize_group(w[0].cuda(), scale.cuda(), zero, maxq, out=row_out)
    assert torch.equal(row_out[0].cpu(), expected[0][0]) and torch.equal(row_out[1].cpu(), expected[1][0])


@cuda
@pytest.mark.parametrize("bits", ALL_BITS)
def test_cuda_grid_errors_match_reference(ext, bits):
    gen = torch.Generator().manual_seed(bits)
    for rows, cols in ((32, 96), (128, 4096), (7, 11008)):
        x = torch.randn(rows, cols, generator=gen) * torch.exp(torch.randn(cols, generator=gen))
        maxq, zero = (1 << bits) - 1, 1 << (bits - 1)
        column_scale = (x.abs().amax(0) + 1e-12) / (maxq / 2)
        multipliers = torch.linspace(0.7, 1.2, 97)
        expected = rounding.grid_errors(x, multipliers, column_scale, zero, maxq)
        got = kernels.grid_errors(x.cuda(), multipliers.cuda(), column_scale.cuda(), zero, maxq)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=0)


def random_groups(gen: torch.Generator, k_chunks: int, aligned: bool) -> tuple[list[int], list[int]]:
    """Random descending-width layout; unaligned layouts also use 16-row 2-bit groups."""
    widths = sorted(ALL_BITS, reverse=True)
    group_bits, group_rows = [], []
    remaining = 32 * k_chunks
    while remaining:
        bits = widths[int(torch.randint(0, len(widths), (1,), generator=gen))]
        unit = 16 if (bits == 2 and not aligned) else 32
        rows = min(remaining, unit * int(torch.randint(1, 5, (1,), generator=gen)))
        group_bits.append(bits)
        group_rows.append(rows)
        remaining -= rows
    return group_bits, group_rows


LAYOUTS = [([b], [128]) for b in ALL_BITS] + [([8, 6, 5, 4, 3, 2], [32, 64, 32, 128, 64, 96])]


@cuda
@pytest.mark.parametrize("seed", range(8))
def test_cuda_pack_unpack_dequantize_bit_exact(ext, seed):
    gen = torch.Generator().manual_seed(seed)
    layouts = LAYOUTS + [random_groups(gen, int(torch.randint(1, 24, (1,), generator=gen)), seed % 2 == 0)]
    for group_bits, group_rows in layouts:
        n = 32 * int(torch.randint(1, 12, (1,), generator=gen))
        reference = random_layer(group_bits, group_rows, n, seed)
        codes, _, _ = pack.unpack_codes(reference["q_weight"], reference["q_groups"])
        packed = kernels.pack_codes(codes.cuda(), group_bits, group_rows)
        assert torch.equal(packed.cpu(), reference["q_weight"])
        on_gpu = {name: t.cuda() for name, t in reference.items()}
        unpacked, bits, rows = kernels.unpack_codes(on_gpu["q_weight"], on_gpu["q_groups"])
        assert torch.equal(unpacked.cpu(), codes) and (bits, rows) == (group_bits, group_rows)
        for prescale in (1.0, 0.37):
            got = kernels.dequantize(on_gpu, prescale)
            assert torch.equal(bits_of(got.cpu()), bits_of(pack.dequantize(reference, prescale)))


@cuda
def test_cuda_pack_rejects_what_the_reference_rejects(ext):
    codes = torch.zeros(64, 32, dtype=torch.int16, device="cuda")
    with pytest.raises(Exl2Error, match="outside 0..15"):
        kernels.pack_codes(codes.index_fill(0, torch.tensor([40], device="cuda"), 16), [8, 4], [32, 32])
    with pytest.raises(Exl2Error, match="whole 32-bit words"):
        kernels.pack_codes(codes, [3, 3], [16, 48])
    with pytest.raises(Exl2Error, match="not a permutation"):
        bad = random_layer([4], [64], 32, 0, "cuda")
        bad["q_invperm"] = torch.zeros(64, dtype=torch.int32, device="cuda")
        kernels.dequantize(bad)


@cuda
@pytest.mark.parametrize("seed", range(6))
def test_cuda_matmul_within_fp16_tolerance(ext, seed):
    gen = torch.Generator().manual_seed(seed)
    layouts = LAYOUTS + [random_groups(gen, int(torch.randint(1, 40, (1,), generator=gen)), True)]
    for group_bits, group_rows in layouts:
        n = 32 * int(torch.randint(1, 20, (1,), generator=gen))
        tensors = random_layer(group_bits, group_rows, n, seed, "cuda")
        prepared = kernels.prepare_matrix(tensors)
        weight = pack.dequantize({k: t.cpu() for k, t in tensors.items()}).double()
        for m in (1, 3, 8, 9, 33, kernels.FUSED_MATMUL_MAX_ROWS, 200):
            x = torch.randn(m, sum(group_rows), generator=gen).half()
            expected = x.double() @ weight.T
            got = kernels.exl2_matmul(x.cuda(), prepared)
            assert got.dtype == torch.float16 and got.shape == (m, n)
            scale = expected.abs().max().item()
            torch.testing.assert_close(got.cpu().double(), expected, rtol=2e-3, atol=2e-3 * scale)


@cuda
def test_cuda_matmul_falls_back_for_unaligned_groups(ext):
    tensors = random_layer([4, 2, 2], [32, 16, 16], 64, 0, "cuda")
    x = torch.randn(2, 64, device="cuda").half()
    expected = x.double() @ pack.dequantize(tensors).double().T
    torch.testing.assert_close(kernels.exl2_matmul(x, tensors).double(), expected, rtol=2e-3, atol=2e-3)


@cuda
def test_cuda_quantizer_uses_kernels_and_round_trips(ext):
    gen = torch.Generator().manual_seed(0)
    k, n = 512, 160
    weight = torch.randn(n, k, generator=gen) / k ** 0.5
    x = torch.randn(256, k, generator=gen) * torch.exp(torch.randn(k, generator=gen))
    results = {}
    for device in ("cpu", "cuda"):
        hessian = Hessian(k, device=device)
        hessian.add(x)
        qp = table_setting("mlp", 4, "down_proj")
        results[device] = quantize_linear(weight, hessian.prepare(device), qp)
    gpu, cpu = results["cuda"], results["cpu"]
    tensors = gpu.pack()
    assert torch.equal(bits_of(kernels.dequantize(tensors)), bits_of(gpu.weight))
    on_cpu = {name: t.cpu() for name, t in tensors.items()}
    assert torch.equal(bits_of(pack.dequantize(on_cpu)), bits_of(gpu.weight.cpu()))
    # GPU and CPU GPTQ differ only through float summation order (GEMMs, scale-search ties)
    assert (gpu.codes.cpu() == cpu.codes).float().mean() > 0.97
