"""The oneDNN CPU linear layers equal their references (F.linear, a per-expert loop) in outputs and gradients,
checked against float64 math; the route (oneDNN or PyTorch's own ops) follows the CPU vendor and ZAYA_CPU_GEMM."""

import pytest
import torch
import torch.nn.functional as F

from zaya_train.kernels import linear as kernels_linear
from zaya_train.kernels.linear import cpu_gemm_route, cpu_vendor, grouped_linear, linear, matmul, uses_onednn

pytestmark = pytest.mark.skipif(
    not kernels_linear._onednn_linear_available(), reason="this PyTorch build has no oneDNN linear on the CPU"
)


@pytest.fixture(autouse=True)
def onednn_at_every_size(monkeypatch):
    """Every test runs on the oneDNN route whatever this machine's CPU, and leaves no cached route behind."""
    monkeypatch.setattr(kernels_linear, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setenv("ZAYA_CPU_GEMM", "onednn")
    cpu_gemm_route.cache_clear()
    yield
    cpu_gemm_route.cache_clear()


def grads_of(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 24), (3, 5, 24)], ids=["2d", "3d"])
def test_linear_matches_float64(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    weight = torch.randn(40, 24, generator=g)
    tensors = (x, weight, torch.randn(40, generator=g)) if bias else (x, weight)
    out, grads = grads_of(lambda *t: linear(*t), *tensors)
    ref_out, ref_grads = grads_of(lambda *t: F.linear(*t), *(t.double() for t in tensors))
    torch.testing.assert_close(out, ref_out.float(), atol=1e-5, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref.float(), atol=1e-4, rtol=1e-5)


def test_linear_takes_the_onednn_path(monkeypatch):
    calls = []
    onednn = kernels_linear._onednn
    monkeypatch.setattr(kernels_linear, "_onednn", lambda *a: calls.append(1) or onednn(*a))
    x = torch.randn(8, 16, requires_grad=True)
    linear(x, torch.randn(4, 16, requires_grad=True)).sum().backward()
    assert len(calls) == 3  # forward, input gradient, weight gradient


def test_small_gemms_stay_on_the_reference(monkeypatch):
    monkeypatch.setattr(kernels_linear, "ONEDNN_MIN_MACS", 2**20)
    calls = []
    monkeypatch.setattr(kernels_linear, "_onednn", lambda *a: calls.append(1))
    linear(torch.randn(16, 128), torch.randn(256, 128))  # 2**19 multiply-adds
    assert not calls
    linear(torch.randn(16, 128), torch.randn(512, 128))
    assert calls


def test_non_contiguous_operands_and_frozen_weight():
    x = torch.randn(16, 8).t().requires_grad_(True)  # [8, 16], transposed storage
    weight = torch.randn(16, 12).t()  # [12, 16] view, no grad
    out = linear(x, weight)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out, x.detach().double() @ weight.double().T, check_dtype=False, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, torch.ones(8, 12) @ weight, atol=1e-5, rtol=1e-5)


def test_matmul():
    a, b = torch.randn(9, 33), torch.randn(33, 17)
    torch.testing.assert_close(matmul(a, b), (a.double() @ b.double()).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(matmul(a.T.contiguous().T, b), a @ b, atol=1e-5, rtol=1e-5)


def per_expert_loop(x_NI, w_EOI, counts_E):
    pieces = torch.split(x_NI, counts_E.tolist())
    return torch.cat([F.linear(piece, w_EOI[e]) for e, piece in enumerate(pieces)])


def test_grouped_linear_matches_per_expert_loop_with_empty_experts():
    g = torch.Generator().manual_seed(3)
    # Row windows wider than an expert's rows reach into its neighbours' rows, and the last one past the end.
    counts = torch.tensor([37, 0, 21, 0, 70])
    x = torch.randn(128, 24, generator=g)
    w = torch.randn(5, 40, 24, generator=g)
    out, (gx, gw) = grads_of(lambda x, w: grouped_linear(x, w, counts), x, w)
    ref, (ref_gx, ref_gw) = grads_of(lambda x, w: per_expert_loop(x, w, counts), x.double(), w.double())
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, ref_gx.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gw, ref_gw.float(), atol=1e-4, rtol=1e-5)
    assert (gw[1] == 0).all() and (gw[3] == 0).all(), "experts that saw no tokens get a zero gradient"


