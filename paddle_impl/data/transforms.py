"""mmdet 3.3.0's detection pipeline, pixel for pixel, and its batch preprocessing.

Per image (numpy, so it runs in DataLoader workers):

- train: ``LoadImageFromFile`` -> ``LoadAnnotations`` -> ``Resize(keep_ratio)``
  -> ``RandomFlip`` -> ``PackDetInputs``  (:func:`train_pipeline`);
- test: ``LoadImageFromFile`` -> ``Resize(keep_ratio)`` -> ``LoadAnnotations``
  -> ``PackDetInputs``  (:func:`test_pipeline`). Annotations are loaded after
  the resize there, so test boxes stay in original-image pixels.

Per batch, mmdet's ``DetDataPreprocessor`` (:class:`Collate`): BGR -> RGB,
float32, ``(x - mean) / std``, zero padding at the bottom and right to the
batch's largest height and width, each rounded up to ``pad_size_divisor``.
It runs in two steps: :class:`Collate` packs numpy arrays in the worker,
:func:`unpack_batch` splits them into per-image tensors in the main process.

Images are ``uint8`` BGR as OpenCV decodes them; boxes are float32
``(x1, y1, x2, y2)`` in pixels. Decoding and resizing call the same OpenCV
functions with the same arguments as mmcv (``cv2.imdecode(IMREAD_COLOR)``,
``cv2.resize(INTER_LINEAR)``), and box arithmetic is done in float32 in the
order mmdet does it, so results are bit-identical.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import cv2
import numpy as np
import paddle

from paddle_impl.config import get_config
from paddle_impl.data.samplers import SampleKey


def load_image(path: str, img_id: int) -> np.ndarray:
    """Decode an image file as mmcv's ``LoadImageFromFile`` does: ``(H, W, 3)`` uint8 BGR.

    ``IMREAD_COLOR`` turns grey images into three channels and applies EXIF
    orientation, as in mmcv.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} (image id {img_id}): image file not found") from None
    except OSError as err:
        raise OSError(f"{path} (image id {img_id}): cannot read the image file ({err.strerror or err})") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise ValueError(f"{path} (image id {img_id}): cannot decode the image "
                         f"(not an image format OpenCV reads, or the file is truncated)")
    return img


def rescale_size(width: int, height: int, scale: Sequence[int]) -> tuple[int, int]:
    """New ``(width, height)`` when fitting an image into ``scale`` with its aspect ratio kept.

    mmcv's ``rescale_size``: the factor is the largest one that keeps the long
    side within ``max(scale)`` and the short side within ``min(scale)``, and
    each side becomes ``int(side * factor + 0.5)``.
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(width * float(factor) + 0.5), int(height * float(factor) + 0.5)


def resize_keep_ratio(img: np.ndarray, scale: Sequence[int]) -> tuple[np.ndarray, tuple[float, float]]:
    """Resize ``(H, W, 3)`` to fit ``scale``; returns the image and ``(w_scale, h_scale)``.

    The scale factors are the realised ones, ``new_w / w`` and ``new_h / h``, as
    mmcv's ``Resize`` records them (they differ slightly from each other).
    """
    height, width = img.shape[:2]
    new_size = rescale_size(width, height, scale)
    resized = cv2.resize(img, new_size, interpolation=cv2.INTER_LINEAR)
    return resized, (resized.shape[1] / width, resized.shape[0] / height)


def rescale_boxes(boxes: np.ndarray, scale_factor: tuple[float, float],
                  img_shape: tuple[int, int]) -> np.ndarray:
    """Scale ``(N, 4)`` boxes by ``(w_scale, h_scale)`` and clip them to ``img_shape`` ``(h, w)``.

    As mmdet's ``HorizontalBoxes.rescale_`` then ``clip_``: the factors are
    rounded to float32 before the product.
    """
    factors = np.array([scale_factor[0], scale_factor[1]] * 2, dtype=np.float32)
    scaled = boxes.astype(np.float32) * factors
    scaled[:, 0::2] = np.clip(scaled[:, 0::2], 0, img_shape[1])
    scaled[:, 1::2] = np.clip(scaled[:, 1::2], 0, img_shape[0])
    return scaled


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror ``(N, 4)`` boxes in an image ``width`` wide: ``x1' = w - x2``, ``x2' = w - x1``."""
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def _pack(img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, ignore: np.ndarray) -> dict[str, Any]:
    """``PackDetInputs``: image to ``(3, H, W)``, instances split into kept and ignored."""
    return {
        "img": np.ascontiguousarray(img.transpose(2, 0, 1)),
        "gt_bboxes": boxes[~ignore].reshape(-1, 4),
        "gt_labels": labels[~ignore],
        "gt_bboxes_ignore": boxes[ignore].reshape(-1, 4),
        "gt_labels_ignore": labels[ignore],
    }


