import re

import pytest
import torch
import torch.nn.functional as F

from refilled.models import AUTHORS_ARCHS, KNOWN_ARCHS, ModelOutput, build_model, parse_arch

torch.manual_seed(0)

MOBILENET_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


def wrn_param_count(depth, width, num_classes):
    """Conv (no bias) + BN (weight, bias) + Linear parameters of the pre-activation CIFAR WRN."""
    n = (depth - 4) // 6
    total = 3 * 3 * 3 * 16
    c_in = 16
    for c_out in (16 * width, 32 * width, 64 * width):
        for _ in range(n):
            total += 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out
            total += c_in * c_out if c_in != c_out else 0
            c_in = c_out
    return total + 2 * c_in + c_in * num_classes + num_classes


def mobilenet_param_count(alpha, num_classes):
    def ch(c):
        return max(8, int(c * alpha))

    c_in = ch(32)
    total = 3 * 3 * 3 * c_in + 2 * c_in
    for c, _ in MOBILENET_BLOCKS:
        c_out = ch(c)
        total += 9 * c_in + 2 * c_in + c_in * c_out + 2 * c_out
        c_in = c_out
    return total + c_in * num_classes + num_classes


def n_params(name, num_classes):
    with torch.device("meta"):
        model = build_model(name, num_classes)
    return sum(p.numel() for p in model.parameters())


def run(name, size, num_classes=7, train=False):
    model = build_model(name, num_classes).train(train)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return model, x, model(x)


def test_known_archs_are_the_paper_set():
    assert len(set(KNOWN_ARCHS)) == len(KNOWN_ARCHS)
    assert set(KNOWN_ARCHS) == {
        "wrn-40-2", "wrn-16-2", "wrn-40-1", "wrn-16-1", "wrn-28-4", "wrn-16-4", "wrn-28-2",
        "mobilenet-1.0", "mobilenet-0.75", "mobilenet-0.5", "mobilenet-0.25",
    }
    # Tables 1 and 2 in the authors' code too (Table 3 ran Overhaul's code, whose WRN is ours)
    assert set(AUTHORS_ARCHS) == {
        "wrn-authors-40-2", "wrn-authors-16-2", "wrn-authors-40-1", "wrn-authors-16-1",
        "mobilenet-authors-1.0", "mobilenet-authors-0.75", "mobilenet-authors-0.5", "mobilenet-authors-0.25",
    }


@pytest.mark.parametrize(
    "name,size", [(a, 32) for a in KNOWN_ARCHS + AUTHORS_ARCHS]
    + [("mobilenet-1.0", 224), ("mobilenet-0.25", 224), ("mobilenet-authors-0.25", 224)]
)
def test_forward_shapes(name, size):
    model, _, out = run(name, size)
    assert isinstance(out, ModelOutput)
    assert model.num_classes == 7
    assert out.logits.shape == (2, 7)
    assert out.embedding.shape == (2, model.embedding_dim)
    assert model.head.in_features == model.embedding_dim
    assert isinstance(out.features, tuple) and len(out.features) > 0
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in out.features)
    assert out.features[-1].shape[1] == model.embedding_dim
    assert torch.isfinite(out.logits).all()


def test_feature_layout():
    _, _, out = run("wrn-16-2", 32)
    assert [tuple(f.shape[1:]) for f in out.features] == [(32, 32, 32), (64, 16, 16), (128, 8, 8)]
    _, _, out = run("mobilenet-0.5", 224)
    assert [tuple(f.shape[1:]) for f in out.features] == [
        (32, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]


def test_param_count_wrn_28_10_matches_paper_code():
    assert wrn_param_count(28, 10, 10) == 36_479_194
    assert n_params("wrn-28-10", 10) == 36_479_194


@pytest.mark.parametrize("depth,width", [(40, 2), (16, 1), (28, 4), (16, 4)])
def test_param_count_wrn(depth, width):
    if (depth, width) == (40, 2):
        assert wrn_param_count(40, 2, 100) == 2_255_156
    assert n_params(f"wrn-{depth}-{width}", 100) == wrn_param_count(depth, width, 100)


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.5, 0.25])
def test_param_count_mobilenet(alpha):
    if alpha == 1.0:
        assert mobilenet_param_count(1.0, 1000) == 4_231_976
    assert n_params(f"mobilenet-{alpha}", 1000) == mobilenet_param_count(alpha, 1000)


