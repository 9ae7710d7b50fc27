"""Per-image attacks on a tiny trained CNN: success, exact constraints, targeting semantics, CW search, inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.attacks import BIM, CWL2, FGSM, MIFGSM, PGD, CWLinf, noise_like, parse_eps
from engine.attacks.base import box_bounds
from engine.models import build_model, input_layout
from engine.models.memory import bytes_per_image

EPS = 0.12
CL = torch.channels_last
ITERATIVE = [FGSM, BIM, PGD, MIFGSM, CWLinf]


class TinyCNN(nn.Module):
    """conv-relu-conv-relu-GAP-linear on 1x8x8 images (layers ``relu1``, ``relu2`` hookable)."""

    def __init__(self, num_classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(h.mean(dim=(2, 3)))


def make_data(num_classes: int, n: int, seed: int = 0, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable synthetic images: a fixed smooth template per class plus pixel noise, in [0,1]."""
    gen = torch.Generator().manual_seed(1234)  # templates fixed across splits
    templates = F.avg_pool2d(torch.randn(num_classes, 1, size + 2, size + 2, generator=gen), 3, 1)
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = 0.5 + 0.12 * templates[y] + 0.04 * torch.randn(n, 1, size, size, generator=gen)
    return x.clamp(0, 1), y


def train_tiny(num_classes: int = 3, n: int = 240, steps: int = 150, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A TinyCNN trained to (near) 100% accuracy on make_data; returns (model, train accuracy)."""
    torch.manual_seed(seed)
    model = TinyCNN(num_classes)
    x, y = make_data(num_classes, n, seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean()
    return model, acc


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and do not fight over the shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    model, acc = train_tiny(3)
    assert acc > 0.95
    x, y = make_data(3, 30, seed=7)
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return model, x[keep], y[keep]


def check_linf(adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    """The exact contract: |adv - x| <= eps in exact arithmetic and 0 <= adv <= 1."""
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    if adv.dtype == torch.float32:  # float32 differences are exact in float64
        assert float((adv.double() - x.double()).abs().max()) <= eps
        return
    limit = Fraction(eps)
    for a, b in zip(adv.flatten().tolist(), x.flatten().tolist(), strict=True):
        assert abs(Fraction(a) - Fraction(b)) <= limit


def test_parse_eps() -> None:
    assert parse_eps("8/255") == 8 / 255
    assert parse_eps(" 1/256 ") == 1 / 256
    assert parse_eps("0.03") == 0.03 and parse_eps(0.5) == 0.5 and parse_eps(1) == 1.0 and parse_eps(0) == 0.0
    for bad in ["abc", "1/0", "8//255", -0.1, "-1/255", math.nan, math.inf]:
        with pytest.raises(ValueError, match="eps"):
            parse_eps(bad)
    for bad in [True, None, [0.1]]:
        with pytest.raises(TypeError, match="eps"):
            parse_eps(bad)
    with pytest.raises(ValueError, match="step_size"):
        PGD(nn.Linear(2, 2), eps=0.1, step_size="x")


@pytest.mark.parametrize("cls", ITERATIVE)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_untargeted_succeeds_within_budget(tiny, cls, norm) -> None:
    model, x, y = tiny
    eps = EPS if norm == "linf" else EPS * 8  # same-ish strength on 64 pixels
    result = cls(model, eps=eps, norm=norm, steps=10)(x, y) if cls is not FGSM else cls(model, eps, norm)(x, y)
    assert result.target is None and torch.equal(result.labels, y)
    assert torch.equal(result.success, result.logits.argmax(1) != y)
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y)
        adv_loss = F.cross_entropy(model(result.adv), y)
    assert adv_loss > clean_loss + 1.0
    assert result.success_rate >= (0.5 if cls is FGSM else 0.9)
    if norm == "linf":
        check_linf(result.adv, x, eps)
    else:
        assert float(result.norms_l2.max()) <= eps * (1 + 1e-6)
        assert float(result.adv.min()) >= 0.0 and float(result.adv.max()) <= 1.0
    assert torch.allclose(result.norms_linf, (result.adv - x).flatten(1).abs().amax(1))


@pytest.mark.parametrize("cls", [BIM, PGD, MIFGSM, CWLinf])
def test_targeted_reaches_target(tiny, cls) -> None:
    model, x, y = tiny
    target = (y + 1) % 3
    result = cls(model, eps=EPS, steps=15, targeted=True)(x, target)
    assert torch.equal(result.target, target) and result.labels is None
    assert torch.equal(result.success, result.logits.argmax(1) == target)
    assert result.success_rate >= 0.9
    assert result.loss_history[-1] < result.loss_history[0]  # the minimised objective went down
    check_linf(result.adv, x, EPS)


def test_target_modes(tiny) -> None:
    model, x, y = tiny
    rnd = PGD(model, eps=EPS, steps=5, targeted="random", seed=3)(x, y)
    assert bool((rnd.target != y).all()) and torch.equal(rnd.labels, y)
    assert torch.equal(PGD(model, eps=EPS, steps=5, targeted="random", seed=3)(x, y).target, rnd.target)
    ll = BIM(model, eps=EPS, steps=5, targeted="least_likely")(x, None)
    with torch.no_grad():
        assert torch.equal(ll.target, model(x).argmin(1))
    # untargeted success = label changed; targeted success = target reached (a stricter event)
    untargeted = BIM(model, eps=EPS, steps=10)(x, y)
    assert bool((untargeted.success == (untargeted.logits.argmax(1) != y)).all())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_constraints_exact_on_saturated_pixels(norm) -> None:
    """Pixels at 0 and 1, huge steps and a float64 model: the eps-ball and [0,1] still hold exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 4)).double()
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64)
    x[:, :, 0] = 0.0
    x[:, :, 1] = 1.0
    y = torch.randint(0, 4, (5,))
    for eps in [1 / 256, 8 / 255, 0.3]:
        for cls in ITERATIVE:
            kwargs = {} if cls is FGSM else {"steps": 3, "step_size": 5 * eps}
            res = cls(model, eps=eps, norm=norm, **kwargs)(x, y)
            assert res.adv.dtype == torch.float64
            if norm == "linf":
                check_linf(res.adv, x, eps)
            else:
                assert float(res.norms_l2.max()) <= eps * (1 + 1e-9)
                assert 0.0 <= float(res.adv.min()) and float(res.adv.max()) <= 1.0


