"""The one tolerance table: how closely a backend must match the torch reference.

Keyed by (backend, precision). ``check`` passes when |a - b| <= atol + rtol * |b| everywhere.
Every entry looser than the first says why. A distilled U-Net's variants (``distilled``,
``distilled-int8``, ...; issue 29) have no entries of their own: :func:`tolerance` judges each
by its base precision's, against the distilled fp32 graph.
"""

from __future__ import annotations

import numpy as np

TOLERANCES: dict[tuple[str, str], dict[str, float]] = {
    # fp32 ONNX Runtime vs torch eager: same math, different kernels and summation order.
    ("ort", "fp32"): {"rtol": 1e-3, "atol": 1e-5},
    # A latent bundle's decoder, fp32 ONNX Runtime vs torch, on pixels in [-1, 1]: the same
    # math through ~20 convolutions and nearest upsampling; 1e-4 absolute is 0.013 of a grey
    # level (one level is 2/255 = 7.8e-3), so a pass is byte-identical images but for rounding
    # ties.
    ("ort", "decoder-fp32"): {"rtol": 0.0, "atol": 1e-4},
    # A latent bundle's decoder variants vs its fp32 decoder, on the latents it decodes in
    # use (x̂0 along real trajectories and the final x_0), judged on the pixels as written:
    # the error after clipping to [-1, 1], in grey levels of 255 (one level is 2/255), worst
    # pixel and mean. fp16 (fp32 I/O) keeps ~3 significant digits, ~0.06 of a level at the
    # output, compounding through ~20 convolutions: measured max 0.22, mean 0.015 levels on a
    # 64x64 decoder (16x16x4 latents). At most one level anywhere is "rounding only"; a
    # broken conversion errs by tens of levels.
    ("ort", "decoder-fp16"): {"max_grey_levels": 1.0, "mean_grey_levels": 0.1},
    # int8 (QOperator u8/s8, MinMax-calibrated on recorded latents) errs relative to each
    # activation's range, so it gets a visual bound instead: 8 levels (3 % of the range) at
    # the worst pixel, 1 level on average -- the image as a whole within rounding of fp32.
    # Measured: 0.56 / 0.11 on the test fixture's tiny decoder (passes); 26.6 / 2.0 on the
    # 64x64 decoder above (refused: that decoder stays fp32/fp16).
    ("ort", "decoder-int8"): {"max_grey_levels": 8.0, "mean_grey_levels": 1.0},
    # int8 U-Net (CPU, QOperator u8/s8) vs fp32, on x_t recorded along real trajectories.
    # Quantisation error is relative to each activation's range, so elementwise bounds say
    # little: the check is the cosine between eps vectors, averaged over all timesteps
    # (measured 0.988 on the shipped model: 0.9996 at t > 50, falling to ~0.76 at t = 1,
    # where eps is read off an almost clean image -- but enters the image scaled by
    # sigma_t / alpha_t = 0.01, about one grey level). The judged quality in the model card
    # (recognition and Fréchet distance vs fp32) is the real check.
    ("ort", "int8"): {"min_mean_cosine": 0.98, "min_cosine_late": 0.99},
    # fp16 U-Net (fp32 I/O) vs fp32 on recorded x_t: fp16 keeps ~3 significant digits, and
    # rounding compounds through ~30 layers; measured max relative L2 error of eps 2.7e-3
    # on the shipped model, so 1e-2 leaves room for other models without hiding a broken
    # conversion (which errs by O(1)).
    ("ort", "fp16"): {"max_rel_l2": 1e-2},
    # The symmetric Q/DQ int8 graph (TensorRT's input), run by ONNX Runtime's CPU: the same
    # kind of error as the QOperator graph, judged the same way.
    ("ort", "int8-qdq"): {"min_mean_cosine": 0.98, "min_cosine_late": 0.99},
    # GPU backends (``ddpm-rt doctor``) vs ONNX Runtime CPU fp32 on the same recorded x_t.
    # fp32 on a GPU is not bit-equal to the CPU: TensorRT and cuDNN use TF32 for fp32
    # convolutions and matrix products on Ampere and newer (10-bit mantissa, ~5e-4 relative
    # per product), so fp32 is judged by the relative L2 error of eps, 5e-3.
    ("trt", "fp32"): {"max_rel_l2": 5e-3},
    ("ort-gpu", "fp32"): {"max_rel_l2": 5e-3},
    # fp16 on a GPU: the CPU fp16 graph's reasoning (and limit); TensorRT may also fuse
    # GroupNorm differently, which the limit's headroom (4x the measured CPU error) covers.
    ("trt", "fp16"): {"max_rel_l2": 1e-2},
    ("ort-gpu", "fp16"): {"max_rel_l2": 1e-2},
    # int8 (the Q/DQ graph) on a GPU: judged like the CPU int8 graph, by eps cosine.
    ("trt", "int8"): {"min_mean_cosine": 0.98, "min_cosine_late": 0.99},
    ("ort-gpu", "int8-qdq"): {"min_mean_cosine": 0.98, "min_cosine_late": 0.99},
    # A latent bundle's decoder on a GPU vs ONNX Runtime CPU fp32, on the same latents
    # (recorded at t = 1 of real trajectories), pixels in [-1, 1]. Not yet measured on a GPU
    # (none where this was written; scripts/gpu_check.sh reports the figures). fp32: TF32
    # convolutions, as for the U-Net, whose allowance is 5e-3 relative L2; a worst pixel sits
    # at ~3x the RMS error, so 1.6e-2 absolute = two grey levels (a level is 2/255), far
    # below a broken engine's O(1).
    ("trt", "decoder-fp32"): {"rtol": 0.0, "atol": 1.6e-2},
    ("ort-gpu", "decoder-fp32"): {"rtol": 0.0, "atol": 1.6e-2},
    # fp16 decoder graph (fp32 I/O): the fp16 U-Net's allowance (1e-2 relative L2) at the
    # same ~3x for a worst pixel: 3.2e-2 = four grey levels.
    ("trt", "decoder-fp16"): {"rtol": 0.0, "atol": 3.2e-2},
    ("ort-gpu", "decoder-fp16"): {"rtol": 0.0, "atol": 3.2e-2},
    # int8 (Q/DQ) decoder: per-activation quantisation error (~1 % of each range, compounded
    # over the decoder's convolutions) makes a per-pixel bound meaningless, so the image is
    # judged by its relative L2 error: 5e-2 (about 4 grey levels RMS on a mid-grey image)
    # passes a working int8 decoder and fails a broken one (O(1)); not measured -- revisit
    # with the int8 decoder quantiser's figures.
    ("trt", "decoder-int8"): {"max_rel_l2": 5e-2},
    ("ort-gpu", "decoder-int8"): {"max_rel_l2": 5e-2},
}


