"""`refilled bench` on the CPU (small configuration), the reference-style stage-1 loop, and
the batched 224 px augmentation (refilled.data.augment) that the bench and CUB use."""

import argparse
import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F

from refilled.data import augment
from refilled.tools.bench import COLUMNS, add_bench_parser, cmd_bench, main
from refilled.tools.bench_cases import Case, peak_for_name, small_config
from refilled.tools.bench_concurrent import concurrent_rows
from refilled.methods.stage1 import reference_tuple_loss
from refilled.losses import comparison_matching_loss

CPU = torch.device("cpu")


def test_bench_small_configuration_writes_the_table(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    assert main(["--device", "cpu", "--seconds", "0", "--steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ours/ref" in printed and "bf16 peak" in printed and f"wrote {out}" in printed
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == COLUMNS
    expected = [(c.method, c.student, str(c.px)) for c in small_config().cases]
    assert [(r["method"], r["student"], r["px"]) for r in rows] == expected
    by_key = {(r["method"], r["student"], r["px"]): r for r in rows}
    for r in rows:
        ours, ref = float(r["ours_img_s"]), float(r["ref_img_s"])
        assert ours > 0 and ref > 0
        assert float(r["ratio"]) == pytest.approx(round(ours / ref, 3), abs=1e-9)   # from the same row
        assert r["peak_share"] == "n/a" and r["jobs"] == "1"
        if r["method"] == "jacobian":   # a double backward: FlopCounterMode cannot count it, the row says so
            assert r["gflop_per_img"] == r["tflops"] == "n/a" and "FLOPs not counted" in r["notes"]
        else:
            assert float(r["gflop_per_img"]) > 0
            assert float(r["tflops"]) == pytest.approx(float(r["gflop_per_img"]) * ours / 1e3, rel=2e-2, abs=2e-3)
        if r["method"] == "student":
            assert r["vs_ce"] == "" and r["teacher_share"] == ""
        else:
            ce = by_key[("student", r["student"], r["px"])]
            assert float(r["vs_ce"]) == pytest.approx(ours / float(ce["ours_img_s"]), abs=1e-3)
            assert 0 < float(r["teacher_share"]) < 5


def test_concurrent_jobs_sum_their_images_per_second():
    cfg = small_config()
    case = Case("student", "wrn-16-1", None, 32, 8, 4)
    rows = concurrent_rows(cfg, CPU, [1, 2], case, seconds=0.2, log=lambda s: None)
    assert [r["jobs"] for r in rows] == [1, 2]
    assert all(r["notes"] == "" and r["ours_img_s"] > 0 for r in rows), rows
    assert rows[0]["vs_one_job"] == 1.0
    assert rows[1]["vs_one_job"] == pytest.approx(rows[1]["ours_img_s"] / rows[0]["ours_img_s"], abs=1e-3)


def _fake_measurements(monkeypatch, fail=None):
    """Stand-ins for the two pipelines (no training): ours 100 img/s, CE 200; `fail` maps a
    method to the exception its row raises (BaseException: the process is stopped there)."""
    import refilled.tools.bench as bench

    calls = []

    def ours(case, cfg, data, device, graph="auto", with_extras=True):
        calls.append((case.method, case.student, graph))
        if fail and case.method in fail and graph == "auto":
            raise fail[case.method]
        return {"img_s": 200.0 if case.method == "student" else 100.0, "flops": 2e9,
                "steps": {"mode": "eager", "requested": "off", "captures": 0, "capture_failures": 0, "fallbacks": 0,
                          "graph_steps": 0, "eager_steps": 5}}

    monkeypatch.setattr(bench, "run_ours", ours)
    monkeypatch.setattr(bench, "run_reference", lambda case, cfg, data, device: 50.0)
    return calls


def test_a_failed_row_is_reported_in_it_and_the_next_row_runs(tmp_path, monkeypatch):
    from refilled.training.step import NonFiniteLoss

    out = tmp_path / "bench.csv"
    _fake_measurements(monkeypatch, fail={"stage1": NonFiniteLoss("non-finite loss at epoch 1, step 3: ce=nan"),
                                          "rkd": RuntimeError("CUDA error: an illegal memory access\nmore")})
    assert main(["--device", "cpu", "--archs", "wrn-16-1", "--out", str(out)]) == 1   # rows failed: exit 1
    rows = {r["method"]: r for r in csv.DictReader(open(out)) if r["px"] == "32"}
    expected = [c.method for c in small_config().cases if c.student == "wrn-16-1"]
    assert list(rows) == expected
    assert rows["stage1"]["notes"] == "FAILED: FloatingPointError: non-finite loss (non-finite loss at epoch 1, step 3: ce=nan)"
    assert rows["rkd"]["notes"] == "FAILED: RuntimeError: CUDA error: an illegal memory access"
    for m in ("stage1", "rkd"):
        assert rows[m]["ours_img_s"] == "" and rows[m]["vs_ce"] == ""
    others = [m for m in expected if m not in ("student", "stage1", "rkd")]
    assert expected.index("rkd") < len(expected) - 1 and expected.index("stage1") < len(expected) - 1
    assert all(rows[m]["ours_img_s"] == "100.0" and rows[m]["vs_ce"] == "0.5" and rows[m]["notes"] == ""
               for m in others)


def test_rows_are_written_as_measured_and_append_measures_only_the_missing(tmp_path, monkeypatch):
    """Stopped at the third row (a time limit), the CSV holds the two finished rows; a rerun
    with --append measures only the rows not there yet, and computes vs CE against the CE
    row of the first run."""
    out = tmp_path / "bench.csv"
    methods = [c.method for c in small_config().cases if c.student == "wrn-16-1"]
    _fake_measurements(monkeypatch, fail={methods[2]: KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--archs", "wrn-16-1", "--out", str(out)])
    assert [r["method"] for r in csv.DictReader(open(out))] == methods[:2]
    calls = _fake_measurements(monkeypatch)
    assert main(["--device", "cpu", "--archs", "wrn-16-1", "--append", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["method"] for r in rows] == methods
    assert [c[0] for c in calls] == methods[2:]
    assert all(r["vs_ce"] == "0.5" for r in rows[1:])


def test_concurrency_rows_are_written_as_measured(tmp_path, monkeypatch):
    """Round by round: a limit hit during the second round keeps the first in the CSV; vs 1
    job compares with the in-process CE row where no 1-job round ran."""
    import refilled.tools.bench_concurrent as bench_concurrent

    out = tmp_path / "bench.csv"
    _fake_measurements(monkeypatch)
    rounds = []

    def fake_round(cfg, device, jobs, case, seconds, env):
        rounds.append(jobs)
        if len(rounds) == 2:
            raise KeyboardInterrupt
        return [{"images": 300 * jobs, "seconds": 1.0, "mode": "graph"}] * jobs, []

    monkeypatch.setattr(bench_concurrent, "_concurrent_round", fake_round)
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--archs", "wrn-16-1", "--methods", "student", "--concurrent", "4", "2",
              "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    assert [(r["method"], r["jobs"]) for r in rows] == [("student", "1"), ("student (concurrent)", "2")]
    conc = rows[1]
    assert float(conc["ours_img_s"]) == 2 * 600.0 and conc["vs_one_job"] == str(round(1200.0 / 200.0, 3))
    assert "vs 1 job: against the in-process row" in conc["notes"]


def test_plan_counts_the_timed_seconds_of_the_selection(capsys):
    """--plan measures nothing; its timed seconds, computed here from the configuration:
    per row ours + reference + eager (CUDA) at --seconds each, the teacher forward at half,
    plus each concurrency round."""
    from refilled.tools.bench_cases import full_config, is_target, method_has_teacher

    assert main(["--device", "cuda", "--config", "full", "--seconds", "1", "--part", "targets",
                 "--concurrent", "2", "--plan"]) == 0
    printed = capsys.readouterr().out
    cases = [c for c in full_config().cases if is_target(c)]
    assert sorted({(c.method, c.student) for c in cases}) == sorted(
        (m, s) for m in ("student", "stage1", "refilled") for s in ("wrn-40-2", "wrn-16-1"))
    timed = sum(3 * 1.0 + (0.5 if method_has_teacher(c) else 0) for c in cases) + 3.0
    assert f"plan: {len(cases)} rows and 1 concurrency rounds; timed {timed:.1f} s at least" in printed


def test_add_bench_parser_registers_the_subcommand():
    parser = argparse.ArgumentParser(prog="refilled")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", "--config", "small", "--concurrent", "1", "2", "4", "--out", "x.csv"])
    assert args.func is cmd_bench and args.concurrent == [1, 2, 4] and args.config == "small"


def test_bf16_peaks_of_known_gpus():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_for_name("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_for_name("NVIDIA H200") == pytest.approx(989.4)
    assert peak_for_name("NVIDIA H200 NVL") == pytest.approx(835.0)
    assert peak_for_name("NVIDIA GH200 480GB") == pytest.approx(989.4)
    assert peak_for_name("Some GPU") is None


@pytest.mark.parametrize("k_hat", [None, 2])
def test_reference_tuple_loop_computes_the_dense_stage1_loss(k_hat):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(6)
    s = torch.randn(24, 16, generator=g)
    t = torch.randn(24, 32, generator=g)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    dense = comparison_matching_loss(s1, t, labels, 4.0, 0.2, k_hat)
    loop = reference_tuple_loss(s2, t, labels, 4.0, 0.2, k_hat)
    assert dense.item() > 0
    assert loop.item() == pytest.approx(dense.item(), rel=1e-5)
    dense.backward()
    loop.backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-7)


# ---- refilled.data.augment -----------------------------------------------------------------


def test_random_resized_crop_boxes_follow_torchvision():
    """Same distribution as RandomResizedCrop.get_params: compare the mean area fraction, the
    mean log aspect and the mean centre position over 4000 draws on a 375 x 500 image
    (tolerance 4 standard errors of the difference: a false alarm about 1e-4 per statistic)."""
    from torchvision.transforms import RandomResizedCrop

    n, H, W = 4000, 375, 500
    ours = augment.random_resized_crop_boxes(torch.full((n,), H), torch.full((n,), W), torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    img = torch.zeros(3, H, W)
    theirs = torch.tensor([RandomResizedCrop.get_params(img, augment.SCALE, augment.RATIO) for _ in range(n)],
                          dtype=torch.float64)
    assert (ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all()
    assert (ours[:, 0] + ours[:, 2] <= H).all() and (ours[:, 1] + ours[:, 3] <= W).all()
    assert (ours == ours.round()).all()

    def stats(b):
        return {"area": b[:, 2] * b[:, 3] / (H * W), "log_aspect": torch.log(b[:, 3] / b[:, 2]),
                "cy": (b[:, 0] + b[:, 2] / 2) / H, "cx": (b[:, 1] + b[:, 3] / 2) / W}

    a, b = stats(ours), stats(theirs)
    for k in a:
        se = math.sqrt(a[k].var().item() / n + b[k].var().item() / n)
        assert abs(a[k].mean().item() - b[k].mean().item()) < 4 * se, k


def test_random_resized_crop_falls_back_to_the_centre_crop():
    # a 10 x 1000 strip: no attempt fits, torchvision's fallback is (0, 493, 10, 13)
    boxes = augment.random_resized_crop_boxes(torch.tensor([10]), torch.tensor([1000]), torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0.0, 493.0, 10.0, 13.0]]


def test_crop_resize_cuts_the_box_exactly_and_mirrors():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (2, 3, 20, 30), dtype=torch.uint8, generator=g)
    h, w = torch.tensor([20, 20]), torch.tensor([30, 30])
    whole = augment.crop_resize(img, torch.tensor([[0, 0, 20, 30], [0, 0, 20, 30]]), h, w, 20)
    # output is out x out: resizing 20 x 30 to 20 x 20 keeps rows; check a same-size crop instead
    box = torch.tensor([[3.0, 5.0, 12.0, 12.0], [0.0, 10.0, 12.0, 12.0]])
    out = augment.crop_resize(img, box, h, w, 12, flip=torch.tensor([False, True]))
    assert torch.allclose(out[0], img[0, :, 3:15, 5:17].float(), atol=1e-3)
    assert torch.allclose(out[1], img[1, :, 0:12, 10:22].float().flip(-1), atol=1e-3)
    assert whole.shape == (2, 3, 20, 20)


def test_crop_runs_no_matrix_product():
    """The 224 px crop, op by op: no mm/bmm/matmul (on CUDA those may run in TF32, forced by
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 in some images, and shift the grid by hundredths of a
    pixel); the 32 px crop-and-flip neither."""
    from torch.profiler import ProfilerActivity, profile

    from refilled.data.batches import random_crop_flip

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (4, 3, 40, 50), dtype=torch.uint8, generator=g)
    # the profiler, not a dispatch mode: it also sees the ops inside composite kernels
    # (F.affine_grid is one aten op at dispatch level, with an aten::bmm inside)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        augment.random_resized_crop_flip(img, torch.full((4,), 375), torch.full((4,), 500), 24,
                                         torch.Generator().manual_seed(1))
        random_crop_flip(img.float(), 4, torch.Generator().manual_seed(2))
    ops = {e.name for e in prof.events()}
    assert "aten::grid_sampler_2d" in ops, ops
    products = sorted(op for op in ops if any(k in op for k in ("mm", "matmul", "linear", "einsum", "affine_grid")))
    assert not products, products


def test_crop_grid_is_the_affine_grid_of_the_boxes():
    """Against an independent computation: output pixel j of a box (top, left, h, w) in an
    S x S cache samples x = (left + (j + 0.5) w / out) in pixels, i.e. 2x / S - 1 in
    align_corners=False units (mirrored: j -> out - 1 - j); and against F.affine_grid."""
    g = torch.Generator().manual_seed(0)
    b, s_h, s_w, out = 5, 48, 64, 7
    top, left = torch.rand(b, generator=g) * 20, torch.rand(b, generator=g) * 30
    bh, bw = 5 + torch.rand(b, generator=g) * 20, 5 + torch.rand(b, generator=g) * 30
    flip = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    grid = augment.crop_grid(top, left, bh, bw, flip, s_h, s_w, out)
    assert grid.shape == (b, out, out, 2)
    j = torch.arange(out, dtype=torch.float64)
    for k in range(b):
        cols = j.flip(0) if flip[k] else j
        x = (left[k].double() + (cols + 0.5) * bw[k].double() / out) * 2 / s_w - 1
        y = (top[k].double() + (j + 0.5) * bh[k].double() / out) * 2 / s_h - 1
        assert torch.allclose(grid[k, :, :, 0].double(), x[None, :].expand(out, out), atol=1e-6)
        assert torch.allclose(grid[k, :, :, 1].double(), y[:, None].expand(out, out), atol=1e-6)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = bw / s_w * (1 - 2 * flip)
    theta[:, 0, 2] = (2 * left + bw) / s_w - 1
    theta[:, 1, 1] = bh / s_h
    theta[:, 1, 2] = (2 * top + bh) / s_h - 1
    assert torch.allclose(grid, F.affine_grid(theta, [b, 3, out, out], align_corners=False), atol=1e-6)


def test_crop_resize_matches_torchvision_bilinear_resized_crop():
    """With the cache at the original size, a box is cut and resized as torchvision's
    tensor resized_crop (bilinear, no antialias) does, except on the outermost pixels: there
    torchvision clamps to the cut-out box, we interpolate with the pixels just outside it."""
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (1, 3, 40, 50), dtype=torch.uint8, generator=g)
    box = (7, 4, 17, 23)
    ref = TF.resized_crop(img.float(), *box, size=[32, 32], antialias=False)
    out = augment.crop_resize(img, torch.tensor([box], dtype=torch.float64), torch.tensor([40]), torch.tensor([50]), 32)
    assert (out - ref)[..., 1:-1, 1:-1].abs().max() < 1e-2


def test_anisotropic_cache_shows_the_same_region():
    """An image cached at another size: the crop of a box of the original equals the crop
    of the same box taken from the original (up to resampling)."""
    H, W = 48, 64
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    orig = torch.stack([yy * 4, xx * 3, yy + xx])[None]                    # smooth ramps
    cache = F.interpolate(orig, size=(32, 32), mode="bilinear", align_corners=False)
    box = torch.tensor([[8.0, 16.0, 32.0, 40.0]])
    from_cache = augment.crop_resize(cache, box, torch.tensor([H]), torch.tensor([W]), 16)
    from_orig = augment.crop_resize(orig, box, torch.tensor([H]), torch.tensor([W]), 16)
    assert (from_cache - from_orig)[..., 2:-2, 2:-2].abs().max() < 1.0   # on a 0..250 ramp


def test_cached_image_batches_follow_the_batches_conventions(tmp_path):
    from PIL import Image

    paths = []
    for i in range(10):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40 + i, 30), (20 * i, 100, 200)).save(p)
        paths.append(p)
    images, heights, widths = augment.load_or_decode(paths, size=24, cache_dir=tmp_path / "cache")
    assert images.shape == (10, 3, 24, 24) and images.dtype == torch.uint8
    assert heights.tolist() == [30] * 10 and widths.tolist() == [40 + i for i in range(10)]
    again = augment.load_or_decode(paths, size=24, cache_dir=tmp_path / "cache")
    assert torch.equal(again[0], images) and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    labels = torch.arange(10) % 3
    mk = lambda train: augment.CachedImageBatches(images, heights, widths, labels, (0.5,) * 3, (0.25,) * 3, 4, train,
                                                  CPU, seed=1, out=16, resize=18)
    train, test = mk(True), mk(False)
    assert len(train) == 2 and len(test) == 3
    first = [x for x, _ in train]
    train.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in train]))   # (seed, epoch) decides
    train.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in train]))
    xs, ys = zip(*test)
    assert [len(y) for y in ys] == [4, 4, 2] and torch.equal(torch.cat(ys), labels)
    x = torch.cat(xs)
    assert x.shape == (10, 3, 16, 16)
    # flat colour images: every pixel is the normalised colour
    expected = (torch.tensor([[20.0 * i, 100, 200] for i in range(10)]) - 0.5 * 255) / (0.25 * 255)
    assert torch.allclose(x.mean((2, 3)), expected, atol=0.05)


