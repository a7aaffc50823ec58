"""ConfusionMatrix against a hand-checked case, torchmetrics, and cityscapesScripts."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from seg.evaluation.metrics import ConfusionMatrix, IGNORE_INDEX
from tests.conftest import shared_path


def _nan_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b))


def _random_case(n_classes: int, shape=(3, 24, 40), absent=(), p_correct=0.6, seed=0):
    """GT with ~10% ignore pixels; predictions right with probability p_correct, else random."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([c for c in range(n_classes) if c not in absent])
    target = allowed[torch.randint(len(allowed), shape, generator=g)]
    pred = torch.where(torch.rand(shape, generator=g) < p_correct, target,
                       allowed[torch.randint(len(allowed), shape, generator=g)])
    target[torch.rand(shape, generator=g) < 0.1] = IGNORE_INDEX
    return pred, target


def test_toy_case_every_value():
    case = json.loads(shared_path("reference", "metric_toy_case.json").read_text())
    cm = ConfusionMatrix(case["num_classes"], ignore_index=case["ignore_index"])
    cm.update(torch.tensor(case["pred"]), torch.tensor(case["gt"]))
    res = cm.compute()

    def expect(values):
        return [math.nan if v is None else v for v in values]

    assert res["confusion"] == case["confusion_matrix_gt_rows"]
    assert _nan_equal(res["iou"], expect(case["per_class_iou"]))
    assert _nan_equal(res["acc"], expect(case["per_class_acc"]))
    assert res["pixel_acc"] == pytest.approx(case["pixel_accuracy"], abs=1e-6)
    assert res["mean_acc"] == pytest.approx(case["mean_acc_nanmean"], abs=1e-6)
    assert res["fwiou"] == pytest.approx(case["fwiou_VainF (freq>0 only)"], abs=1e-6)
    nanmean_key = next(k for k in case if k.startswith("miou_nanmean"))
    assert res["miou"] == pytest.approx(case[nanmean_key], abs=1e-6)
    # The other conventions in the file are derivable from our per-class IoU; we document nanmean.
    iou = np.array(res["iou"])
    plain_key = next(k for k in case if k.startswith("miou_plain_mean"))
    assert case[plain_key] is None and math.isnan(iou.mean())
    zero_key = next(k for k in case if k.startswith("miou_nan_to_zero"))
    assert np.nan_to_num(iou, nan=0.0).mean() == pytest.approx(case[zero_key], abs=1e-6)
    present = np.array(res["confusion"]).sum(1) > 0
    assert iou[present].mean() == pytest.approx(case["miou_mean_over_classes_present_in_gt"], abs=1e-6)


def test_uint8_inputs_do_not_overflow():
    pred, target = _random_case(21)
    ref = ConfusionMatrix(21)
    ref.update(pred, target)
    cm = ConfusionMatrix(21)
    cm.update(pred.to(torch.uint8), target.to(torch.uint8))  # 20 * 21 + 20 wraps in uint8
    assert cm.compute()["confusion"] == ref.compute()["confusion"]
    assert torch.equal(cm.mat, ref.mat)


def test_updates_accumulate_and_reset():
    pred, target = _random_case(5)
    whole = ConfusionMatrix(5)
    whole.update(pred, target)
    parts = ConfusionMatrix(5)
    for p, t in zip(pred, target):
        parts.update(p, t)
    assert torch.equal(parts.mat, whole.mat)
    assert parts.mat.sum() == (target != IGNORE_INDEX).sum()
    parts.reset()
    assert parts.mat.sum() == 0
    empty = parts.compute()
    assert math.isnan(empty["miou"]) and math.isnan(empty["pixel_acc"]) and math.isnan(empty["fwiou"])


def test_predictions_at_ignored_pixels_are_not_checked_or_counted():
    target = torch.tensor([[0, 1, IGNORE_INDEX]])
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[0, 1, 200]]), target)
    assert cm.compute()["confusion"] == [[1, 0], [0, 1]]


@pytest.mark.parametrize("pred_value,target_value", [(3, 0), (-1, 0), (0, 7)])
def test_out_of_range_values_raise(pred_value, target_value):
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor([0, pred_value]), torch.tensor([0, target_value]))


def test_bad_inputs_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cm.update(torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index=1)


def test_per_class_iou_matches_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    n = 6
    pred, target = _random_case(n, absent=(4,), seed=1)
    pred[0, 0, :5] = 5  # class 5 is predicted somewhere even if rare in the GT
    cm = ConfusionMatrix(n)
    cm.update(pred, target)
    ours = cm.compute()["iou"]
    metric = MulticlassJaccardIndex(num_classes=n, ignore_index=IGNORE_INDEX, average=None)
    theirs = metric(pred, target).tolist()
    assert math.isnan(ours[4])  # absent in GT and never predicted: 0/0
    for c in range(n):
        if not math.isnan(ours[c]):
            assert ours[c] == pytest.approx(theirs[c], abs=1e-6), c


def _write_cityscapes_pair(root, city, frame, gt_label_ids, pred_label_ids):
    gt_dir = root / "gtFine" / "val" / city
    gt_dir.mkdir(parents=True, exist_ok=True)
    res_dir = root / "results"
    res_dir.mkdir(exist_ok=True)
    stem = f"{city}_000000_{frame:06d}"
    gt_path, pred_path = gt_dir / f"{stem}_gtFine_labelIds.png", res_dir / f"{stem}_pred.png"
    Image.fromarray(gt_label_ids.astype(np.uint8)).save(gt_path)
    Image.fromarray(pred_label_ids.astype(np.uint8)).save(pred_path)
    return str(pred_path), str(gt_path)


def test_per_class_iou_matches_cityscapes_scripts(tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
    from cityscapesscripts.helpers.labels import labels as cs_labels
    from cityscapesscripts.helpers.labels import trainId2label

    n = 19
    train_to_id = np.full(256, 0, dtype=np.int64)  # trainId 255 -> 'unlabeled' by default
    for train_id in range(n):
        train_to_id[train_id] = trainId2label[train_id].id
    ignored_ids = np.array([lb.id for lb in cs_labels if lb.ignoreInEval and lb.id >= 0])
    # Class 17 never appears in GT but is predicted (IoU 0); class 18 appears in neither (NaN).
    pred, target = _random_case(n, shape=(3, 32, 48), absent=(17, 18), seed=2)
    pred[pred == 16] = 17
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(n)
    cm.update(pred, target)
    ours = cm.compute()

    pred_files, gt_files = [], []
    for i, (p, t) in enumerate(zip(pred.numpy(), target.numpy())):
        gt_ids = train_to_id[t]
        # ignored pixels get assorted ignored labelIds, as real Cityscapes GT does
        gt_ids[t == IGNORE_INDEX] = rng.choice(ignored_ids, size=int((t == IGNORE_INDEX).sum()))
        files = _write_cityscapes_pair(tmp_path, "testcity", i, gt_ids, train_to_id[p])
        pred_files.append(files[0])
        gt_files.append(files[1])

    args = copy.copy(cs_eval.args)  # the module keeps a global; leave it untouched
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    result = cs_eval.evaluateImgLists(pred_files, gt_files, args)
    theirs = [result["classScores"][trainId2label[c].name] for c in range(n)]
    assert math.isnan(theirs[18]) and theirs[17] == 0.0
    assert _nan_equal(ours["iou"], theirs)
    assert ours["miou"] == pytest.approx(result["averageScoreClasses"], abs=1e-12)
