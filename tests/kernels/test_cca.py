"""The Triton CCA q/k kernels (`zaya_train.kernels.cca`), run by the Triton interpreter on the CPU, equal the
model's torch path (`ZayaCCAProjection.conv_with_skips`, then `ZayaQKNorm`) in q and k and in the gradients of
the down-projection, the composed conv weight and bias and `temp`, in fp32: plain rows and packed rows (documents
ending mid-row, some shorter than the taps), at sizes that are not block multiples (19 positions in 8-row tiles,
head dim 12 in 16-wide blocks), with the weight gradient split over several programs."""

import importlib

import pytest
import torch
from torch.func import functional_call

from zaya_train.model import preset
from zaya_train.model.cca import ZayaCCAProjection, ZayaQKNorm
from zaya_train.model.layout import build_layout

# 8-row tiles over 19 positions leave a partial tile, 8-channel steps over head dim 12 a partial step;
# programs_per_sm=40 (the CPU counts one "SM") splits the weight gradient of each (head, tap) over 2-3 row
# chunks, whose partials are added up.
TILED = {"BLOCK_S": 8, "BLOCK_K": 8, "programs_per_sm": 40}
BATCH, SEQ = 2, 19
# Per row, document lengths: boundaries mid-row, and documents of 1 and 2 tokens (fewer than the taps).
DOCUMENTS = [[5, 1, 2, 11], [7, 12]]


@pytest.fixture(scope="module")
def cca(interpret):
    from triton.runtime.interpreter import InterpretedFunction

    module = importlib.import_module("zaya_train.kernels.cca")
    assert isinstance(module._cca_fwd_kernel, InterpretedFunction), "zaya_train.kernels.cca: compiled"
    return module


def document_ids() -> torch.Tensor:
    return torch.stack([
        torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)) for lengths in DOCUMENTS
    ])


def case(time0: int, packed: bool):
    """(projection, norm, layout, inputs: q|k latent, composed conv weight and bias, temp, upstream dq, dk)."""
    config = preset("nano", head_dim=12, cca_time0=time0, cca_time1=2, kernels="torch")
    g = torch.Generator().manual_seed(time0 + 2 * packed)
    proj, norm = ZayaCCAProjection(config, 0), ZayaQKNorm(config)
    with torch.no_grad():
        for conv in (proj.conv_qk_depthwise, proj.conv_qk_grouped):
            conv.weight.copy_(0.3 * torch.randn(conv.weight.shape, generator=g))
            conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))
        weight_CdT, bias_C = proj.composed_conv()
    layout, _ = build_layout(config, BATCH, SEQ, torch.device("cpu"), None, None,
                             document_ids() if packed else None, None, 0, None)
    channels = config.query_dim + config.kv_dim
    temp_G = 1 + 0.3 * torch.randn(config.num_key_value_heads, generator=g)
    x_BSC = torch.randn(BATCH, SEQ, channels, generator=g)
    dq = torch.randn(BATCH, SEQ, config.num_attention_heads, config.head_dim, generator=g)
    dk = torch.randn(BATCH, SEQ, config.num_key_value_heads, config.head_dim, generator=g)
    return proj, norm, layout, (x_BSC, weight_CdT, bias_C, temp_G), (dq, dk)


def run(fn, inputs, upstream):
    """Outputs of fn(*inputs) and the gradients of sum(output * upstream) w.r.t. each input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outputs = fn(*leaves)
    sum((out * up).sum() for out, up in zip(outputs, upstream)).backward()
    return [out.detach() for out in outputs], [leaf.grad for leaf in leaves]


@pytest.mark.parametrize(("time0", "packed"), [(2, False), (2, True), (3, True)],
                         ids=["plain_3taps", "packed_3taps", "packed_4taps"])
def test_cca_conv_qk_matches_reference(cca, time0, packed):
    proj, norm, layout, inputs, upstream = case(time0, packed)

    def reference(x, weight, bias, temp):
        q, k = proj.conv_with_skips(x, weight, bias, layout, None)
        return functional_call(norm, {"temp": temp}, (q, k))

    def kernel(x, weight, bias, temp):
        return cca.cca_conv_qk(x, weight, bias, temp, layout.shift_valid_TBS, proj.num_heads, TILED)

    got, got_grads = run(kernel, inputs, upstream)
    want, want_grads = run(reference, inputs, upstream)
    for name, out, ref in zip(("q", "k"), got, want):
        assert out.dtype == torch.float32 and out.shape == ref.shape, name
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=name)
    for name, grad, ref in zip(("x", "weight", "bias", "temp"), got_grads, want_grads):
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():  # the forward alone, as in evaluation
        q, k = kernel(*inputs)
        torch.testing.assert_close(q, want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k, want[1], atol=1e-5, rtol=1e-5)


def test_cca_conv_qk_takes_a_strided_projection(cca):
    """The model passes the q|k columns of the fused q|k|v projection: a view with a row stride beyond C."""
    proj, _, layout, (x_BSC, weight_CdT, bias_C, temp_G), _ = case(2, True)
    wide_BSD = torch.cat([x_BSC, torch.randn(BATCH, SEQ, 5)], dim=-1)
    q, k = cca.cca_conv_qk(wide_BSD[..., : x_BSC.shape[-1]], weight_CdT, bias_C, temp_G, layout.shift_valid_TBS,
                           proj.num_heads, TILED)
    want_q, want_k = cca.cca_conv_qk(x_BSC, weight_CdT, bias_C, temp_G, layout.shift_valid_TBS, proj.num_heads,
                                     TILED)
    torch.testing.assert_close(q, want_q, atol=0, rtol=0)
    torch.testing.assert_close(k, want_k, atol=0, rtol=0)


def test_cca_conv_qk_rejects_mismatched_heads(cca):
    proj, _, _, (x_BSC, weight_CdT, bias_C, temp_G), _ = case(2, False)
    with pytest.raises(ValueError, match="heads"):
        cca.cca_conv_qk(x_BSC, weight_CdT, bias_C, temp_G, None, proj.num_heads + 1)