def _cub(tmp_path, size=(30, 20), **counts):
    """A fake CUB tree of smooth images (ramps, so that resampling paths can be compared)."""
    import sys
    from pathlib import Path

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from fakedata import make_cub

    from refilled.data import load_dataset

    made = make_cub(tmp_path, size=size, **counts)
    w, h = size
    for k, (_, rel, c, _) in enumerate(made["rows"]):
        ramp = torch.stack([torch.linspace(0, 255, w).expand(h, w), torch.linspace(255, 0, h)[:, None].expand(h, w),
                            torch.full((h, w), 40.0 * c + k)])
        Image.fromarray(ramp.permute(1, 2, 0).round().to(torch.uint8).numpy()).save(made["dir"] / "images" / rel)
    return load_dataset("cub200", tmp_path, verify_checksums=False)


def test_cached_file_batches_for_a_cub_task(tmp_path):
    """The CUB path the loop uses on CUDA: a task split of a CUB tree, decoded once."""
    from refilled.data.batches import task_split

    ds = _cub(tmp_path, n_classes=3, n_train_per_class=4, n_test_per_class=1)
    split = task_split(ds.train, [2, 0])
    b = augment.cached_file_batches(split, ds, 3, True, CPU, seed=0, size=24, out=16, cache_dir=tmp_path / "c")
    assert len(b) == 2
    xs, ys = zip(*b)
    assert all(x.shape == (3, 3, 16, 16) for x in xs)
    labels = torch.cat(ys)
    assert len(labels) == 6 and set(labels.tolist()) <= {0, 1}   # 8 images, batch 3: the last partial batch dropped
    # one cache for the whole training split (12 images), not one per task
    (cache,) = (tmp_path / "c").glob("images_24px_*.pt")
    assert len(torch.load(cache, weights_only=True)["images"]) == 12
    test = augment.cached_file_batches(task_split(ds.test, [2, 0]), ds, 8, False, CPU, size=24, out=16)
    (x, y), = list(test)
    assert x.shape == (2, 3, 16, 16) and y.tolist() == task_split(ds.test, [2, 0]).labels.tolist()