def test_bucket_rows_bounds_the_number_of_gemm_shapes():
    buckets = [kernels_linear.bucket_rows(count) for count in range(1, 5000)]
    assert all(count <= b <= max(count * 1.125, count + 1) for count, b in zip(range(1, 5000), buckets))
    assert len(set(buckets)) < 110  # 8 per power of two, instead of one per row count


def route_on(monkeypatch, vendor, env=None):
    monkeypatch.setattr(kernels_linear, "cpu_vendor", lambda: vendor)
    if env is None:
        monkeypatch.delenv("ZAYA_CPU_GEMM")
    else:
        monkeypatch.setenv("ZAYA_CPU_GEMM", env)
    cpu_gemm_route.cache_clear()
    return cpu_gemm_route()


@pytest.mark.parametrize(
    ("vendor", "route"),
    [("AuthenticAMD", "onednn"), ("GenuineIntel", "aten"), ("HygonGenuine", "aten"), (None, "aten")],
)
def test_route_follows_the_cpu_vendor(monkeypatch, vendor, route):
    assert route_on(monkeypatch, vendor) == route
    assert uses_onednn(torch.ones(1)) == (route == "onednn")


@pytest.mark.parametrize(("vendor", "env"), [("AuthenticAMD", "aten"), ("GenuineIntel", "onednn"), (None, "ONEDNN")])
def test_env_overrides_the_vendor_both_ways(monkeypatch, vendor, env):
    assert route_on(monkeypatch, vendor, env) == env.lower()
    calls = []
    onednn = kernels_linear._onednn
    monkeypatch.setattr(kernels_linear, "_onednn", lambda *a: calls.append(1) or onednn(*a))
    x, weight = torch.randn(8, 16), torch.randn(4, 16)
    torch.testing.assert_close(linear(x, weight), (x.double() @ weight.double().T).float())
    assert bool(calls) == (env.lower() == "onednn")
    assert not uses_onednn(torch.ones(1, dtype=torch.bfloat16))


def test_bad_env_value_names_the_variable(monkeypatch):
    message = r"^ZAYA_CPU_GEMM: must be one of \('onednn', 'aten'\) or unset, got 'mkl'$"
    with pytest.raises(ValueError, match=message):
        route_on(monkeypatch, "GenuineIntel", "mkl")
    with pytest.raises(ValueError, match="^ZAYA_CPU_GEMM: "):
        linear(torch.randn(8, 16), torch.randn(4, 16))


def test_forcing_onednn_without_it_is_an_error(monkeypatch):
    monkeypatch.setattr(kernels_linear, "_onednn_linear_available", lambda: False)
    with pytest.raises(ValueError, match="^ZAYA_CPU_GEMM: onednn was asked for"):
        route_on(monkeypatch, "AuthenticAMD", "onednn")
    assert route_on(monkeypatch, "AuthenticAMD") == "aten"


CPUINFO = {
    "AuthenticAMD": "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
    "model name\t: AMD EPYC\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\n",
    "GenuineIntel": "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
    "model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n",
    None: "processor\t: 0\nBogoMIPS\t: 2000.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\n",  # aarch64 reports no vendor_id
}


@pytest.mark.parametrize("vendor", list(CPUINFO), ids=["amd", "intel", "aarch64"])
def test_cpu_vendor_from_proc_cpuinfo(tmp_path, vendor):
    (tmp_path / "cpuinfo").write_text(CPUINFO[vendor])
    assert cpu_vendor(str(tmp_path / "cpuinfo")) == vendor


@pytest.mark.parametrize(
    ("processor", "vendor"),
    [("Intel64 Family 6 Model 85 Stepping 7, GenuineIntel", "GenuineIntel"),
     ("AMD64 Family 25 Model 97 Stepping 2, AuthenticAMD", "AuthenticAMD"), ("arm", None)],
)
def test_cpu_vendor_without_proc(tmp_path, monkeypatch, processor, vendor):
    monkeypatch.setattr(kernels_linear.platform, "processor", lambda: processor)
    assert cpu_vendor(str(tmp_path / "no-such-file")) == vendor
