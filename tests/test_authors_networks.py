"""The authors' networks (`wrn-authors-*`, `mobilenet-authors-*`) against a description of
their layers written here from njulus/GKD's `networks/wide_resnet.py` and
`networks/mobile_net.py`: module by module (type, shape, stride, padding, groups, bias, BN
momentum, dropout), parameter counts, a functional forward (F.conv2d, F.batch_norm, ...)
written here from their `forward`s with the same weights, their default initialisation, and
how our own networks differ from theirs."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from cli_runner import cli
from methods_cases import CASE_IDS, batches, build_case
from torch import nn

from refilled.models.archs import ARCH_PATTERN, AUTHORS, AUTHORS_ARCHS, OURS, arch_code, arch_ok, paper_name, parse_arch
from refilled.models import AuthorsMobileNet, AuthorsWideResNet, build_model

# ------------------------------------------------------------------------------------------------
# Their layers, as (kind, attributes) leaves
# ------------------------------------------------------------------------------------------------


def conv(cin, cout, k, stride, pad, bias, groups=1):
    return ("conv", {"in": cin, "out": cout, "k": k, "stride": stride, "pad": pad, "groups": groups, "bias": bias})


def bn(c, momentum=0.1):
    return ("bn", {"c": c, "momentum": momentum, "eps": 1e-5, "affine": True})


def dropout(p):
    return ("dropout", {"p": p})


def linear(i, o, bias=True):
    return ("linear", {"in": i, "out": o, "bias": bias})


def their_wrn(depth, width, classes, dropout_rate):
    """wide_resnet.py: MyNetwork.__init__, generate_layer and BasicBlock.__init__."""
    n = (depth - 4) // 6
    ch = [16, 16 * width, 32 * width, 64 * width]
    blocks = []
    for i, first_stride in enumerate((1, 2, 2)):
        for j in range(n):
            cin, cout, stride = (ch[i], ch[i + 1], first_stride) if j == 0 else (ch[i + 1], ch[i + 1], 1)
            blocks.append({"bn1": bn(cin), "conv1": conv(cin, cout, 3, 1, 1, True), "dropout": dropout(dropout_rate),
                           "bn2": bn(cout), "conv2": conv(cout, cout, 3, stride, 1, True),
                           "shortcut": conv(cin, cout, 1, stride, 0, True) if stride != 1 or cin != cout else None,
                           "group": i, "last_of_group": j == n - 1})
    return {"stem": [conv(3, 16, 3, 1, 1, True)], "blocks": blocks, "bn": bn(ch[3], momentum=0.9),
            "fc": linear(ch[3], classes), "block_order": ("bn1", "conv1", "dropout", "bn2", "conv2", "shortcut")}


# WRN-(10,2), one block per group, written out by hand from their file (the generator above must agree)
WRN_10_2_BY_HAND = [
    conv(3, 16, 3, 1, 1, True),
    bn(16), conv(16, 32, 3, 1, 1, True), dropout(0.3), bn(32), conv(32, 32, 3, 1, 1, True), conv(16, 32, 1, 1, 0, True),
    bn(32), conv(32, 64, 3, 1, 1, True), dropout(0.3), bn(64), conv(64, 64, 3, 2, 1, True), conv(32, 64, 1, 2, 0, True),
    bn(64), conv(64, 128, 3, 1, 1, True), dropout(0.3), bn(128), conv(128, 128, 3, 2, 1, True),
    conv(64, 128, 1, 2, 0, True),
    bn(128, momentum=0.9), linear(128, 7),
]

MOBILENET_CFG = [64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024]


def their_mobilenet(ca, classes):
    """mobile_net.py: MyNetwork.__init__ (flag_general=False, flag_bias=True), generate_layers
    and BasicBlock.__init__."""
    cfg = [(int(c * ca), 1) if isinstance(c, int) else (int(c[0] * ca), c[1]) for c in MOBILENET_CFG]
    first = int(32 * ca)
    blocks, cin = [], first
    for i, (cout, stride) in enumerate(cfg):
        blocks.append({"conv1": conv(cin, cin, 3, stride, 1, False, groups=cin), "bn1": bn(cin),
                       "conv2": conv(cin, cout, 1, 1, 0, False), "bn2": bn(cout),
                       # the stage ends: the last block before a strided one, and the last block
                       "stage_end": i == len(cfg) - 1 or cfg[i + 1][1] == 2})
        cin = cout
    return {"stem": [conv(3, first, 3, 2, 1, False), bn(first)], "blocks": blocks, "fc": linear(cfg[-1][0], classes),
            "block_order": ("conv1", "bn1", "conv2", "bn2")}


def leaves(desc):
    """The layers of a description in their file's order of construction."""
    out = list(desc["stem"])
    for b in desc["blocks"]:
        out += [b[k] for k in desc["block_order"] if b[k] is not None]
    return out + ([desc["bn"]] if "bn" in desc else []) + [desc["fc"]]


