/*
 * ddpm_rt.h -- the C ABI of ddpm-rt (libddpm_rt). These comments are the API reference.
 *
 * libddpm_rt embeds CPython (through cffi's embedding mode) and runs the same Python
 * runtime as the `ddpm-rt` command: at run time it needs libpython3 and a Python
 * environment with ddpm-rt, NumPy, ONNX Runtime and tokenizers installed (the one it was
 * built from, or the folders in the environment variable DDPM_RT_PYTHONPATH, separated by
 * ':'). Python is started on the first call, without signal handlers: signals stay the
 * host's. Nothing is printed to stdout; warnings are silenced.
 *
 * Every function returns a status code (DDPM_RT_OK = 0 on success) and never aborts the
 * host. After a failure, ddpm_rt_last_error(handle) -- or ddpm_rt_last_error(NULL) after a
 * failed ddpm_rt_open -- gives a one-line message. A handle may be used from several
 * threads at once (calls are serialised by Python's interpreter lock while Python code
 * runs; ONNX Runtime releases it while it computes).
 *
 * Images: image i of a seed is the same whatever `num` (see the README's seed contract),
 * and byte-identical to the Python API's for the same bundle, prompt and settings.
 */
#ifndef DDPM_RT_H
#define DDPM_RT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    DDPM_RT_OK = 0,
    DDPM_RT_INVALID_ARGUMENT = 1, /* a bad prompt, number, option, or a NULL pointer */
    DDPM_RT_BUNDLE_ERROR = 2,     /* missing, malformed or modified bundle */
    DDPM_RT_BACKEND_ERROR = 3,    /* a graph that cannot load or run */
    DDPM_RT_NUMERICAL_ERROR = 4,  /* NaN/Inf/overflow in a graph's output: no image */
    DDPM_RT_CANCELLED = 5,        /* the progress callback returned 0 */
    DDPM_RT_BUFFER_TOO_SMALL = 6, /* out_capacity < num * height * width * 3; *written says how much */
    DDPM_RT_INTERNAL_ERROR = 7    /* anything else (Python could not start, a bug) */
};

typedef struct ddpm_rt_handle ddpm_rt_handle; /* opaque */

/* Called after every sampling step: step counts from 1 to total. Return nonzero to go on,
 * 0 to cancel (the call then returns DDPM_RT_CANCELLED and writes nothing). */
typedef int (*ddpm_rt_progress_fn)(int step, int total, void *user);

/* The library's version, e.g. "0.1.0" (static storage). */
const char *ddpm_rt_version(void);

/* Load and validate a bundle folder. options_json may be NULL or a JSON object with any of
 * "unet_precision" ("fp32"|"int8"), "text_precision", "decoder_precision" (a latent
 * bundle's decoder: "fp32", or a variant it lists: "fp16"|"int8"), "threads" (int),
 * "providers" (list of ONNX Runtime providers), "expected_digest" (sha256 of
 * manifest.json); and the request settings every call on the handle uses (the runtime's
 * GenerateConfig fields but those ddpm_rt_generate takes): "size" (the pictures' height:
 * the bundle's image by default; a cascade bundle also gives its base picture, e.g. 16: the
 * U-Net's own, without the decoder), "sampler" ("ddpm"|"ddim"|"dpm++2m"|"dpm++2m-sde"),
 * "eta" (ddim, in [0, 1]), "spacing" ("time"|"logsnr"), "batch_size" (images per U-Net
 * call), "resample" (inpainting: RePaint's jumps per step, 0-20, default 0; used only by
 * ddpm_rt_generate_from_image calls with a mask). Left out: the model's recommended
 * settings. */
int ddpm_rt_open(const char *bundle_dir, const char *options_json, ddpm_rt_handle **out);

/* The images' shape: height, width and channels (3, RGB). For a latent bundle these are the
 * decoded pixels' (what ddpm_rt_generate writes), not the latent's; with the "size" option,
 * that size's. */
int ddpm_rt_image_shape(ddpm_rt_handle *handle, int *height, int *width, int *channels);

/* Generate `num` images for a UTF-8 prompt into out_rgb: num * height * width * 3 bytes,
 * image after image, rows top to bottom, RGB interleaved (uint8). steps <= 0 and
 * guidance <= 0 mean the model's recommended settings (its manifest's, else the runtime's
 * fallback); the sampler is the model's recommended one unless the handle's options name
 * one. progress may
 * be NULL. *written receives the bytes written (or, with DDPM_RT_BUFFER_TOO_SMALL, the
 * bytes needed). */
int ddpm_rt_generate(ddpm_rt_handle *handle, const char *prompt, int num, uint64_t seed,
                     int steps, double guidance, ddpm_rt_progress_fn progress, void *user,
                     uint8_t *out_rgb, size_t out_capacity, size_t *written);

/* Image-to-image and inpainting (SDEdit; RePaint with the "resample" option): as
 * ddpm_rt_generate, starting from a picture instead of pure noise.
 *
 *   rgb      the picture: height rows of width pixels, top to bottom, each `channels` bytes
 *            (3: RGB, 4: RGBA, transparency composited on white); any size from 1x1 to
 *            4096x4096 pixels (width * height <= 16,777,216), resized to the model's picture
 *            (Lanczos) -- out_rgb's size is still ddpm_rt_image_shape's. Read, not kept.
 *   mask     NULL (redraw the whole picture), or width * height bytes, one grey level per
 *            pixel of the picture: >= 128 is repainted, < 128 kept exactly.
 *   strength how much of the picture is redrawn, in [0, 1]: 0 returns the picture (resized),
 *            1 (without a mask) is ddpm_rt_generate's image for the same seed, byte for
 *            byte; < 0 means the runtime's default (0.8). The run takes the last
 *            int(strength * steps) of the sampler's steps (about strength x the time).
 *
 * The other arguments, *written and the status codes are ddpm_rt_generate's. A NULL rgb,
 * channels other than 3 or 4, a width or height < 1 or a picture over the limit return
 * DDPM_RT_INVALID_ARGUMENT with a one-line message, before anything is read from rgb.
 * The bytes equal the Python API's Generator.generate(prompt, init_image=<the (height,
 * width, channels) uint8 array>, mask=<the (height, width) uint8 array>, strength=...). */
int ddpm_rt_generate_from_image(ddpm_rt_handle *handle, const char *prompt, int num,
                                uint64_t seed, int steps, double guidance, double strength,
                                const uint8_t *rgb, int width, int height, int channels,
                                const uint8_t *mask, ddpm_rt_progress_fn progress, void *user,
                                uint8_t *out_rgb, size_t out_capacity, size_t *written);

/* The last error on this handle (or of the last failed ddpm_rt_open with NULL), as a
 * one-line UTF-8 message; "" when there was none. Valid until the next call on the handle. */
const char *ddpm_rt_last_error(ddpm_rt_handle *handle);

/* Release a handle (NULL is ignored). */
void ddpm_rt_close(ddpm_rt_handle *handle);

#ifdef __cplusplus
}
#endif

#endif /* DDPM_RT_H */
