"""Against flicker in colorized films: the temporal step (`FlowSmoother`) and the figure that measures it
(`flicker`). Used by `pipeline.colorize.video`; measured by `bench/colorize.py --video`."""

from __future__ import annotations

import numpy as np
import torch


class FlowSmoother:
    """The temporal step: each frame's predicted ab (2, h, w), at the network's resolution, blended with the
    previous result where the scene is known there: unchanged regions (L differs by less than `still` levels
    after a 5x5 blur, which the camera's noise stays under) take the previous ab as it was; moving ones take it
    carried along DIS optical flow where forward and backward flow agree within `tolerance` pixels; elsewhere
    (occlusions, new content) the prediction stands. `weight` is the previous result's share where it is used."""

    def __init__(self, weight: float = 0.85, tolerance: float = 1.0, still: float = 3.0):
        import cv2

        self.cv2 = cv2
        self.flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self.weight, self.tolerance, self.still = weight, tolerance, still
        self.previous: tuple[np.ndarray, np.ndarray] | None = None  # (L as uint8, ab) of the last frame

    def __call__(self, light: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
        """`light`: the frame's network input (1, h, w) in [-1, 1]; `ab`: its prediction (2, h, w)."""
        cv2 = self.cv2
        gray = ((light[0].numpy() + 1) * 127.5).clip(0, 255).astype(np.uint8)
        current = ab.numpy().astype(np.float32)
        if self.previous is not None and self.previous[0].shape == gray.shape:
            last_gray, last_ab = self.previous
            change = cv2.blur(np.abs(gray.astype(np.float32) - last_gray.astype(np.float32)), (5, 5))
            unchanged = change < self.still
            warped, followed = self._carried(gray, last_gray, last_ab)
            followed &= ~unchanged
            carried = np.where(unchanged, last_ab, warped)
            share = (unchanged | followed).astype(np.float32) * self.weight
            current = share * carried + (1 - share) * current
        self.previous = (gray, current)
        return torch.from_numpy(current)

    def _carried(self, gray: np.ndarray, last_gray: np.ndarray, last_ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The last ab carried along the flow to this frame, and where that flow is reliable."""
        cv2 = self.cv2
        backward = self.flow.calc(gray, last_gray, None)  # where each pixel of this frame was in the last
        forward = self.flow.calc(last_gray, gray, None)
        height, width = gray.shape
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        map_x, map_y = grid_x + backward[..., 0], grid_y + backward[..., 1]
        warped = np.stack([cv2.remap(c, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                           for c in last_ab])  # fmt: skip
        # Forward-backward check: following the backward flow, then the forward one, should come home.
        there = np.stack([cv2.remap(forward[..., i], map_x, map_y, cv2.INTER_LINEAR) for i in (0, 1)], axis=-1)
        error = np.linalg.norm(backward + there, axis=-1)
        inside = (map_x >= 0) & (map_x <= width - 1) & (map_y >= 0) & (map_y <= height - 1)
        return warped, (error < self.tolerance) & inside


def flicker(frames: list[np.ndarray], moving: list[np.ndarray] | None = None) -> float:
    """Mean absolute change of a and b (CIE Lab units) between consecutive 8-bit RGB frames, over the pixels that
    do not move (`moving`: a boolean mask a frame pair, True where the scene moves; default: none moves)."""
    from skimage.color import rgb2lab

    ab = [rgb2lab(frame)[..., 1:] for frame in frames]
    changes = []
    for index in range(1, len(ab)):
        change = np.abs(ab[index] - ab[index - 1]).mean(axis=-1)
        keep = ~moving[index - 1] if moving is not None else np.ones(change.shape, bool)
        changes.append(change[keep])
    return float(np.concatenate(changes).mean()) if changes else 0.0


def warping_error(outputs: list[np.ndarray], sources: list[np.ndarray],
                  motion: tuple[float, float] | None = None) -> float:  # fmt: skip
    """The warping error of the video-consistency papers (Lai et al. 2018, "Learning Blind Video Temporal
    Consistency"): the mean squared difference, RGB in [0, 1], between each output frame and the previous output
    frame warped onto it along the optical flow of the *source* frames, over the pixels where that flow is
    reliable (forward and backward flow agree within 1 pixel and stay inside the frame), averaged over the frame
    pairs. The papers compute the flow with FlowNet2; here with OpenCV's DIS (no learned weights), so the figure
    compares runs of this product with each other, not with published tables. On generated clips whose motion is
    known, `motion` (dx, dy) gives it instead: where each pixel of a frame was in the previous one, the same for
    every pixel and frame (a still scene: (0, 0); noise in the source then cannot pass for motion)."""
    import cv2

    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    errors = []
    for index in range(1, len(outputs)):
        gray, last_gray = (cv2.cvtColor(sources[i], cv2.COLOR_RGB2GRAY) for i in (index, index - 1))
        height, width = gray.shape
        if motion is None:
            backward = flow.calc(gray, last_gray, None)
            forward = flow.calc(last_gray, gray, None)
        else:
            backward = np.broadcast_to(np.asarray(motion, np.float32), (height, width, 2)).copy()
            forward = -backward
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        map_x, map_y = grid_x + backward[..., 0], grid_y + backward[..., 1]
        previous = outputs[index - 1].astype(np.float32) / 255.0
        warped = cv2.remap(previous, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        there = np.stack([cv2.remap(forward[..., i], map_x, map_y, cv2.INTER_LINEAR) for i in (0, 1)], axis=-1)
        reliable = (np.linalg.norm(backward + there, axis=-1) < 1.0) & (map_x >= 0) & (map_x <= width - 1)
        reliable &= (map_y >= 0) & (map_y <= height - 1)
        if reliable.any():
            current = outputs[index].astype(np.float32) / 255.0
            errors.append(float(((current - warped) ** 2).sum(axis=-1)[reliable].mean()))
    return float(np.mean(errors)) if errors else 0.0