def module_leaf(m):
    """A module as a leaf (None: a module without parameters or behaviour to compare, e.g. ReLU)."""
    if isinstance(m, nn.Conv2d):
        assert m.kernel_size[0] == m.kernel_size[1] and m.stride[0] == m.stride[1] and m.padding[0] == m.padding[1]
        return conv(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.bias is not None,
                    m.groups)
    if isinstance(m, nn.BatchNorm2d):
        return ("bn", {"c": m.num_features, "momentum": m.momentum, "eps": m.eps, "affine": m.affine})
    if isinstance(m, nn.Dropout):
        return dropout(m.p)
    if isinstance(m, nn.Linear):
        return linear(m.in_features, m.out_features, m.bias is not None)
    return None


def model_leaves(model):
    pairs = [(module_leaf(m), m) for m in model.modules() if not list(m.children())]
    return [(leaf, m) for leaf, m in pairs if leaf is not None]


def leaf_params(leaf):
    kind, a = leaf
    if kind == "conv":
        return a["out"] * a["in"] // a["groups"] * a["k"] ** 2 + (a["out"] if a["bias"] else 0)
    if kind == "bn":
        return 2 * a["c"]
    if kind == "linear":
        return a["in"] * a["out"] + (a["out"] if a["bias"] else 0)
    return 0


def bind(desc, model):
    """Check the model's layers are the description's, one for one; the description with
    each leaf replaced by its module."""
    theirs, ours = leaves(desc), model_leaves(model)
    assert [leaf for leaf, _ in ours] == theirs
    modules = iter(m for _, m in ours)
    bound = {"stem": [next(modules) for _ in desc["stem"]],
             "blocks": [{**b, **{k: next(modules) for k in desc["block_order"] if b[k] is not None}}
                        for b in desc["blocks"]]}
    if "bn" in desc:
        bound["bn"] = next(modules)
    bound["fc"] = next(modules)
    assert next(modules, None) is None
    return bound


# ------------------------------------------------------------------------------------------------
# Their forwards, functionally
# ------------------------------------------------------------------------------------------------


def f_conv(x, m):
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, 1, m.groups)


def f_bn(x, m, train, stats):
    """Eval: running statistics; train: batch statistics, the running ones updated (in `stats`,
    copies) with the BN's momentum."""
    if m not in stats:
        stats[m] = (m.running_mean.clone(), m.running_var.clone())
    mean, var = stats[m]
    return F.batch_norm(x, mean, var, m.weight, m.bias, train, m.momentum, m.eps)


def their_wrn_forward(bound, x, train, stats):
    """wide_resnet.py: MyNetwork.forward and BasicBlock.forward (dropout off: eval, or p = 0)."""
    y = f_conv(x, bound["stem"][0])
    features, pre_relu = [], []
    for b in bound["blocks"]:
        t = f_conv(F.relu(f_bn(y, b["bn1"], train, stats)), b["conv1"])
        t = f_conv(F.relu(f_bn(t, b["bn2"], train, stats)), b["conv2"])
        y = t + (y if b["shortcut"] is None else f_conv(y, b["shortcut"]))
        if b["last_of_group"]:
            features.append(y)
    blocks = bound["blocks"]
    next_bns = [b["bn1"] for i, b in enumerate(blocks) if i > 0 and blocks[i - 1]["last_of_group"]] + [bound["bn"]]
    # the BN before the next ReLU of each group's output; in train mode its batch statistics
    # are those of this very tensor, so recomputing it gives the tensor the block consumed
    pre_relu = [f_bn(f, m, train, {}) for f, m in zip(features, next_bns)]
    final = f_bn(y, bound["bn"], train, stats)
    embedding = F.relu(final).mean((2, 3))
    logits = F.linear(embedding, bound["fc"].weight, bound["fc"].bias)
    return logits, embedding, features, pre_relu


def their_mobilenet_forward(bound, x, train, stats):
    """mobile_net.py: MyNetwork.forward and BasicBlock.forward."""
    c1, b1 = bound["stem"]
    y = F.relu(f_bn(f_conv(x, c1), b1, train, stats))
    features = []
    for b in bound["blocks"]:
        y = F.relu(f_bn(f_conv(y, b["conv1"]), b["bn1"], train, stats))
        pre = f_bn(f_conv(y, b["conv2"]), b["bn2"], train, stats)
        if b["stage_end"]:
            features.append(pre)
        y = F.relu(pre)
    embedding = y.mean((2, 3))
    logits = F.linear(embedding, bound["fc"].weight, bound["fc"].bias)
    return logits, embedding, features, features