def test_batches_take_the_device_path_for_files(tmp_path):
    """`Batches` over CUB files with gpu_augment (the CUDA default): the cached, batched path;
    its evaluation crop matches torchvision's Resize(256) + CenterCrop(224) of the file
    within resampling error, and epochs are reproducible."""
    from refilled.data.batches import Batches, task_split

    ds = _cub(tmp_path, size=(300, 240), n_classes=2, n_train_per_class=3, n_test_per_class=2)
    train = task_split(ds.train, [1, 0])
    test = task_split(ds.test, [1, 0])
    cache = tmp_path / "cache"
    mk = lambda s, bs, tr, gpu: Batches(s, ds, bs, tr, CPU, seed=3, gpu_augment=gpu, cache_dir=cache)
    plain, fast = mk(test, 4, False, False), mk(test, 4, False, True)
    assert plain.cached is None and fast.cached is not None
    (xp, yp), = list(plain)
    (xf, yf), = list(fast)
    assert torch.equal(yp, yf) and xf.shape == xp.shape == (4, 3, 224, 224)
    # normalised units (1 = one std, about 60 grey levels); JPEG and resampling differ a little
    assert (xf - xp).abs().mean() < 0.01 and (xf - xp)[..., 2:-2, 2:-2].abs().max() < 0.1   # a 5 px shift: 0.05 mean
    b = mk(train, 2, True, True)
    assert len(b) == len(mk(train, 2, True, False)) == 3
    b.set_epoch(1)
    first = [x for x, _ in b]
    assert all(x.shape == (2, 3, 224, 224) for x in first)
    b.set_epoch(2)
    assert not all(torch.equal(a, c) for a, c in zip(first, [x for x, _ in b]))
    b.set_epoch(1)
    assert all(torch.equal(a, c) for a, c in zip(first, [x for x, _ in b]))
    assert sorted(p.name.split("_")[1] for p in cache.glob("*.pt")) == ["256px", "256px"]   # train, test