def test_box_bounds_rounds_inwards() -> None:
    for dtype in [torch.float32, torch.float64]:
        x = torch.rand(300, dtype=dtype) * 0.98 + 0.01
        for eps in [1 / 255, 1 / 256, 0.1234567, 0.3]:
            lo, hi = box_bounds(x, eps)
            check_linf(lo, x, eps)
            check_linf(hi, x, eps)
            ulp = torch.finfo(dtype).eps
            assert float((lo - (x - eps).clamp(0, 1)).max()) <= ulp  # at most one ulp inwards
            assert float(((x + eps).clamp(0, 1) - hi).max()) <= ulp


def test_cw_l2_binary_search_finds_smaller_perturbations(tiny) -> None:
    model, x, y = tiny
    fixed = CWL2(model, c=20.0, steps=60, lr=0.05, search_steps=1)(x, y)
    search = CWL2(model, c=20.0, steps=60, lr=0.05, search_steps=8)(x, y)  # 5 rounds: ratio 0.80 on AMD EPYC
    assert fixed.success_rate == 1.0 and search.success_rate == 1.0
    assert float(search.norms_l2.mean()) < 0.8 * float(fixed.norms_l2.mean())
    assert float(search.adv.min()) >= 0 and float(search.adv.max()) <= 1
    targeted = CWL2(model, c=1.0, steps=60, lr=0.05, search_steps=3, targeted=True)(x, (y + 2) % 3)
    assert targeted.success_rate >= 0.9


def test_one_logit_model_is_wrapped() -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 1, 4, 4)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    with torch.no_grad():
        model[1].weight.fill_(1.0)
        model[1].bias.fill_(-8.0)
    result = PGD(model, eps=0.2, steps=10)(x, y)
    assert result.logits.shape == (16, 2)
    assert result.success_rate == 1.0
    with torch.no_grad():
        z = model(result.adv)[:, 0]
    assert torch.equal((z > 0).long(), result.logits.argmax(1))


def test_eval_mode_and_no_parameter_grads(tiny) -> None:
    model, x, y = tiny
    model.train()
    mode_seen = []
    handle = model.conv1.register_forward_hook(lambda m, i, o: mode_seen.append(m.training))
    try:
        PGD(model, eps=EPS, steps=2)(x, y)
        CWL2(model, steps=2, search_steps=1)(x, y)
    finally:
        handle.remove()
        model.eval()
    assert mode_seen and not any(mode_seen)
    assert all(p.grad is None for p in model.parameters())


def test_input_gradient_matches_autograd(tiny) -> None:
    model, x, y = tiny
    attack = BIM(model, eps=EPS, steps=1)
    grad, mean_loss = attack.input_grad(x, y, None)
    x64 = x.clone().requires_grad_(True)
    ref = -F.cross_entropy(model(x64), y, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, x64)
    torch.testing.assert_close(grad, ref_grad)
    assert math.isclose(float(mean_loss), float(ref.detach()) / len(y), rel_tol=1e-5)


def test_run_eps_and_odd_inputs(tiny) -> None:
    model, x, y = tiny
    attack = PGD(model, eps=EPS, steps=8)
    results = attack.run_eps(x, y, ["1/255", 0.05, EPS])
    rates = [r.success_rate for r in results]
    assert rates[0] <= rates[-1] and rates[-1] >= 0.9
    for r in results:
        check_linf(r.adv, x, r.eps)
    one = attack(x[:1], y[:1])  # N = 1
    assert one.adv.shape == x[:1].shape
    big = torch.zeros(*x.shape[:3], 2 * x.shape[3])
    big[..., ::2] = x
    wide = big[..., ::2]  # non-contiguous view of the same pixels
    assert not wide.is_contiguous()
    torch.testing.assert_close(attack(wide, y).adv, attack(x, y).adv)
    res = attack(x.double().numpy(), y.numpy())  # numpy in, model dtype out
    assert res.adv.dtype == torch.float32


