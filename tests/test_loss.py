"""MCLLoss against values computed by hand (plain Python floats, no torch losses)."""
import math

import pytest
import torch

from mcl_kernels.loss import MCLLoss

pytest.importorskip("timm")
from mcl_kernels.models import MCLOutput  # noqa: E402

LARGE = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
SMALL = [[0.5, 0.5, 0.5], [2.0, 0.0, 1.0]]
RECON = [[-1.0, 0.0, 1.0], [1.5, 1.5, -0.5]]
S_TOK = [[[1.0, 2.0], [0.0, -1.0]], [[0.5, 0.5], [3.0, 1.0]]]   # [B=2, N=2, D=2]
R_TOK = [[[1.5, 1.0], [0.0, 1.0]], [[0.5, -0.5], [2.0, 2.0]]]
LABELS = [1, 2]


def output(requires_grad=False, recon=True):
    t = lambda v: torch.tensor(v, requires_grad=requires_grad)  # noqa: E731
    return MCLOutput(t(LARGE), t(SMALL), t(RECON) if recon else None, t(S_TOK), t(R_TOK) if recon else None)


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def ce(logits, labels, eps=0.0):
    """(1 - eps)·(-log p_y) + eps·mean_c(-log p_c), averaged over the batch."""
    total = 0.0
    for row, y in zip(logits, labels):
        lp = log_softmax(row)
        total += (1 - eps) * -lp[y] + eps * -sum(lp) / len(lp)
    return total / len(logits)


def soft_ce(logits, targets):
    return sum(-sum(t * l for t, l in zip(trow, log_softmax(row))) for row, trow in zip(logits, targets)) / len(logits)


def flat(tokens):
    return [v for img in tokens for tok in img for v in tok]


def mse(a, b):
    fa, fb = flat(a), flat(b)
    return sum((x - y) ** 2 for x, y in zip(fa, fb)) / len(fa)


def test_default_loss_is_the_sum_of_four_terms():
    loss, parts = MCLLoss()(output(), torch.tensor(LABELS))
    expected = {"large": ce(LARGE, LABELS), "small": ce(SMALL, LABELS), "recon": ce(RECON, LABELS),
                "recon_mse": mse(R_TOK, S_TOK)}
    assert set(parts) == set(expected)
    for k, v in expected.items():
        assert parts[k].item() == pytest.approx(v, rel=1e-6), k
        assert not parts[k].requires_grad and parts[k].dtype == torch.float32
    assert loss.item() == pytest.approx(sum(expected.values()), rel=1e-6)


def test_weights_and_label_smoothing():
    fn = MCLLoss(label_smoothing=0.1, branch_weights=(1.0, 0.5, 0.25), recon_weight=2.0)
    loss, parts = fn(output(), torch.tensor(LABELS))
    expected = (ce(LARGE, LABELS, 0.1) + 0.5 * ce(SMALL, LABELS, 0.1) + 0.25 * ce(RECON, LABELS, 0.1)
                + 2.0 * mse(R_TOK, S_TOK))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["small"].item() == pytest.approx(ce(SMALL, LABELS, 0.1), rel=1e-6)  # parts are unweighted


def test_soft_targets_from_mixup():
    targets = [[0.1, 0.7, 0.2], [0.0, 0.4, 0.6]]
    fn = MCLLoss(label_smoothing=0.3)  # already in soft targets: not applied again
    loss, parts = fn(output(), torch.tensor(targets))
    for name, logits in (("large", LARGE), ("small", SMALL), ("recon", RECON)):
        assert parts[name].item() == pytest.approx(soft_ce(logits, targets), rel=1e-6)
    assert loss.item() == pytest.approx(soft_ce(LARGE, targets) + soft_ce(SMALL, targets) + soft_ce(RECON, targets)
                                        + mse(R_TOK, S_TOK), rel=1e-6)


def test_timm_mixup_targets_are_accepted():
    from timm.data import Mixup
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3)
    x, y = mix(torch.randn(2, 3, 8, 8), torch.tensor(LABELS))
    loss, parts = MCLLoss()(output(), y)
    assert parts["large"].item() == pytest.approx(soft_ce(LARGE, y.tolist()), rel=1e-6)


@pytest.mark.parametrize("kind", ["l1", "smooth_l1", "cosine"])
def test_other_reconstruction_distances(kind):
    fa, fb = flat(R_TOK), flat(S_TOK)
    if kind == "l1":
        expected = sum(abs(x - y) for x, y in zip(fa, fb)) / len(fa)
    elif kind == "smooth_l1":
        expected = sum(0.5 * (x - y) ** 2 if abs(x - y) < 1 else abs(x - y) - 0.5 for x, y in zip(fa, fb)) / len(fa)
    else:
        toks = [(r, s) for ri, si in zip(R_TOK, S_TOK) for r, s in zip(ri, si)]
        cos = [sum(a * b for a, b in zip(r, s)) / math.sqrt(sum(a * a for a in r) * sum(b * b for b in s))
               for r, s in toks]
        expected = sum(1 - c for c in cos) / len(cos)
    _, parts = MCLLoss(recon_loss=kind)(output(), torch.tensor(LABELS))
    assert parts[f"recon_{kind}"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("detach", [False, True])
def test_reconstruction_gradient_and_detached_target(detach):
    out = output(requires_grad=True)
    loss, _ = MCLLoss(detach_recon_target=detach)(out, torch.tensor(LABELS))
    loss.backward()
    n = len(flat(S_TOK))
    diff = [r - s for r, s in zip(flat(R_TOK), flat(S_TOK))]
    assert out.recon_tokens.grad.flatten().tolist() == pytest.approx([2 * d / n for d in diff], rel=1e-6)
    if detach:
        assert out.small_tokens.grad is None
    else:
        assert out.small_tokens.grad.flatten().tolist() == pytest.approx([-2 * d / n for d in diff], rel=1e-6)


def test_without_reconstruction():
    loss, parts = MCLLoss()(output(recon=False), torch.tensor(LABELS))
    assert set(parts) == {"large", "small"}
    assert loss.item() == pytest.approx(ce(LARGE, LABELS) + ce(SMALL, LABELS), rel=1e-6)


def test_bf16_logits_are_scored_in_float32():
    out = output()
    out = out._replace(large=out.large.bfloat16(), small=out.small.bfloat16(), recon=out.recon.bfloat16())
    loss, _ = MCLLoss()(out, torch.tensor(LABELS))
    assert loss.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match="3 weights"):
        MCLLoss(branch_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="recon_loss must be one of"):
        MCLLoss(recon_loss="kl")
    with pytest.raises(ValueError, match="label_smoothing"):
        MCLLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        MCLLoss(recon_weight=-1.0)
    fn = MCLLoss()
    with pytest.raises(ValueError, match=r"soft targets must match the logits \[B, classes\]: got \(2, 4\) vs "):
        fn(output(), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="B=3"):
        fn(output(), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class ids"):
        fn(output(), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="class ids"):
        fn(output(), torch.zeros(2, 3, 1))