def test_image_cache_is_reused_and_follows_the_files(tmp_path, monkeypatch):
    from PIL import Image

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 10 + i), (60 * i, 0, 0)).save(paths[-1])
    calls = []
    real = augment.decode_fixed
    monkeypatch.setattr(augment, "decode_fixed", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = augment.load_or_decode(paths, 8, tmp_path / "c")
    again = augment.load_or_decode(paths, 8, tmp_path / "c")
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))
    Image.new("RGB", (20, 10), (255, 255, 255)).save(paths[0])    # a file changed: decoded again
    os.utime(paths[0], ns=(1, 1))
    changed = augment.load_or_decode(paths, 8, tmp_path / "c")
    assert len(calls) == 2 and changed[0][0].float().mean() == 255 and changed[1][0] == 10
    monkeypatch.setenv("REFILLED_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert augment.default_cache_dir() == tmp_path / "elsewhere"


def test_concurrent_jobs_decode_an_image_folder_once(tmp_path, monkeypatch):
    """Two jobs asking for the same cache at once: one decodes, the other waits and reads it."""
    import threading
    import time

    from PIL import Image

    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for p in paths:
        Image.new("RGB", (9, 9)).save(p)
    calls = []
    real = augment.decode_fixed

    def slow(*a, **k):
        calls.append(1)
        time.sleep(0.5)
        return real(*a, **k)

    monkeypatch.setattr(augment, "decode_fixed", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(augment.load_or_decode(paths, 8, tmp_path / "c")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and torch.equal(results[0][0], results[1][0])


def test_undecodable_image_is_named_and_no_cache_is_written(tmp_path):
    from refilled.data import DataError
    from refilled.data.batches import Batches, task_split

    ds = _cub(tmp_path, n_classes=2, n_train_per_class=2, n_test_per_class=1)
    bad = ds.train.paths[1]
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=str(bad)):
        Batches(task_split(ds.train, [0, 1]), ds, 2, True, CPU, gpu_augment=True, cache_dir=tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.pt")) and not list((tmp_path / "c").glob("*.tmp*"))