# ------------------------------------------------------------------------------------------------
# Module by module
# ------------------------------------------------------------------------------------------------

WRN_SHAPES = [(10, 1), (10, 2), (16, 1), (16, 2), (40, 1), (40, 2)]
ALPHAS = [1.0, 0.75, 0.5, 0.25, 0.125]


def test_the_generator_agrees_with_the_layers_written_by_hand():
    assert leaves(their_wrn(10, 2, 7, 0.3)) == WRN_10_2_BY_HAND


@pytest.mark.parametrize("depth,width", WRN_SHAPES)
@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_wrn_authors_has_their_layers(depth, width, rate):
    desc = their_wrn(depth, width, 100, rate)
    model = build_model(f"wrn-authors-{depth}-{width}", 100, dropout=rate)
    assert isinstance(model, AuthorsWideResNet)
    bind(desc, model)
    assert sum(p.numel() for p in model.parameters()) == sum(leaf_params(x) for x in leaves(desc))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_mobilenet_authors_has_their_layers(alpha):
    desc = their_mobilenet(alpha, 200)
    model = build_model(f"mobilenet-authors-{alpha}", 200)
    assert isinstance(model, AuthorsMobileNet)
    bind(desc, model)
    assert sum(p.numel() for p in model.parameters()) == sum(leaf_params(x) for x in leaves(desc))


def test_parameter_counts_by_hand():
    """WRN-(40,2), 100 classes: ours (2,255,156, tests/test_models.py) plus their conv biases:
    the stem's 16, 2 x 6 blocks' two 3x3s per group (32, 64, 128 channels) and the three 1x1
    shortcuts. MobileNet 1.0 at 1000 classes: ours, 4,231,976 (no conv bias in either)."""
    biases = 16 + sum(2 * 6 * c + c for c in (32, 64, 128))
    count = lambda name, n: sum(p.numel() for p in build_model(name, n).parameters())
    assert count("wrn-authors-40-2", 100) == 2_255_156 + biases == 2_258_084
    assert count("mobilenet-authors-1.0", 1000) == 4_231_976


def their_wrn_by_our_names(desc):
    """{our module path: their leaf}: their stem conv1, layer<g+1>[j].<x>, bn and fc are our
    conv1, groups.<g>.<j>.<x>, bn and head."""
    named, j = {"conv1": desc["stem"][0], "bn": desc["bn"], "head": desc["fc"]}, 0
    for b in desc["blocks"]:
        named.update({f"groups.{b['group']}.{j}.{k}": b[k] for k in desc["block_order"] if b[k] is not None})
        j = 0 if b["last_of_group"] else j + 1
    return named


def test_our_wrn_differs_from_theirs_in_bias_stride_and_final_momentum_only():
    """Ours (wrn-40-2, dropout 0.3 so that both have the Dropout modules) against their layers,
    module by module: no conv of ours has a bias, our downsampling blocks stride their first
    3x3 instead of their second, and our final BN has PyTorch's momentum 0.1 instead of 0.9.
    (The shortcut's input and the initialisation are not in a module list: the forward and
    init tests cover them.)"""
    desc = their_wrn(40, 2, 100, 0.3)
    theirs = their_wrn_by_our_names(desc)
    ours = {name: module_leaf(m) for name, m in build_model("wrn-40-2", 100, dropout=0.3).named_modules()
            if module_leaf(m) is not None}
    assert ours.keys() == theirs.keys()
    found = {(name, key) for name, (kind, a) in theirs.items() for key in a
             if ours[name][0] != kind or a[key] != ours[name][1][key]}
    expected = {(name, "bias") for name, (kind, _) in theirs.items() if kind == "conv"}
    expected |= {(f"groups.{g}.0.{conv}", "stride") for g in (1, 2) for conv in ("conv1", "conv2")}
    expected.add(("bn", "momentum"))
    assert found == expected


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_our_mobilenet_has_their_layers_from_alpha_quarter_up(alpha):
    bind(their_mobilenet(alpha, 200), build_model(f"mobilenet-{alpha}", 200))


def test_our_mobilenet_floors_channels_at_8_below_a_quarter():
    with pytest.raises(AssertionError):
        bind(their_mobilenet(0.125, 200), build_model("mobilenet-0.125", 200))  # their stem: 4 channels, ours 8