# Sentence embeddings leave the encoder L2-normalised in fp32 (also in the int8 graph, whose
# normalisation runs in fp32): a norm further than this from 1 means a broken graph.
EMBEDDING_NORM_ATOL = 1e-3
# A context passed through the API to a text bundle must be unit length within this, or
# exactly zero (the null context). Looser than the encoder's own check because callers
# build contexts themselves (means, interpolations) and store them in float16 or text.
CONTEXT_NORM_ATOL = 1e-2
# Largest magnitude accepted in a context vector of a label or vector bundle: one-hot and
# blended labels are <= 1 per entry; 1e3 leaves room for user-made vectors and refuses
# values that can only overflow the U-Net.
CONTEXT_ABS_MAX = 1e3
# Largest magnitude accepted in a latent bundle's decoder output. Its contract is pixels in
# [-1, 1] (the image is clipped to that when written); a decoder without a final tanh may
# overshoot on sharp edges by a few hundredths. A value a whole range beyond (|v| > 2) is no
# pixel anyone meant: a broken graph or an overflow, which would otherwise be written as an
# all-black or all-white PNG. models/latent64's decoder (tanh-bounded) measured a max |v| of
# 1.0 over 27 decodes (4 prompts x 3 seeds: every step's preview and the images).
DECODER_ABS_MAX = 2.0
# Largest magnitude accepted in the predicted noise or in x_t at any step. A healthy eps is
# about N(0, 1) and x_t stays within a few units (guidance 50 still stays far below this);
# anything beyond is a broken graph or an overflow (fp16 is the classic cause), and also
# NaN and Inf fail this check.
STEP_ABS_MAX = 1e4


DISTILLED = "distilled"  # the distilled U-Net's precision family (manifest.UNET_PRECISIONS)


def base_precision(precision: str) -> str:
    """The precision a distilled U-Net's variant is made in: ``distilled`` -> ``fp32``,
    ``distilled-int8`` -> ``int8``; any other precision is its own. The conversion is the
    same graph rewrite as the teacher's, so its error is the same kind and gets the same
    allowance (measured against the distilled fp32 graph, not the teacher)."""
    if precision == DISTILLED:
        return "fp32"
    return precision.removeprefix(DISTILLED + "-")


def tolerance(backend: str, precision: str) -> dict[str, float]:
    """The table's entry for ``backend`` and ``precision`` (a distilled variant's: its base
    precision's, :func:`base_precision`); KeyError when there is none."""
    return TOLERANCES[(backend, base_precision(precision))]


def check(
    backend: str, precision: str, actual: np.ndarray, reference: np.ndarray
) -> tuple[bool, float]:
    """(passes, worst excess over the allowed error: <= 0 when it passes)."""
    tol = tolerance(backend, precision)
    err = np.abs(actual.astype(np.float64) - reference.astype(np.float64))
    allowed = tol["atol"] + tol["rtol"] * np.abs(reference.astype(np.float64))
    excess = float((err - allowed).max()) if err.size else 0.0
    return excess <= 0.0, excess