@pytest.mark.parametrize("name", ["wrn-16-2", "mobilenet-0.5", "wrn-authors-16-2", "mobilenet-authors-0.5"])
@pytest.mark.parametrize("train", [False, True])
def test_embedding_feeds_head(name, train):
    model, _, out = run(name, 32, train=train)
    torch.testing.assert_close(model.head(out.embedding), out.logits)


@pytest.mark.parametrize("name", ["wrn-16-2", "wrn-authors-16-2"])
def test_wrn_embedding_is_pooled_final_activation(name):
    model = build_model(name, 5).eval()
    captured = {}
    model.relu.register_forward_hook(lambda m, i, o: captured.setdefault("act", o.clone()))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(out.embedding, captured["act"].mean((2, 3)))
        torch.testing.assert_close(out.embedding, F.relu(model.bn(out.features[-1])).mean((2, 3)))


def test_mobilenet_embedding_is_pooled_final_activation():
    _, _, out = run("mobilenet-0.5", 64)
    torch.testing.assert_close(out.embedding, F.relu(out.features[-1]).mean((2, 3)))


@pytest.mark.parametrize("name", ["wrn-16-2", "mobilenet-0.5", "wrn-authors-16-2", "mobilenet-authors-0.5"])
def test_features_are_pre_relu(name):
    _, _, out = run(name, 32, train=True)
    assert all((f < 0).any() for f in out.features)
    assert (out.embedding >= 0).all()


def test_parse_arch():
    assert parse_arch("wrn-40-2") == ("wrn", (40, 2))
    assert parse_arch("mobilenet-1") == ("mobilenet", (1.0,))
    assert parse_arch("mobilenet-0.75") == ("mobilenet", (0.75,))
    model = build_model("mobilenet-1", 10)
    assert model.embedding_dim == 1024


@pytest.mark.parametrize("name", ["wrn-41-2", "resnet-18", "mobilenet-x", "wrn-16-0", "mobilenet-0", "wrn-16", ""])
def test_bad_names_raise(name):
    with pytest.raises(ValueError, match=re.escape(repr(name))) as info:
        build_model(name, 10)
    assert "wrn-<depth>-<width>" in str(info.value) and "mobilenet-<alpha>" in str(info.value)
    assert all(a in str(info.value) for a in KNOWN_ARCHS + AUTHORS_ARCHS)


def test_bad_wrn_depth_direct():
    from refilled.models import WideResNet

    with pytest.raises(ValueError, match="41"):
        WideResNet(41, 2, 10)


@pytest.mark.parametrize("name", ["wrn-16-2", "mobilenet-0.5", "wrn-authors-16-2", "mobilenet-authors-0.5"])
def test_channels_last_bf16_autocast(name):
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).logits
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.to(memory_format=torch.channels_last))
    logits = out.logits.float()
    assert torch.isfinite(logits).all()
    assert (logits - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("name", ["wrn-16-1", "mobilenet-0.25", "wrn-authors-16-1", "mobilenet-authors-0.25"])
def test_compiles_without_graph_breaks(name):
    model = build_model(name, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out.logits, model(x).logits)
    assert isinstance(out, ModelOutput)


@pytest.mark.parametrize("name", ["wrn-16-1", "mobilenet-0.25", "wrn-authors-16-1", "mobilenet-authors-0.25"])
def test_backward_through_all_outputs(name):
    model = build_model(name, 10).train().to(memory_format=torch.channels_last)
    out = model(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last))
    loss = out.logits.sum() + out.embedding.pow(2).sum() + sum(f.pow(2).mean() for f in out.features)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["wrn-16-2", "wrn-10-1", "mobilenet-0.5", "wrn-authors-10-1", "mobilenet-authors-0.5"])
@pytest.mark.parametrize("train", [False, True])
def test_pre_relu_features_are_the_bn_outputs(name, train):
    """Each pre-ReLU feature is its BN applied to the stage output (recomputed here from the
    stage outputs, eval mode: running statistics), and each BN runs once per forward."""
    model = build_model(name, 5).train(train)
    calls = {}
    for i, bn in enumerate(model.bn_before_relu()):
        bn.register_forward_hook(lambda m, inp, out, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    bns = model.bn_before_relu()
    assert len(out.pre_relu) == len(bns) == len(out.features)
    assert calls == {i: 1 for i in range(len(bns))}
    assert all((p < 0).any() for p in out.pre_relu)
    if not train and name.startswith("wrn"):
        model.eval()
        with torch.no_grad():
            for f, p, bn in zip(out.features, out.pre_relu, bns):
                torch.testing.assert_close(p, bn(f))
            torch.testing.assert_close(out.embedding, F.relu(out.pre_relu[-1]).mean((2, 3)))