# ------------------------------------------------------------------------------------------------
# Forward: the model against the functional forward from their file
# ------------------------------------------------------------------------------------------------


def _randomise_bn(model, g):
    """Running statistics and affine parameters away from (0, 1) so that an eval-mode forward
    tests them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


CASES = [("wrn-authors-10-2", 32), ("wrn-authors-16-1", 32), ("mobilenet-authors-0.25", 32),
         ("mobilenet-authors-0.5", 64)]


@pytest.mark.parametrize("name,size", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_forward_matches_their_functional_forward(name, size, train):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    family, args = parse_arch(name)
    model = build_model(name, 7).train(train)
    desc = their_wrn(*args, 7, 0.0) if family == "wrn" else their_mobilenet(*args, 7)
    bound = bind(desc, model)
    _randomise_bn(model, g)
    x = torch.randn(4, 3, size, size, generator=g)
    forward = their_wrn_forward if family == "wrn" else their_mobilenet_forward
    stats = {}
    with torch.no_grad():
        logits, embedding, features, pre_relu = forward(bound, x, train, stats)
        out = model(x)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.embedding, embedding, rtol=1e-4, atol=1e-5)
    assert len(out.features) == len(features) and len(out.pre_relu) == len(pre_relu)
    for a, b in zip(out.features + out.pre_relu, tuple(features) + tuple(pre_relu)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if train:   # the running statistics moved as their BNs' momenta say
        for m, (mean, var) in stats.items():
            torch.testing.assert_close(m.running_mean, mean)
            torch.testing.assert_close(m.running_var, var)


def test_final_bn_keeps_nine_tenths_of_the_last_batch():
    """momentum=0.9 in PyTorch: running = 0.1 * old + 0.9 * batch (computed here by hand)."""
    model = build_model("wrn-authors-10-1", 3).train()
    with torch.no_grad():
        model.bn.running_mean.fill_(1.0)
        out = model(torch.randn(5, 3, 16, 16))
    batch_mean = out.features[-1].mean((0, 2, 3))
    torch.testing.assert_close(model.bn.running_mean, 0.1 * 1.0 + 0.9 * batch_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["wrn-authors-16-2", "mobilenet-authors-0.5"])
def test_default_pytorch_initialisation(name):
    """Their conv_init is never applied: every conv and linear keeps PyTorch's
    kaiming_uniform(a=sqrt(5)) weights and uniform biases, both within 1/sqrt(fan_in), the
    biases not zero; BNs (1, 0)."""
    torch.manual_seed(0)
    model = build_model(name, 10)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            bound = fan_in ** -0.5
            assert m.weight.abs().max() <= bound + 1e-7, m
            assert m.weight.abs().max() > 0.5 * bound, m   # drawn over the whole interval, not a narrow normal
            if m.bias is not None:
                assert m.bias.abs().max() <= bound + 1e-7 and (m.bias != 0).any(), m
        elif isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    assert model.head.bias is not None


def test_shortcut_reads_the_raw_input():
    """Their BasicBlock adds shortcut(x), x the block's input, not relu(bn1(x)): with bn1 made
    to zero the activated input, the block's output still depends on x through the shortcut."""
    model = build_model("wrn-authors-10-1", 3).eval()
    block = model.groups[1][0]
    with torch.no_grad():
        block.bn1.weight.zero_()
        block.bn1.bias.fill_(-1.0)     # relu(bn1(x)) == 0 for every x
        x = torch.randn(2, 16, 8, 8)
        a, b = block(x), block(x + 1.0)
        torch.testing.assert_close(b - a, block.shortcut(x + 1.0) - block.shortcut(x))
        assert (b - a).abs().max() > 0.01


# ------------------------------------------------------------------------------------------------
# Names, the catalog's methods, the CLI
# ------------------------------------------------------------------------------------------------


def test_names():
    assert all(re.fullmatch(ARCH_PATTERN, a) and arch_ok(a) for a in AUTHORS_ARCHS)
    assert parse_arch("wrn-authors-40-2") == parse_arch("wrn-40-2") == ("wrn", (40, 2))
    assert parse_arch("mobilenet-authors-0.5") == ("mobilenet", (0.5,))
    assert [arch_code(a) for a in ("wrn-authors-16-1", "wrn-16-1", "mobilenet-authors-1.0")] == [AUTHORS, OURS, AUTHORS]
    assert [paper_name(a) for a in AUTHORS_ARCHS] == ["wrn-40-2", "wrn-16-2", "wrn-40-1", "wrn-16-1", "mobilenet-1.0",
                                                      "mobilenet-0.75", "mobilenet-0.5", "mobilenet-0.25"]
    assert type(build_model("wrn-16-1", 3)).__name__ == "WideResNet"