def train_pipeline(img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, ignore: np.ndarray,
                   scale: Sequence[int], flip: bool) -> dict[str, Any]:
    """Resize, optionally flip horizontally, pack.

    Args:
        img: ``(H, W, 3)`` uint8 BGR as decoded.
        boxes: ``(N, 4)`` float32 boxes in ``img`` pixels; ``labels`` ``(N,)`` int64;
            ``ignore`` ``(N,)`` bool (crowd).
        scale: ``(long, short)`` bound of the resize, e.g. ``(1333, 800)``.
        flip: whether to mirror.

    Returns:
        ``img`` ``(3, h, w)`` uint8 BGR; ``gt_bboxes`` ``(G, 4)`` float32 and
        ``gt_labels`` ``(G,)``; ``gt_bboxes_ignore`` ``(I, 4)`` and
        ``gt_labels_ignore`` ``(I,)``; ``ori_shape`` and ``img_shape`` ``(h, w)``;
        ``scale_factor`` ``(w_scale, h_scale)``; ``flip``; ``flip_direction``.
    """
    ori_shape = img.shape[:2]
    img, scale_factor = resize_keep_ratio(img, scale)
    img_shape = img.shape[:2]
    boxes = rescale_boxes(boxes, scale_factor, img_shape)
    if flip:
        img = img[:, ::-1]
        boxes = hflip_boxes(boxes, img_shape[1])
    packed = _pack(img, boxes, labels, ignore)
    packed.update(ori_shape=ori_shape, img_shape=img_shape, scale_factor=scale_factor,
                  flip=bool(flip), flip_direction="horizontal" if flip else None)
    return packed


def test_pipeline(img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, ignore: np.ndarray,
                  scale: Sequence[int]) -> dict[str, Any]:
    """Resize and pack; the boxes are returned unscaled, in original-image pixels.

    Same arguments and outputs as :func:`train_pipeline`, with ``flip`` False.
    """
    ori_shape = img.shape[:2]
    img, scale_factor = resize_keep_ratio(img, scale)
    packed = _pack(img, boxes.astype(np.float32), labels, ignore)
    packed.update(ori_shape=ori_shape, img_shape=img.shape[:2], scale_factor=scale_factor,
                  flip=False, flip_direction=None)
    return packed


