"""DALI graph pieces shared by every pipeline: decode, one augmented view, one centre-crop view.

The same code builds CPU graphs (`gpu=False`, used by the tests) and GPU graphs (`mixed` decode,
GPU operators). Views are cut from one decoded image: each call of `augmented_view` adds a
crop+resize (one `fn.resize` of a relative ROI), a colour twist, an optional blur and the
normalisation to the graph, reading its parameters from the external source's per-sample rows.
"""

from __future__ import annotations

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types

from dali_pipelines.augment import BLUR_SIGMA, BRIGHTNESS, CONTRAST, HUE_DEG, SATURATION, ViewSpec
from dali_pipelines.external import batch_columns

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN_255 = [255 * m for m in IMAGENET_MEAN]
_STD_255 = [255 * s for s in IMAGENET_STD]
_ZERO = np.zeros(1, np.int32)


def source_kwargs(parallel: bool) -> dict:
    """external_source arguments for a batch source: in the worker processes, two batches at a
    time (each batch is one worker's)."""
    return dict(parallel=True, prefetch_queue_depth=2) if parallel else dict(parallel=False)


def source_columns(source, settings) -> dict:
    """The external-source node of a batch source (`external.AugmentSource`, `IdListSource`): its
    outputs by column name, each with the dtype its `columns` give."""
    names, dtypes = zip(*batch_columns(source.columns))
    outs = fn.external_source(source=source, num_outputs=len(names), batch=True,
                              dtype=[types.to_dali_type(d) for d in dtypes], **source_kwargs(settings.parallel))
    return dict(zip(names, outs))


def source_image(columns: dict, name: str, settings):
    """The decoded image of the source's JPEG column `name`."""
    return decode(jpeg_bytes(columns[name], columns[f"{name}_length"]), settings)


def jpeg_bytes(jpegs, lengths):
    """Each sample's JPEG cut to its length: the source sends small JPEGs zero-padded to the
    batch's longest (`external.jpeg_batch`); a list is cut to its own length (a copy, cheap beside
    the decode)."""
    return fn.slice(jpegs, _ZERO, lengths, axes=[0])


def decode(jpegs, settings):
    """JPEG -> uint8 HWC RGB, on the device the views are cut on (`loader.Settings`). In a GPU
    pipeline `hw_decoder_load` of the images go to the hardware JPEG decoder (A100, H100, H200),
    the rest to the hybrid CPU-Huffman + CUDA decoder; with `cpu_decode` DALI's CPU threads decode
    (libjpeg-turbo) and the pixels go to the GPU for the views, and with `cpu_views` the views are
    cut on the CPU too: for small images, where nvJPEG's cost per image outweighs the decode, and
    where DALI's kernel launches would compete with a launch-bound training step."""
    if not settings.gpu or settings.cpu_decode or settings.cpu_views:
        image = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        return image.gpu() if settings.gpu and not settings.cpu_views else image
    return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hw_decoder_load=settings.hw_decoder_load)


def output(node, settings):
    """A graph output where the loader hands it out: every output of a GPU pipeline is on the GPU
    (DALI copies the CPU ones), so no host buffer the next run may reuse is copied asynchronously."""
    return node.gpu() if settings.gpu and node.device == "cpu" else node


def normalize(image, dali_dtype, mirror=0):
    """uint8 HWC -> ImageNet-normalised CHW float."""
    return fn.crop_mirror_normalize(image, mirror=mirror, mean=_MEAN_255, std=_STD_255,
                                    dtype=dali_dtype, output_layout="CHW")


def augmented_view(image, params, flips, v: int, spec: ViewSpec, dali_dtype):
    """View `v` of `image`: rows `params[v]` / `flips[v]` come from `augment.draw_views`.

    Must be called inside a pipeline built with `enable_conditionals=True` (the blur is
    per-sample conditional)."""
    view = fn.resize(image, size=(spec.size, spec.size), roi_start=params[v, 0:2], roi_end=params[v, 2:4],
                     roi_relative=True, interp_type=types.INTERP_LINEAR, antialias=True)
    if spec.color:
        view = fn.color_twist(view, brightness=params[v, BRIGHTNESS], contrast=params[v, CONTRAST],
                              saturation=params[v, SATURATION], hue=params[v, HUE_DEG])
        sigma = params[v, BLUR_SIGMA]
        if sigma > 0:
            view = fn.gaussian_blur(view, sigma=sigma)
    return normalize(view, dali_dtype, mirror=flips[v])


def center_view(image, roi, size: int, dali_dtype):
    """Resize of the centre-crop ROI (`augment.center_crop_roi`: torchvision's Resize(size * 256 /
    224) + CenterCrop(size), pixel for pixel) to size x size."""
    view = fn.resize(image, size=(size, size), roi_start=roi[0:2], roi_end=roi[2:4], roi_relative=True,
                     interp_type=types.INTERP_LINEAR, antialias=True)
    return normalize(view, dali_dtype)
