"""TTT attention (causal flash block + log-sum-exp merged diagonal keys) against a naive masked softmax."""
import pytest
import torch

from stage3_train.attention import Segments, reference_ttt_attention, ttt_attention


def _inputs(doc_ids, heads, kv_heads, head_dim, depth, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    N = len(doc_ids)
    q = torch.randn(N, heads, head_dim, generator=g, dtype=dtype).requires_grad_()
    ks = [torch.randn(N, kv_heads, head_dim, generator=g, dtype=dtype).requires_grad_() for _ in range(depth + 1)]
    vs = [torch.randn(N, kv_heads, head_dim, generator=g, dtype=dtype).requires_grad_() for _ in range(depth + 1)]
    return q, ks, vs


@pytest.mark.parametrize("lengths,depth,heads,kv_heads", [
    ([1], 0, 2, 2),
    ([7], 1, 4, 2),
    ([5, 11, 3], 3, 4, 1),
    ([16, 1, 9], 6, 6, 3),
])
def test_matches_reference_fp64(lengths, depth, heads, kv_heads):
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    q, ks, vs = _inputs(doc_ids, heads, kv_heads, 8, depth, torch.float64, seed=len(lengths) + depth)
    seg = Segments.from_doc_ids(doc_ids[None])
    out = ttt_attention(q, ks, vs, seg)
    ref = reference_ttt_attention(q, ks, vs, doc_ids)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    inputs = [q, *ks, *vs]
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(ref, inputs, grad)
    for name, a, b in zip(["q"] + [f"k{j}" for j in range(depth + 1)] + [f"v{j}" for j in range(depth + 1)], got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def test_fp32_and_padding_segments():
    # two packed rows, the second ending in padding (-1): the padding run is its own island
    doc_ids_BT = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, -1, -1, -1]])
    flat = (doc_ids_BT + 10 * torch.arange(2)[:, None]).reshape(-1)  # row-unique doc ids for the reference
    q, ks, vs = _inputs(flat, 4, 2, 16, 2, torch.float32, seed=3)
    out = ttt_attention(q, ks, vs, Segments.from_doc_ids(doc_ids_BT))
    ref = reference_ttt_attention(q, ks, vs, flat)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
    g_out = [t.grad.clone() for t in (q, *ks, *vs)]
    for t in (q, *ks, *vs):
        t.grad = None
    (ref * torch.arange(ref.numel()).view_as(ref).sin()).sum().backward()
    for a, t in zip(g_out, (q, *ks, *vs)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-5)


def test_segments_from_doc_ids_and_errors():
    seg = Segments.from_doc_ids(torch.tensor([[0, 0, 1, -1], [0, 1, 1, 1]]))
    assert seg.bounds == (0, 2, 3, 4, 5, 8) and seg.max_len == 3
    assert seg.cu_seqlens.dtype == torch.int32
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError):
        ttt_attention(q, [torch.randn(4, 2, 8)], [], Segments.from_bounds([0, 4]))
    with pytest.raises(ValueError):
        ttt_attention(q, [torch.randn(4, 3, 8)], [torch.randn(4, 3, 8)], Segments.from_bounds([0, 4]))
    with pytest.raises(ValueError):
        Segments.from_bounds([0, 3, 3])


def _gqa_inputs():
    q = torch.randn(6, 4, 8)
    k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    return q, k, v, Segments.from_bounds((0, 6)).causal_block()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered")])
def test_flash_fallback_never_triggers_on_oom_or_other_errors(monkeypatch, error):
    """The varlen path (the CUDA kernel stood in by a CPU fake): OOM and foreign errors propagate, native GQA
    stays on (expanding K/V would need MORE memory)."""
    from stage3_train import attention

    def kernel(*args, **kw):
        raise error

    monkeypatch.setattr(attention, "_flash_kernels", lambda: (kernel, None))
    monkeypatch.setitem(attention._FLASH, "native_gqa", True)
    q, k, v, blk = _gqa_inputs()
    with pytest.raises(type(error)):
        attention._varlen_forward(q, k, v, blk, 0.35)
    assert attention._FLASH["native_gqa"] is True


def test_flash_fallback_expands_kv_when_the_kernel_refuses_gqa(monkeypatch):
    from stage3_train import attention

    seen_kv_heads = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, ret, scale):
        seen_kv_heads.append(k.shape[1])
        if k.shape[1] != q.shape[1]:
            raise RuntimeError("Number of heads in key/value must equal the number of heads in query")
        return torch.zeros_like(q), torch.zeros(q.shape[1], q.shape[0]), None, None, None

    monkeypatch.setattr(attention, "_flash_kernels", lambda: (kernel, None))
    monkeypatch.setitem(attention._FLASH, "native_gqa", True)
    q, k, v, blk = _gqa_inputs()
    out, lse, (_, _, expand) = attention._varlen_forward(q, k, v, blk, 0.35)
    assert seen_kv_heads == [2, 4] and expand and attention._FLASH["native_gqa"] is False
