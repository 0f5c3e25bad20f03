"""Train the tiny YOLO-style detector of tests/detection_models.py once and export it.

    .venv-ci/bin/python models/train_detector.py        # writes models/tiny_yolo.onnx

Seeded (numpy and torch), CPU only, about fifteen minutes on one core: synthetic 64x64
scenes (`training_scenes`: squares and circles, unlabelled bars, on backgrounds of varying
level, tint, texture and noise), a class BCE on every anchor (the object's centre cell
positive), an L1 box loss on the positive anchors, weight decay (AdamW) and a small penalty
on the mean activation of the backbone's ReLUs, so that its features stay silent on the
background and the detector's evidence for a shape is the shape's own pixels (the
explanations that tests/test_detection.py checks: input x gradient and LRP put most of
their relevance inside the box). The ONNX output `output0` has the YOLOv8 layout
(batch, 4 + 2, 64): centre x, centre y, width, height in pixels, then the sigmoid scores of
"square" and "circle". It prints the file's sha256 (recorded in models/README.md).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from detection_models import TinyYolo, scenes, targets, training_scenes  # noqa: E402

ACTIVITY = 0.01  # weight of the mean ReLU activation in the loss


def train(steps: int = 4500, batch: int = 32, seed: int = 0, activity: float = ACTIVITY) -> TinyYolo:
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    images, boxes = training_scenes(8000, rng)
    cls, box, pos = targets(boxes)
    images, cls, box, pos = map(torch.from_numpy, (images, cls, box, pos))
    model = TinyYolo()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(8.0))
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(images), batch))
        raw, act = model.raw_and_activity(images[idx])
        p = pos[idx]
        loss_cls = bce(raw[:, 4:], cls[idx])
        diff = (model.boxes(raw) - box[idx]).abs().sum(1) / 8.0
        loss_box = (diff * p).sum() / p.sum().clamp(min=1)
        loss = loss_cls + 0.5 * loss_box + activity * act
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step}: class {loss_cls.item():.4f} box {loss_box.item():.4f} activity {act.item():.3f}",
                  flush=True)
    return model.eval()


def main(out: Path = HERE / "tiny_yolo.onnx", activity: float = ACTIVITY, steps: int = 4500) -> None:
    model = train(steps=steps, activity=activity)
    x = torch.from_numpy(scenes(2, np.random.default_rng(1))[0])
    torch.onnx.export(model, (x,), str(out), input_names=["images"], output_names=["output0"],
                      dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    print(out.name, out.stat().st_size, "bytes, sha256", hashlib.sha256(out.read_bytes()).hexdigest())


if __name__ == "__main__":
    main()