@pytest.mark.parametrize("name", ["wrn-authors-41-2", "wrn-authors-16-0", "mobilenet-authors-0.03",
                                  "mobilenet-authors-0", "wrn-ours-16-1", "authors-wrn-16-1", "wrn-authors-16"])
def test_bad_authors_names(name):
    assert not re.fullmatch(ARCH_PATTERN, name) or not arch_ok(name)
    with pytest.raises(ValueError, match=re.escape(repr(name))) as info:
        build_model(name, 10)
    assert "wrn-authors-<depth>-<width>" in str(info.value)


@pytest.mark.parametrize("student,teacher", [("wrn-authors-10-1", "wrn-authors-10-2"),
                                             ("mobilenet-authors-0.25", "mobilenet-authors-0.5")])
@pytest.mark.parametrize("case", CASE_IDS)
def test_every_method_steps_on_the_authors_networks(case, student, teacher):
    """What the methods read (embedding, features, pre-ReLU BNs, head) is there: one loss and
    backward of every catalog method, finite, with gradients on the student."""
    method = build_case(case, student_arch=student, teacher_arch=teacher, prepare_batches=batches(1, seed=9))
    method.train()
    x, y = batches(1)[0]
    logits, terms = method.loss(x, y)
    total = sum(terms.values())
    total.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(total)
    grads = [p.grad for p in method.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_train_and_reload_through_the_cli(tmp_path):
    from fakedata import make_fashion_idx

    from refilled.training.checkpoints import load_model

    root = tmp_path / "data"
    make_fashion_idx(root, 4, 2)
    split = tmp_path / "split.json"
    assert cli(["split", "--dataset", "fashion-mnist", "--ratio", 0.5, "--seed", 0, "--classes-per-task", 2,
                "--out", split])[0] == 0
    rc, _, err = cli(["train", "--method", "student", "--split", split, "--arch", "wrn-authors-10-1", "--data-root",
                      root, "--no-checksum", "--epochs", 1, "--batch-size", 4, "--device", "cpu",
                      "--out", tmp_path / "run"])
    assert rc == 0, err
    model, meta = load_model(tmp_path / "run" / "model.pt")
    assert isinstance(model, AuthorsWideResNet) and model.bn.momentum == 0.9
    rc, _, err = cli(["train", "--method", "student", "--split", split, "--arch", "wrn-author-10-1", "--data-root",
                      root, "--no-checksum", "--epochs", 1, "--device", "cpu", "--out", tmp_path / "bad"])
    assert rc == 2 and "wrn-author-10-1" in err and not (tmp_path / "bad" / "model.pt").exists()


def test_paper_profile_defaults_to_the_authors_networks_and_the_others_to_ours():
    """Tables 1 and 2 of the paper profile (teachers, students, and Table 4, the figures and the
    gain sweep built on them) run the authors' networks; Table 3 (Overhaul's code) and every
    Fashion-MNIST profile run ours."""
    from pathlib import Path

    from refilled.experiments.profile import load_profile

    root = Path(__file__).resolve().parents[1]

    def archs(cfg, tables):
        exps = cfg["experiments"]
        out = [a for t in tables for a in (exps[t]["teacher"]["arch"], *exps[t]["students"])]
        if "table1" in tables:
            out += [cfg["table4"]["arch"], cfg["figure1"]["arch"], cfg["figure3"]["arch"], cfg["gain_vs_data"]["arch"]]
        return out

    paper = load_profile(root, "paper")
    assert {arch_code(a) for a in archs(paper, ["table1", "table2"])} == {AUTHORS}
    assert {arch_code(a) for a in archs(paper, ["table3"])} == {OURS}
    for name in ("smoke", "demo", "gpu", "claims"):
        assert {arch_code(a) for a in archs(load_profile(root, name), ["table1", "table2", "table3"])} == {OURS}, name


def test_the_reproduction_pairs_the_authors_students_with_the_papers():
    from refilled.report.reproduction import paper_counterpart

    assert [paper_counterpart("2", a, "wrn-authors-40-2") for a in AUTHORS_ARCHS[:4]] == \
        ["wrn-40-2", "wrn-16-2", "wrn-40-1", "wrn-16-1"]
    assert [paper_counterpart("1", a, "mobilenet-authors-1.0") for a in AUTHORS_ARCHS[4:]] == \
        ["mobilenet-1.0", "mobilenet-0.75", "mobilenet-0.5", "mobilenet-0.25"]