def _padded_stack(arrays: Sequence[np.ndarray], dtype) -> np.ndarray:
    """``(B, max(1, max N_i), ...)`` zero-padded stack of ``(N_i, ...)`` arrays.

    At least one row, because Paddle's DataLoader cannot pass zero-size arrays
    out of its worker processes.
    """
    rows = max(1, max(len(a) for a in arrays))
    out = np.zeros((len(arrays), rows) + arrays[0].shape[1:], dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return out


class Collate:
    """mmdet's ``DetDataPreprocessor`` as a DataLoader ``collate_fn``.

    Args:
        mean, std: per-channel normalisation in RGB order when ``bgr_to_rgb``.
        bgr_to_rgb: reverse the channels before normalising.
        pad_size_divisor: the batch's height and width are rounded up to it.
        pad_value: value of the padded pixels, after normalisation.

    Defaults come from ``get_config()['data_preprocessor']`` and
    ``get_config()['data']['pad_value']``.

    Calling it packs samples into numpy arrays that can leave a worker process
    (:meth:`__call__`); :func:`unpack_batch` turns that into the batch the model
    takes. ``collate.batch(samples)`` does both.
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 bgr_to_rgb: bool | None = None, pad_size_divisor: int | None = None,
                 pad_value: float | None = None) -> None:
        cfg = get_config()
        pre = cfg["data_preprocessor"]
        # float32 like the buffers of mmengine's ImgDataPreprocessor, so the
        # subtraction and division round exactly as there.
        self.mean = np.asarray(pre["mean"] if mean is None else mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(pre["std"] if std is None else std, np.float32).reshape(3, 1, 1)
        self.bgr_to_rgb = pre["bgr_to_rgb"] if bgr_to_rgb is None else bgr_to_rgb
        self.pad_size_divisor = pre["pad_size_divisor"] if pad_size_divisor is None else pad_size_divisor
        self.pad_value = cfg["data"]["pad_value"] if pad_value is None else pad_value

    def padded(self, size: int) -> int:
        return int(math.ceil(size / self.pad_size_divisor)) * self.pad_size_divisor

    def normalize(self, img: np.ndarray) -> np.ndarray:
        """``(3, H, W)`` uint8 BGR -> float32, channel-reversed and normalised."""
        if self.bgr_to_rgb:
            img = img[::-1]
        return (img.astype(np.float32) - self.mean) / self.std

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Normalise, pad and stack samples of ``CocoDetection`` (numpy only).

        Returns:
            ``images`` ``(B, 3, H, W)`` float32, ``H`` and ``W`` multiples of
            ``pad_size_divisor``; ``gt_bboxes`` ``(B, G, 4)``, ``gt_labels``
            ``(B, G)`` and ``num_gts`` (the first ``num_gts[i]`` rows of image
            ``i`` are real); the same for ignored boxes (``gt_bboxes_ignore``,
            ``gt_labels_ignore``, ``num_ignores``); per-image metadata lists
            ``img_ids``, ``img_paths``, ``ori_shapes``, ``img_shapes``,
            ``pad_shapes`` (each image's own shape rounded up to the divisor,
            as mmdet's ``pad_shape``), ``scale_factors`` ``(w_scale, h_scale)``,
            ``flips``, ``keys`` ``(index, epoch, batch)``; ``batch_input_shape``.
        """
        if not samples:
            raise ValueError("cannot collate an empty batch")
        heights = [s["img"].shape[1] for s in samples]
        widths = [s["img"].shape[2] for s in samples]
        batch_h, batch_w = self.padded(max(heights)), self.padded(max(widths))
        images = np.full((len(samples), 3, batch_h, batch_w), self.pad_value, dtype=np.float32)
        for i, s in enumerate(samples):
            images[i, :, :heights[i], :widths[i]] = self.normalize(s["img"])
        return {
            "images": images,
            "gt_bboxes": _padded_stack([s["gt_bboxes"] for s in samples], np.float32),
            "gt_labels": _padded_stack([s["gt_labels"] for s in samples], np.int64),
            "num_gts": [len(s["gt_labels"]) for s in samples],
            "gt_bboxes_ignore": _padded_stack([s["gt_bboxes_ignore"] for s in samples], np.float32),
            "gt_labels_ignore": _padded_stack([s["gt_labels_ignore"] for s in samples], np.int64),
            "num_ignores": [len(s["gt_labels_ignore"]) for s in samples],
            "img_ids": [s["img_id"] for s in samples],
            "img_paths": [s["img_path"] for s in samples],
            "ori_shapes": [tuple(s["ori_shape"]) for s in samples],
            "img_shapes": [tuple(s["img_shape"]) for s in samples],
            "pad_shapes": [(self.padded(h), self.padded(w)) for h, w in zip(heights, widths)],
            "scale_factors": [tuple(s["scale_factor"]) for s in samples],
            "flips": [bool(s["flip"]) for s in samples],
            "keys": [tuple(s["key"]) for s in samples],
            "batch_input_shape": (batch_h, batch_w),
        }

    def batch(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """``unpack_batch(self(samples))``: the model's batch straight from samples."""
        return unpack_batch(self(samples))


def unpack_batch(packed: dict[str, Any]) -> dict[str, Any]:
    """The model's batch from the output of :class:`Collate` (as numpy, or as the
    Paddle tensors and lists a DataLoader turns it into).

    Returns:
        ``images`` ``(B, 3, H, W)`` float32 tensor; ``gt_bboxes``,
        ``gt_bboxes_ignore``: lists of ``(G_i, 4)`` float32 tensors;
        ``gt_labels``, ``gt_labels_ignore``: lists of ``(G_i,)`` int64 tensors;
        ``ori_shapes``, ``img_shapes``, ``pad_shapes``, ``batch_input_shape``
        as ``(h, w)`` tuples; ``scale_factors`` tuples; ``keys`` as
        :class:`SampleKey`; ``img_ids``, ``img_paths``, ``flips`` lists.
    """
    def tensor(value) -> paddle.Tensor:
        return value if isinstance(value, paddle.Tensor) else paddle.to_tensor(value)

    def rows(name: str, counts: Sequence[int]) -> list[paddle.Tensor]:
        stacked = tensor(packed[name])
        return [stacked[i, :n] for i, n in enumerate(counts)]

    return {
        "images": tensor(packed["images"]),
        "gt_bboxes": rows("gt_bboxes", packed["num_gts"]),
        "gt_labels": rows("gt_labels", packed["num_gts"]),
        "gt_bboxes_ignore": rows("gt_bboxes_ignore", packed["num_ignores"]),
        "gt_labels_ignore": rows("gt_labels_ignore", packed["num_ignores"]),
        "img_ids": list(packed["img_ids"]),
        "img_paths": list(packed["img_paths"]),
        "ori_shapes": [tuple(s) for s in packed["ori_shapes"]],
        "img_shapes": [tuple(s) for s in packed["img_shapes"]],
        "pad_shapes": [tuple(s) for s in packed["pad_shapes"]],
        "scale_factors": [tuple(s) for s in packed["scale_factors"]],
        "flips": list(packed["flips"]),
        "keys": [SampleKey(*k) for k in packed["keys"]],
        "batch_input_shape": tuple(packed["batch_input_shape"]),
    }