def test_bad_inputs(tiny) -> None:
    model, x, y = tiny
    attack = PGD(model, eps=EPS, steps=1)
    with pytest.raises(ValueError, match=r"x must hold images in \[0,1\]"):
        attack(x * 2, y)
    with pytest.raises(ValueError, match=r"x must hold images in \[0,1\]"):
        attack(x.masked_fill(x > 0.5, math.nan), y)
    with pytest.raises(TypeError, match="x must be a float tensor"):
        attack((x * 255).to(torch.uint8), y)
    with pytest.raises(ValueError, match="y must have shape"):
        attack(x, y[:-1])
    with pytest.raises(ValueError, match="class indices"):
        attack(x, y + 5)
    with pytest.raises(ValueError, match="targets"):
        PGD(model, eps=EPS, targeted=True)(x, y[:2])
    with pytest.raises(ValueError, match="targeted"):
        PGD(model, eps=EPS, targeted="most_likely")
    with pytest.raises(ValueError, match="steps"):
        PGD(model, eps=EPS, steps=0)
    with pytest.raises(ValueError, match="norm"):
        PGD(model, eps=EPS, norm="l1")
    with pytest.raises(TypeError, match="model"):
        PGD(lambda t: t, eps=EPS)
    with pytest.raises(TypeError, match="constraint"):
        PGD(model, eps=EPS, constraint=object())


def test_noise_like() -> None:
    x = torch.rand(4, 3, 5, 5)
    for kind in ["uniform", "gaussian"]:
        noisy = noise_like(x, "8/255", kind=kind, seed=1)
        check_linf(noisy, x, 8 / 255)
        assert torch.equal(noisy, noise_like(x, "8/255", kind=kind, seed=1))
        assert not torch.equal(noisy, noise_like(x, "8/255", kind=kind, seed=2))
        assert float((noisy - x).abs().mean()) > 0.3 * 8 / 255
    with pytest.raises(ValueError, match="kind"):
        noise_like(x, 0.1, kind="salt")


class ViewHead(nn.Module):
    """Legacy model code: ``.view()`` of a feature map, which a channels-last map refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return self.fc(z.view(z.shape[0], -1))


def test_input_layout_is_channels_last_only_for_image_models_that_accept_it():
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.125, small_stem=True).eval()
    assert input_layout(model, (3, 16, 16)) == torch.channels_last
    assert input_layout(ViewHead(), (3, 8, 8)) == torch.contiguous_format  # the check forward raised
    assert input_layout(nn.Linear(12, 2), (12,)) == torch.contiguous_format  # not a batch of images


def test_attacks_feed_the_model_its_layout_and_return_contiguous_images():
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.125, small_stem=True).eval()
    layouts = []
    hook = lambda _, args: layouts.append((len(args[0]), args[0].is_contiguous(memory_format=CL)))  # noqa: E731
    model.register_forward_pre_hook(hook)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    result = PGD(model, eps=EPS, steps=3, targeted=True)(x, 1 - y)
    assert [cl for n, cl in layouts if n == 4] == [True] * 4  # the three steps and the final prediction
    assert result.adv.is_contiguous() and float((result.adv - x).abs().max()) <= EPS
    legacy = ViewHead()
    legacy.register_forward_pre_hook(lambda _, args: layouts.append((len(args[0]), args[0].is_contiguous())))
    PGD(legacy, eps=EPS, steps=2)(torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 0]))  # runs, on contiguous inputs
    assert [contiguous for n, contiguous in layouts if n == 3] == [True] * 3



def test_gradients_run_in_memory_sized_chunks_with_the_same_result(monkeypatch):
    torch.manual_seed(0)
    model = build_model("resnet18", 2, width=0.125, small_stem=True).double().eval()
    x, y = torch.rand(7, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 0, 1, 0])
    whole = PGD(model, eps=EPS, steps=3, targeted=True)(x, 1 - y)
    per_image = bytes_per_image(model, (3, 16, 16), backward=True)
    monkeypatch.setenv("HFC_ENGINE_MEMORY_GB", str(3.5 * per_image / 2**30))  # room for 3 images' activations
    passes = []
    model.register_forward_hook(lambda _, args, out: passes.append(len(args[0])))
    chunked = PGD(model, eps=EPS, steps=3, targeted=True)(x, 1 - y)
    assert passes[-10:] == [2, 2, 3] * 3 + [7]  # per step three chunks of about equal size; then one prediction
    torch.testing.assert_close(chunked.adv, whole.adv)
    torch.testing.assert_close(chunked.loss_history, whole.loss_history)
    assert torch.equal(chunked.success, whole.success)
