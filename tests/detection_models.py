"""Small dense-output models for the detection, region and time-step targets, written in
PyTorch so their explanations can be checked against autograd:

- `TinyYolo`: an anchor-free YOLO-style detector (one 8x8 grid of stride 8 on 64x64 RGB
  scenes) whose ONNX output is the YOLOv8 layout (batch, 4 + classes, anchors): box centre,
  width and height in input pixels, then the sigmoid class scores. `models/train_detector.py`
  trains it once on `training_scenes` (squares and circles, unlabelled bars, on backgrounds
  of varying level, tint, texture and noise).
- `TinyUNet`: a two-level U-Net giving (batch, classes, H, W) logits.
- `TinyCTC`: a 1-D conv + GRU recogniser giving per-frame class logits (batch, time,
  classes), or sequence-first (time, batch, classes) as CTC exports often are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

CLASSES = ("square", "circle")
SIZE = 64
STRIDE = 8


class TinyYolo(nn.Module):
    """The strided convolutions are 4x4 with padding 1, so the receptive field of an anchor
    (38 px) is centred on its cell: 3x3 ones with padding 1 centre it 3.5 px up and left of
    the cell's centre, and the object's far side would fall at its rim."""

    def __init__(self, classes: int = len(CLASSES)):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
        )
        self.head = nn.Conv2d(32, 4 + classes, 1)
        g = SIZE // STRIDE
        gy, gx = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32),
                                indexing="ij")
        self.register_buffer("grid", torch.stack([gx, gy]).reshape(1, 2, g * g))

    def raw(self, x):
        """(N, 4 + C, anchors) before decoding: box offsets and class logits."""
        return self.raw_and_activity(x)[0]

    def raw_and_activity(self, x):
        """raw(x) and the sum over the backbone's ReLUs of their mean activation (what the
        trainer's sparsity penalty weighs)."""
        activity = 0
        for layer in self.backbone:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                activity = activity + x.mean()
        return self.head(x).flatten(2), activity

    def boxes(self, y):
        """Centre x, centre y, width, height in pixels from raw(x)."""
        xy = (self.grid + torch.sigmoid(y[:, :2])) * STRIDE
        wh = torch.sigmoid(y[:, 2:4]) * 32.0
        return torch.cat([xy, wh], dim=1)

    def forward(self, x):
        y = self.raw(x)
        return torch.cat([self.boxes(y), torch.sigmoid(y[:, 4:])], dim=1)


