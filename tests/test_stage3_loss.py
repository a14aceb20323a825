"""Fused linear + cross-entropy against plain F.cross_entropy (value, gradients of h and W, argmax counts)."""
import pytest
import torch
import torch.nn.functional as F

from stage3_train.loss import IGNORE, linear_cross_entropy


@pytest.mark.parametrize("chunk", [None, 1, 5, 64])
def test_matches_cross_entropy(chunk):
    g = torch.Generator().manual_seed(chunk or 0)
    N, H, V = 23, 16, 37
    h = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = IGNORE
    ce, raw, correct = linear_cross_entropy(h, w, labels, chunk_size=chunk, loss_weight=0.5)
    (3.4 * ce).backward()
    torch.testing.assert_close(raw, 2 * ce.detach())
    ce = raw
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logits = h2 @ w2.t()
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    (1.7 * ref).backward()
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    keep = labels != IGNORE
    assert correct.item() == int((logits.argmax(-1) == labels)[keep].sum())
    assert not correct.requires_grad


def test_frozen_head_no_grad_and_bf16():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g).bfloat16().requires_grad_()
    w = torch.randn(50, 32, generator=g).bfloat16()              # frozen head: no grad_W is computed
    labels = torch.randint(0, 50, (40,), generator=g)
    labels[5:9] = IGNORE
    ce, _, _ = linear_cross_entropy(h, w, labels, chunk_size=16)
    ce.backward()
    h32 = h.detach().float().requires_grad_()
    ref = F.cross_entropy(h32 @ w.float().t(), labels, ignore_index=IGNORE, reduction="sum")
    ref.backward()
    torch.testing.assert_close(ce, ref, rtol=2e-2, atol=1e-2)
    rel = (h.grad.float() - h32.grad).norm() / h32.grad.norm()  # bf16 operands: ~1e-3..1e-2
    assert rel < 1e-2, rel
    assert h.grad[5:9].abs().sum() == 0
    with torch.no_grad():
        ce2, _, correct2 = linear_cross_entropy(h, w, labels)
    torch.testing.assert_close(ce2, ce.detach())


def test_bad_shapes():
    with pytest.raises(ValueError):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long))


def test_shared_head_grad_accumulator():
    """k calls summed into one loss, one fp32 grad_W buffer: same gradients as separate cross-entropies."""
    from stage3_train.loss import HeadGrad
    g = torch.Generator().manual_seed(2)
    w = torch.randn(11, 8, generator=g, dtype=torch.float64, requires_grad=True)
    hs = [torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    labels = [torch.randint(0, 11, (9,), generator=g) for _ in range(3)]
    acc = HeadGrad()
    total = sum(linear_cross_entropy(h, w, y, chunk_size=4, loss_weight=0.8 ** i, head_grad=acc)[0]
                for i, (h, y) in enumerate(zip(hs, labels)))
    (2.0 * total).backward()
    got = [w.grad.clone(), *(h.grad.clone() for h in hs)]
    for t in (w, *hs):
        t.grad = None
    ref = sum(0.8 ** i * F.cross_entropy(h @ w.t(), y, reduction="sum") for i, (h, y) in enumerate(zip(hs, labels)))
    (2.0 * ref).backward()
    for a, t in zip(got, (w, *hs)):
        torch.testing.assert_close(a, t.grad)


@pytest.mark.gpu
def test_fp32_head_grad_accumulates_inside_the_gemm_on_cuda():
    """CUDA bf16: grad_W accumulated by addmm(out_dtype=fp32) into the shared fp32 buffer over several chunks and
    calls equals the fp32 reference within bf16 rounding of the operands."""
    from stage3_train.loss import HeadGrad, accumulate_mm

    g = torch.Generator(device="cuda").manual_seed(3)
    acc = torch.randn(96, 64, device="cuda", generator=g)
    a, b = (torch.randn(*s, device="cuda", generator=g).bfloat16() for s in ((96, 300), (300, 64)))
    ref = acc + a.float() @ b.float()
    accumulate_mm(acc, a, b)
    torch.testing.assert_close(acc, ref, rtol=1e-4, atol=1e-3)
    w = torch.randn(96, 64, device="cuda", generator=g).bfloat16().requires_grad_()
    hs = [torch.randn(70, 64, device="cuda", generator=g).bfloat16().requires_grad_() for _ in range(2)]
    ys = [torch.randint(0, 96, (70,), device="cuda", generator=g) for _ in range(2)]
    head = HeadGrad()
    sum(linear_cross_entropy(h, w, y, chunk_size=16, head_grad=head)[0] for h, y in zip(hs, ys)).backward()
    w32 = w.detach().float().requires_grad_()
    sum(F.cross_entropy(h.detach().float() @ w32.t(), y, reduction="sum") for h, y in zip(hs, ys)).backward()
    rel = (w.grad.float() - w32.grad).norm() / w32.grad.norm()
    assert rel < 1e-2, rel
