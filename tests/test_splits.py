import pytest
import torch

from refilled.data.splits import (SplitError, check_split, class_permutation, make_split, subsample_per_class,
                                  valid_ratios)


@pytest.mark.parametrize("dataset,h,ratios", [
    ("cifar100", 50, [0, .2, .4, .6, .8, 1]),
    ("cub200", 100, [0, .25, .5, .75, 1]),
    ("fashion-mnist", 5, [0, .2, .4, .6, .8, 1]),
    ("fashion-mnist", 4, [0, .25, .5, .75, 1]),
])
def test_split_sizes_and_overlap(dataset, h, ratios):
    n = {"cifar100": 100, "cub200": 200, "fashion-mnist": 10}[dataset]
    for seed in range(5):
        teachers = set()
        for r in ratios:
            s = make_split(dataset, r, seed, h)
            t, c = s["teacher_classes"], s["student_classes"]
            assert len(t) == len(set(t)) == h and len(c) == len(set(c)) == h
            assert len(set(t) & set(c)) == round(r * h)
            assert set(t) | set(c) <= set(range(n))
            teachers.add(tuple(t))
        assert len(teachers) == 1  # one teacher serves every ratio of a seed


def test_split_follows_the_permutation_rule():
    # pi[h(1-r) : h(2-r)], written out by hand for h = 5, r = .6: shared = 3.
    pi = class_permutation(10, 7)
    s = make_split("fashion-mnist", 0.6, 7, 5)
    assert s["teacher_classes"] == pi[0:5]
    assert s["student_classes"] == pi[2:7]
    assert s["student_classes"][:3] == s["teacher_classes"][2:]  # shared classes first, in teacher order


def test_default_h_is_half_and_seeds_differ():
    assert make_split("cifar100", 0.2, 0)["classes_per_task"] == 50
    assert make_split("cifar100", 0.2, 0)["teacher_classes"] != make_split("cifar100", 0.2, 1)["teacher_classes"]


@pytest.mark.parametrize("ratio,h", [(0.3, 5), (0.2, 4), (1.5, 5), (-0.2, 5)])
def test_bad_ratio_lists_valid_ones(ratio, h):
    with pytest.raises(SplitError) as err:
        make_split("fashion-mnist", ratio, 0, h)
    msg = str(err.value)
    assert f"{ratio:g}" in msg
    for r in valid_ratios(h):
        assert f"{r:g}" in msg


def test_bad_h_and_dataset():
    with pytest.raises(SplitError, match="classes_per_task 6"):
        make_split("fashion-mnist", 0, 0, 6)
    with pytest.raises(SplitError, match="'mnist'"):
        make_split("mnist", 0, 0)


def test_check_split_rejects_edited_classes():
    s = make_split("fashion-mnist", 0.4, 3, 5)
    assert check_split(dict(s)) == s
    s["student_classes"] = s["student_classes"][::-1]
    with pytest.raises(SplitError, match="student_classes"):
        check_split(s, "x.json")
    with pytest.raises(SplitError, match="missing key"):
        check_split({"dataset": "cifar100"}, "x.json")


def test_subsample_is_seeded_and_per_class():
    labels = torch.arange(10).repeat_interleave(20)
    a = subsample_per_class(labels, [3, 1], 5, seed=0)
    b = subsample_per_class(labels, [3, 1], 5, seed=0)
    c = subsample_per_class(labels, [3, 1], 5, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert labels[a].tolist() == [3] * 5 + [1] * 5
    assert len(subsample_per_class(labels, [2], None, 0)) == 20


def test_every_class_at_ratio_one_is_standard_kd_and_nothing_else_fits():
    s = make_split("fashion-mnist", 1, 3, 10)
    assert s["teacher_classes"] == s["student_classes"] and sorted(s["teacher_classes"]) == list(range(10))
    with pytest.raises(SplitError, match="need 11 classes"):
        make_split("fashion-mnist", 0.9, 3, 10)
    with pytest.raises(SplitError, match="between 1 and 10"):
        make_split("fashion-mnist", 1, 3, 11)


def test_the_profile_check_and_the_split_command_refuse_the_same_tasks():
    """The split rule's limit decides both: for every h and whole ratio on Fashion-MNIST (10
    classes), the profile check reports experiments.table1.ratios[0] exactly where make_split
    refuses, and both refuse exactly where the two tasks' union needs more than 10 classes."""
    import copy
    from pathlib import Path

    from refilled.experiments.profile import ConfigError, check_semantics, load_profile

    base = load_profile(Path(__file__).resolve().parents[1], "smoke")
    for h in range(1, 11):
        for k in range(h + 1):
            ratio = k / h
            union = set(range(h)) | set(range(h - k, 2 * h - k))   # teacher pi[0:h], student pi[h-k:2h-k]
            try:
                make_split("fashion-mnist", ratio, 0, h)
                split_refuses = False
            except SplitError:
                split_refuses = True
            cfg = copy.deepcopy(base)
            cfg["experiments"]["table1"].update(dataset="fashion-mnist", classes_per_task=h, ratios=[ratio])
            try:
                check_semantics(cfg, "planted.yaml")
                message = ""
            except ConfigError as exc:
                message = str(exc)
            profile_refuses = "experiments.table1.ratios[0]" in message and "needs" in message
            assert split_refuses == profile_refuses == (len(union) > 10), (h, k, message)