def scenes(n: int, rng, objects=(1, 3), kinds=None, noise=0.15):
    """n scenes (n, 3, 64, 64) float32 in [0, 1]: squares and circles of random colours on
    noise, not overlapping. Returns (images, boxes) with boxes[i] a list of
    (x1, y1, x2, y2, class) in pixels (x2, y2 exclusive). `kinds`: per scene the classes to
    draw (overrides `objects`); `noise`: the noise's standard deviation, or a (low, high) range
    to draw one per scene from."""
    sigma = rng.uniform(*noise, (n, 1, 1, 1)) if isinstance(noise, tuple) else noise
    images = np.clip(0.5 + sigma * rng.standard_normal((n, 3, SIZE, SIZE)), 0, 1).astype(np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    boxes = []
    for i in range(n):
        chosen = kinds[i] if kinds is not None else rng.integers(0, len(CLASSES), rng.integers(objects[0],
                                                                                              objects[1] + 1))
        placed = []
        for cls in chosen:
            for _ in range(100):
                s = int(rng.integers(14, 23))
                x1, y1 = int(rng.integers(0, SIZE - s)), int(rng.integers(0, SIZE - s))
                if all(x1 >= b[2] + 2 or b[0] >= x1 + s + 2 or y1 >= b[3] + 2 or b[1] >= y1 + s + 2 for b in placed):
                    break
            else:
                continue
            colour = rng.uniform(0.0, 1.0, 3)
            if np.abs(colour - 0.5).max() < 0.3:  # keep it visible against the noise
                colour[rng.integers(0, 3)] = rng.choice([0.0, 1.0])
            if cls == 0:
                inside = (xx >= x1) & (xx < x1 + s) & (yy >= y1) & (yy < y1 + s)
            else:
                c = x1 + (s - 1) / 2, y1 + (s - 1) / 2
                inside = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= (s / 2) ** 2
            images[i][:, inside] = colour[:, None]
            placed.append((x1, y1, x1 + s, y1 + s, int(cls)))
        boxes.append(placed)
    return images, boxes


def _smooth_fields(rng, n, cells):
    """n smooth random fields (n, 3, 64, 64): unit normal values on a cells x cells grid,
    interpolated bilinearly."""
    coarse = torch.from_numpy(rng.standard_normal((n, 3, cells, cells)).astype(np.float32))
    return nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()


def training_scenes(n: int, rng):
    """The detector's training scenes: `scenes` with 1 to 4 objects and a noise level drawn
    per scene in [0, 0.3], whose background (not the objects) is moved by a level in
    [-0.2, 0.2], a tint in [-0.05, 0.05] per channel and a smooth texture of amplitude up to
    0.1, and half of which hold an unlabelled bar (4-7 x 16-29 px, not a square). The
    background varies far more than any object, so a detector that finds the shapes must
    read them and not the pixels around them; the bars make "square" take all four sides."""
    images, boxes = scenes(n, rng, objects=(1, 4), noise=(0.0, 0.3))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    shift = rng.uniform(-0.2, 0.2, (n, 1, 1, 1)) + rng.uniform(-0.05, 0.05, (n, 3, 1, 1))
    texture = _smooth_fields(rng, n, 8) * rng.uniform(0, 0.1, (n, 1, 1, 1))
    out = images.copy()
    for i in range(n):
        shape = np.zeros((SIZE, SIZE), bool)
        for x1, y1, x2, y2, c in boxes[i]:
            if c == 0:
                shape[y1:y2, x1:x2] = True
            else:
                s = x2 - x1
                cx, cy = x1 + (s - 1) / 2, y1 + (s - 1) / 2
                shape |= (xx - cx) ** 2 + (yy - cy) ** 2 <= (s / 2) ** 2
        bg = ~shape
        out[i][:, bg] = np.clip(images[i][:, bg] + shift[i][:, :, 0] + texture[i][:, bg], 0, 1)
        if rng.random() < 0.5:
            for _ in range(20):  # a bar where it overlaps no object
                long, short = int(rng.integers(16, 30)), int(rng.integers(4, 8))
                w, h = (long, short) if rng.random() < 0.5 else (short, long)
                x1, y1 = int(rng.integers(0, SIZE - w)), int(rng.integers(0, SIZE - h))
                if all(x1 >= b[2] + 2 or b[0] >= x1 + w + 2 or y1 >= b[3] + 2 or b[1] >= y1 + h + 2 for b in boxes[i]):
                    out[i][:, y1:y1 + h, x1:x1 + w] = rng.uniform(0, 1, 3)[:, None, None]
                    break
    return out.astype(np.float32), boxes


def targets(boxes, classes: int = len(CLASSES)):
    """Per-anchor training targets: class (N, C, A) in {0, 1}, box (N, 4, A) centre/size in
    pixels, positive mask (N, A): the cell holding an object's centre predicts it."""
    g = SIZE // STRIDE
    n = len(boxes)
    cls = np.zeros((n, classes, g * g), np.float32)
    box = np.zeros((n, 4, g * g), np.float32)
    pos = np.zeros((n, g * g), bool)
    for i, objs in enumerate(boxes):
        for x1, y1, x2, y2, c in objs:
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            a = int(cy // STRIDE) * g + int(cx // STRIDE)
            cls[i, c, a] = 1
            box[i, :, a] = (cx, cy, x2 - x1, y2 - y1)
            pos[i, a] = True
    return cls, box, pos


class TinyUNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.mid = nn.Sequential(nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, 2)
        self.out = nn.Conv2d(16, classes, 1)

    def forward(self, x):
        d = self.down(x)
        m = self.mid(self.pool(d))
        return self.out(torch.cat([d, self.up(m)], dim=1))


class TinyCTC(nn.Module):
    """(N, features, T) -> per-frame logits (N, T, C), or (T, N, C) with sequence_first."""

    def __init__(self, features: int = 8, classes: int = 5, sequence_first: bool = False):
        super().__init__()
        self.conv = nn.Conv1d(features, 12, 3, 1, 1)
        self.rnn = nn.GRU(12, 10, batch_first=True)
        self.fc = nn.Linear(10, classes)
        self.sequence_first = sequence_first

    def forward(self, x):
        h = torch.relu(self.conv(x)).transpose(1, 2)
        y = self.fc(self.rnn(h)[0])
        return y.transpose(0, 1) if self.sequence_first else y


class Relayout(nn.Module):
    """The tiny detector's answer in another detector's raw layout, for decoding and seeding
    tests end to end: `yolov5` (batch, anchors, 5 + C) with an objectness (the mean class
    score), `ssd` boxes (batch, anchors, 4) normalised corners + scores (batch, anchors, C),
    `detr` logits (batch, anchors, C + 1) + normalised centre boxes (batch, anchors, 4),
    `rtdetr` logits (batch, anchors, C) whose sigmoids are the scores (no "no object" class)
    + the same boxes."""

    def __init__(self, net: TinyYolo, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        y = self.net(x)  # (N, 4 + C, A)
        xywh, cls = y[:, :4].transpose(1, 2), y[:, 4:].transpose(1, 2)
        if self.kind == "yolov5":
            obj = cls.mean(dim=2, keepdim=True)
            return torch.cat([xywh, obj, cls], dim=2)
        if self.kind == "ssd":
            xy, wh = xywh[..., :2], xywh[..., 2:]
            return torch.cat([xy - wh / 2, xy + wh / 2], dim=2) / SIZE, cls
        logits = self.net.raw(x)[:, 4:].transpose(1, 2)  # the class logits, not logit(sigmoid): exact in float32
        if self.kind == "rtdetr":
            return logits, xywh / SIZE
        logits = torch.cat([logits, torch.zeros_like(cls[..., :1])], dim=2)
        return logits, xywh / SIZE
