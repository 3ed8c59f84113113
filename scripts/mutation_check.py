"""Mutation check: break one protection or formula at a time and run the tests that guard it.

A curated table (issue 17): each mutation is a file, an exact pattern that must occur there
exactly once (or a stated number of times, all replaced: a check written twice), its
replacement, and the tests expected to catch it. A mutation is *caught*
when those tests fail (pytest exit status 1); it *survives* when they pass. Only the named
tests run for each mutation, so a mutation caught by accident elsewhere in the suite does not
count.

The mutant is written into the working tree (the editable install maps ``ddpm_rt`` onto
``runtime/``, so the tests and the CLI processes they start see it) and always restored, on
success, failure, exception or SIGINT/SIGTERM; the original bytes are also kept in a
folder under the system temp dir until restored, and a later run puts back anything found
there (after a SIGKILL). Bytecode: the tests run with ``PYTHONDONTWRITEBYTECODE=1``, the
mutant gets an mtime distinct from the original's (so no cached ``.pyc`` of the original
stands in for it), and the original is restored with its own mtime.

Run on demand, not in CI (it takes minutes)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_check.py            # whole table
    .venv/bin/python scripts/mutation_check.py --only ddim-direction,cfg    # some rows
    .venv/bin/python scripts/mutation_check.py --list                        # the table
    .venv/bin/python scripts/mutation_check.py --docs                        # + docs table

First the named tests run once on the unmutated tree (they must pass, or nothing a mutation
does can be judged); then each mutation. The exit status is 0 only when every mutation was
caught. ``--docs`` writes the result table into docs/reliability.md between its
``mutation-table`` markers (the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# originals of files under mutation, until restored (outside the tree: nothing to ignore)
RESTORE = (
    Path(tempfile.gettempdir())
    / f"ddpm-rt-mutation-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]}"
)
DOCS = ROOT / "docs" / "reliability.md"
START, END = "<!-- mutation-table:start -->", "<!-- mutation-table:end -->"


@dataclass(frozen=True)
class Mutation:
    id: str
    guards: str  # the protection or formula, as README/issue 17 name it
    file: str
    pattern: str
    replacement: str
    tests: tuple[str, ...]
    count: int = 1  # occurrences of the pattern, all replaced (a check written twice)


T = "tests/"
SAMP = "runtime/core/samplers.py"
GEN = "runtime/generator.py"
RUN = "runtime/run.py"
CLI_GEN = "runtime/cli/generate.py"

MUTATIONS: tuple[Mutation, ...] = (
    # -- manifest validation, confinement, hash = load, live I/O checks ----------------------
    Mutation(
        "manifest-timesteps-range",
        "manifest validation (schedule.timesteps range)",
        "runtime/bundle/manifest.py",
        '_int(sched, "schedule", "timesteps", 1, MAX_TIMESTEPS)',
        '_int(sched, "schedule", "timesteps", 0, MAX_TIMESTEPS)',
        (T + "test_protections.py::test_manifest_validator_agrees_with_the_documented_limits",),
    ),
    Mutation(
        "manifest-beta-order",
        "manifest validation (beta_start <= beta_end)",
        "runtime/bundle/manifest.py",
        "if b0 > b1:",
        "if False:",
        (T + "test_protections.py::test_manifest_validator_agrees_with_the_documented_limits",),
    ),
    Mutation(
        "confinement-symlink",
        "confinement (a manifest path leading out through a symlink)",
        "runtime/bundle/bundle.py",
        "if real.parent != root and root not in real.parents:",
        "if False:",
        (T + "test_hostile_bundles.py::test_path_symlink_leading_out_is_refused",),
    ),
    Mutation(
        "confinement-plain-name",
        "confinement (every manifest path a plain file name)",
        "runtime/bundle/manifest.py",
        "if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):",
        "if not isinstance(name, str):",
        (T + "test_hostile_bundles.py::test_manifest_paths_must_be_plain_names",),
    ),
    Mutation(
        "manifest-requires",
        "manifest validation (a required feature this runtime lacks)",
        "runtime/bundle/manifest.py",
        "    if missing:\n        raise BundleError(",
        "    if False:\n        raise BundleError(",
        (T + "test_hostile_bundles.py::test_mistyped_or_out_of_range_field",),
    ),
    Mutation(
        "hash-equals-load",
        "hash = load (the sha256 of the bytes the loader reads)",
        "runtime/bundle/bundle.py",
        'if h.hexdigest() != meta["sha256"]:',
        "if False:",
        (
            T + "test_hostile_bundles.py::test_file_flipped_bit",
            T + "test_hostile_bundles.py::test_file_swapped_by_rename_while_loading_is_not_"
            "what_loads",
        ),
    ),
    Mutation(
        "hash-then-load-same-file",
        "hash = load (a write between hashing and loading is caught)",
        "runtime/bundle/bundle.py",
        "if any(getattr(before, f) != getattr(after, f) for f in fields):",
        "if False:",
        (T + "test_hostile_bundles.py::test_file_modified_while_it_is_loaded",),
    ),
    Mutation(
        "size-before-hash",
        "file size checked before hashing",
        "runtime/bundle/bundle.py",
        "if size is not None and st.st_size != size:",
        "if False:",
        (T + "test_hostile_bundles.py::test_file_grown_after_load_is_refused_before_hashing",),
    ),
    Mutation(
        "live-io-at-load",
        "live I/O check when a session is created",
        "runtime/backends/ort.py",
        "why = spec.mismatch(live_spec(graph, sess))",
        "why = None",
        (T + "test_hostile_bundles.py::test_graph_io_checked_when_the_session_is_created",),
    ),
    Mutation(
        "live-io-every-run",
        "live I/O check of every run's outputs",
        "runtime/backends/ort.py",
        "why = check_outputs(spec, feeds, result)",
        "why = None",
        (T + "test_hostile_bundles.py::test_graph_outputs_checked_on_every_run_of_a_real_session",),
    ),
    Mutation(
        "expected-digest",
        "--expect-digest / expected_digest",
        "runtime/bundle/bundle.py",
        "if expected_digest is not None and digest != expected_digest:",
        "if False:",
        (T + "test_hostile_bundles.py::test_digest_pins_the_manifest_fields",),
    ),
    # -- numbers ----------------------------------------------------------------------------
    Mutation(
        "step-nan-check",
        "per-step NaN/Inf check",
        RUN,
        "        if not bad.any():\n            return set()",
        "        if True:\n            return set()",
        (T + "test_hostile_bundles.py::test_non_finite_unet_output_is_an_error_naming_the_step",),
    ),
    Mutation(
        "text-embedding-norm",
        "text encoder embedding norm 1 +- 0.001",
        "runtime/text.py",
        "if not abs(norm - 1.0) <= EMBEDDING_NORM_ATOL:",
        "if False:",
        (T + "test_hostile_bundles.py::test_text_encoder_output_must_be_unit_length",),
    ),
    Mutation(
        "context-unit-or-zero",
        "a text bundle's context rows unit length (within 0.01) or exactly zero",
        GEN,
        "bad = ~((np.abs(norms - 1.0) <= CONTEXT_NORM_ATOL) | (norms == 0.0))",
        "bad = ~np.isfinite(norms)",
        (T + "test_hostile_inputs.py::test_api_text_contexts_are_unit_or_zero",),
    ),
    Mutation(
        "bounds-guidance",
        "bounds (guidance in [0, 50], finite)",
        "runtime/config.py",
        "            0.0,\n            MAX_GUIDANCE,",
        "            0.0,\n            math.inf,",
        (T + "test_protections.py::test_settings_out_of_range_are_refused_before_work",),
    ),
    Mutation(
        "memory-up-front",
        "bounds: a run over half the machine's memory refused up front",
        "runtime/config.py",
        "    if need > limit:",
        "    if False:",
        (T + "test_hostile_inputs.py::test_api_memory_is_refused_up_front_with_the_estimate",),
    ),
    Mutation(
        "png-size",
        "bounds: a PNG over Pillow's 89 M-pixel limit refused up front",
        "runtime/images.py",
        "    if ph * pw > MAX_PNG_PIXELS:",
        "    if False:",
        (T + "test_protections.py::test_png_over_the_pixel_limit_is_refused_before_work",),
    ),
    # -- --force for every file written ---------------------------------------------------------
    Mutation(
        "force-out",
        "--force for --out",
        "runtime/bundle/fileio.py",
        "if os.path.lexists(path) and not force:",
        "if False:",
        (T + "test_protections.py::test_every_output_needs_force_to_be_replaced",),
    ),
    Mutation(
        "force-preview",
        "--force for preview files (OUT.stepK.png)",
        CLI_GEN,
        "check_writable(self._step_png(k), force=self.force)",
        "pass",
        (T + "test_protections.py::test_every_output_needs_force_to_be_replaced",),
    ),
    Mutation(
        "force-trajectory",
        "--force for --trajectory",
        CLI_GEN,
        "check_writable(self.trajectory, force=self.force)",
        "pass",
        (T + "test_protections.py::test_every_output_needs_force_to_be_replaced",),
    ),
    # -- signals ----------------------------------------------------------------------------------
    Mutation(
        "signal-handlers",
        "SIGINT/SIGTERM handlers of the CLI",
        "runtime/cli/__init__.py",
        "signal.signal(s, _raise_signalled)",
        "pass",
        (T + "test_signals.py::test_signal_during_generation",),
    ),
    Mutation(
        "atomic-write-cleanup",
        "nothing half-written: the temp file removed when a write is interrupted",
        "runtime/bundle/fileio.py",
        "            tmp.unlink()\n        raise",
        "            pass\n        raise",
        (T + "test_signals.py::test_signal_during_png_write",),
    ),
    Mutation(
        "commit-after-signal",
        "no file is committed once a signal arrived (its exception swallowed by native code)",
        "runtime/bundle/fileio.py",
        "            check()",
        "            pass",
        (T + "test_signals.py::test_no_file_is_committed_once_a_signal_arrived",),
    ),
    Mutation(
        "signal-checked-each-step",
        "a swallowed signal stops the sampling at the next step",
        "runtime/cli/generate.py",
        "        raise_if_signalled()  # a signal",
        "        pass  # a signal",
        (T + "test_signals.py::test_a_swallowed_signal_still_stops_the_work_and_writes_nothing",),
    ),
    # -- caches -----------------------------------------------------------------------------------
    Mutation(
        "ort-cache-sha256",
        "optimised-graph cache: the entry's own sha256 checked (what is hashed is what runs)",
        "runtime/backends/ort_cache.py",
        'if hashlib.sha256(data).hexdigest() != recorded.get("sha256"):',
        "if False:",
        (
            T + "test_hostile_bundles.py::test_optimised_graph_cache_entry_replaced_by_another_"
            "graph",
            T + "test_hostile_residue.py::test_cached_graph_edited_in_place_does_not_run",
        ),
    ),
    Mutation(
        "ort-cache-regular-file",
        "optimised-graph cache: entries read as regular files, size from the record first",
        "runtime/backends/ort_cache.py",
        'data = read_regular(path, size, "")',
        "data = path.read_bytes()",
        (T + "test_residue_files.py::test_a_bad_cache_entry_is_a_miss_that_is_rewritten",),
    ),
    Mutation(
        "ort-cache-kernel-key",
        "optimised-graph cache: the key holds the CPU kernel family as measured",
        "runtime/backends/ort_cache.py",
        '"kernels": cpu_kernels.family(),',
        "",
        (T + "test_residue_files.py::test_the_cache_key_holds_the_measured_kernel_family",),
    ),
    # -- CPU kernel families (issue 25) ------------------------------------------------------
    Mutation(
        "int8-reduce-range",
        "int8 graphs every CPU family computes alike: 7-bit weights (reduce_range)",
        "export/variants.py",
        "reduce_range=True,",
        "reduce_range=False,",
        (T + "test_cpu_families.py::test_quantize_writes_a_graph_every_family_computes_alike",),
    ),
    Mutation(
        "cpu-family-probe",
        "the int8 kernel family measured (not assumed)",
        "runtime/backends/cpu_kernels.py",
        "return U8S8_EXACT if bool((u8s8_sum(a, b) == exact).all()) else U8S8_SATURATING",
        "return U8S8_EXACT",
        (T + "test_cpu_families.py::test_probe_names_this_cpus_family_and_the_masked_one",),
    ),
    Mutation(
        "decoder-output-range",
        "a latent bundle's decoder output within +-DECODER_ABS_MAX, not only finite",
        GEN,
        "if not peak <= DECODER_ABS_MAX:  # NaN fails too",
        "if not math.isfinite(peak):",
        (T + "test_latent_bundle.py::test_a_decoder_output_beyond_its_contract_is_an_error",),
    ),
    Mutation(
        "serve-ascii-json",
        "serve: every JSON body encodable whatever the client sent (lone surrogates)",
        "runtime/tools/serve/app.py",
        "ensure_ascii=True, allow_nan=False",
        "ensure_ascii=False, allow_nan=False",
        (T + "test_residue_serve.py::test_an_error_echoing_a_lone_surrogate_is_still_a_json_422",),
    ),
    # -- quantisation parity ----------------------------------------------------------------------
    Mutation(
        "quantize-parity",
        "quantisation: the int8 graph judged against fp32 by the tolerance table",
        "export/quantize.py",
        "    if not ok:\n        raise QuantizeError(",
        "    if False:\n        raise QuantizeError(",
        (T + "test_hostile_residue.py::test_quantize_fails_a_graph_that_must_fail_its_check",),
    ),
    Mutation(
        "quantize-nan",
        "quantisation: a U-Net whose own trajectories are not finite is refused",
        "export/quantize.py",
        "raise QuantizeError(_NOT_FINITE.format(source=gen.unet_variant, precision=precision))",
        "pass",
        (T + "test_hostile_residue.py::test_quantize_refuses_a_unet_that_outputs_nan",),
        count=2,
    ),
    # -- distilled U-Net (issue 29) ---------------------------------------------------------------
    Mutation(
        "distilled-one-row",
        "a guidance-distilled U-Net: w fed, one row per image per step (no unconditional rows)",
        "runtime/core/guidance.py",
        "self.guided = np.flatnonzero(self._scales != 1.0) if not self.takes_w else np.arange(0)",
        "self.guided = np.flatnonzero(self._scales != 1.0)",
        (
            T + "test_distilled_bundle.py::"
            "test_the_runtime_feeds_w_and_makes_one_row_per_image_per_step",
        ),
    ),
    Mutation(
        "distilled-negative",
        "a guidance-distilled U-Net refuses a negative prompt (it makes no unconditional pass)",
        "runtime/config.py",
        "if guidance and negative_prompt is not None:",
        "if False:",
        (T + "test_distilled_bundle.py::test_negative_prompt_refused_and_other_steps_warned",),
    ),
    Mutation(
        "decoder-variant-parity",
        "decoder variants: an fp16/int8 decoder judged against fp32 by the tolerance table",
        "export/quantize_decoder.py",
        "    if not ok:\n        raise QuantizeError(",
        "    if False:\n        raise QuantizeError(",
        (T + "test_latent_variants.py::test_decoder_variant_that_misses_writes_nothing",),
    ),
    Mutation(
        "capi-latent-shape",
        "C ABI: a latent bundle reports its pixels' shape, not the latent's",
        "runtime/capi/_impl.py",
        "self.shape = gen.bundle.output_shape(config.size)",
        "self.shape = gen.bundle.sample_shape",
        (T + "test_capi.py::test_cpp_example_matches_the_python_api_on_a_latent_bundle",),
    ),
    Mutation(
        "bench-latent-over-pixel",
        "bench --compare: the latent/pixel ratio whichever bundle is named first",
        "runtime/tools/bench_latent.py",
        "this / that if gen.bundle.latent else that / this",
        "this / that",
        (T + "test_latent_bench.py::test_bench_pixel_bundle_against_a_latent_one",),
    ),
    # -- precision selection, CFG -----------------------------------------------------------------
    Mutation(
        "unet-precision",
        "unet_precision honoured",
        GEN,
        'self.unet_precision, self.unet_graph = _pick("U-Net", variants, unet)',
        'self.unet_precision, self.unet_graph = unet, variants["fp32"]',
        (T + "test_protections.py::test_unet_precision_selects_the_graph",),
    ),
    Mutation(
        "cfg-formula",
        "classifier-free guidance eps_u + g (eps_c - eps_u)",
        "runtime/core/guidance.py",
        "return uncond + self.scale * (cond - uncond), out",
        "return cond + self.scale * (cond - uncond), out",
        (T + "test_goldens.py::test_classifier_free_guidance_formula",),
    ),
    Mutation(
        "cfg-formula-mixed-rows",
        "classifier-free guidance per row (guided and plain rows in one call)",
        "runtime/core/guidance.py",
        "eps[self.guided] = uncond + self.scale * (cond[self.guided] - uncond)",
        "eps[self.guided] = cond[self.guided]",
        (T + "test_run.py::test_jobs_run_together_give_what_they_give_alone",),
    ),
    Mutation(
        "cfg-null-context",
        "classifier-free guidance: the null context is zero",
        RUN,
        "zeros = np.zeros(d, np.float32)",
        "zeros = np.full(d, d**-0.5, np.float32)",
        (T + "test_goldens.py::test_negative_prompt_replaces_the_null_context",),
    ),
    # -- samplers' coefficients -------------------------------------------------------------------
    Mutation(
        "ddpm-eps-coef",
        "DDPM mean (Ho et al. Algorithm 2, line 4)",
        SAMP,
        "self._eps_coef = ((1.0 - a) / np.sqrt(1.0 - ab)).astype(_f32)",
        "self._eps_coef = ((1.0 - a) / np.sqrt(1.0 - ab * a)).astype(_f32)",
        (T + "test_samplers.py::test_ddpm_matches_diffusers",),
    ),
    Mutation(
        "ddpm-noise-scale",
        "DDPM noise sigma_t = sqrt(beta_t)",
        SAMP,
        "self._noise = np.where(t > 1, np.sqrt(b), 0.0).astype(_f32)",
        "self._noise = np.where(t > 1, np.sqrt(b * (1.0 - ab / a) / (1.0 - ab)), 0.0).astype(_f32)",
        (T + "test_samplers.py::test_ddpm_matches_diffusers",),
    ),
    Mutation(
        "ddim-direction",
        "DDIM direction term sqrt(1 - ab_prev - sigma^2) eps",
        SAMP,
        "x_prev = self._x0_coef[i] * x0 + self._dir_coef[i] * eps",
        "x_prev = self._x0_coef[i] * x0",
        (T + "test_samplers.py::test_ddim_matches_diffusers",),
    ),
    Mutation(
        "ddim-last-step-t1",
        "DDIM's last step lands at t = 0",
        SAMP,
        "ab_prev = schedule.alpha_bar64[np.append(self.timesteps[1:], 0)]",
        "ab_prev = schedule.alpha_bar64[np.append(self.timesteps[1:], 1)]",
        (
            T + "test_samplers.py::test_ddim_matches_diffusers",
            T + "test_goldens.py::test_seeded_end_to_end_golden",
        ),
    ),
    Mutation(
        "ddim-last-step-t1-golden",
        "DDIM's last step lands at t = 0 (the end-to-end golden alone)",
        SAMP,
        "ab_prev = schedule.alpha_bar64[np.append(self.timesteps[1:], 0)]",
        "ab_prev = schedule.alpha_bar64[np.append(self.timesteps[1:], 1)]",
        (T + "test_goldens.py::test_seeded_end_to_end_golden",),
    ),
    Mutation(
        "ddim-sigma",
        "DDIM sigma_t(eta) (Song et al. eq. 16)",
        SAMP,
        "sigma = eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)",
        "sigma = eta * np.sqrt(1.0 - ab / ab_prev)",
        (T + "test_samplers.py::test_ddim_matches_diffusers",),
    ),
    Mutation(
        "dpm-second-order",
        "DPM-Solver++(2M) second-order extrapolation",
        SAMP,
        "half_inv_r[1:-1] = 0.5 * h[1:-1] / h[:-2]",
        "half_inv_r[1:-1] = 0.5 * h[:-2] / h[1:-1]",
        (T + "test_samplers.py::test_dpm_solver_matches_diffusers",),
    ),
    Mutation(
        "dpm-sde-noise",
        "DPM-Solver++(2M) SDE noise sigma_t sqrt(1 - e^-2h)",
        SAMP,
        "noise = sigma_t * np.sqrt(np.maximum(1.0 - e, 0.0)) if stochastic else np.zeros(len(s))",
        "noise = sigma_t * np.maximum(1.0 - e, 0.0) if stochastic else np.zeros(len(s))",
        (T + "test_samplers.py::test_dpm_solver_matches_diffusers",),
    ),
    Mutation(
        "spacing-trailing",
        "timestep spacing (trailing, from T)",
        SAMP,
        "return np.round(np.linspace(T, 0, steps + 1))[:-1].astype(np.int64)",
        "return np.round(np.linspace(T, 1, steps)).astype(np.int64)",
        (T + "test_samplers.py::test_ddim_matches_diffusers",),
    ),
    Mutation(
        "timestep-input",
        "the U-Net's time input t / T",
        "runtime/core/schedule.py",
        "return t / timesteps",
        "return (t - 1) / timesteps",
        (T + "test_goldens.py::test_generator_eps_matches_torch_called_as_training_calls_it",),
    ),
    # -- the noise spec -----------------------------------------------------------------------
    Mutation(
        "noise-key-order",
        "noise spec: Philox key (seed, i), seed first",
        "runtime/core/noise.py",
        "np.random.Philox(key=[int(s), int(i)])",
        "np.random.Philox(key=[int(i), int(s)])",
        (T + "test_bundle_format.py::test_noise_from_the_spec_text_alone",),
    ),
    Mutation(
        "noise-box-muller",
        "noise spec: Box-Muller z1 = r cos(2 pi u2)",
        "runtime/core/noise.py",
        "out[..., 0::2] = r * np.cos(theta)",
        "out[..., 0::2] = r * np.sin(theta)",
        (T + "test_bundle_format.py::test_noise_from_the_spec_text_alone",),
    ),
    # -- data -----------------------------------------------------------------------------------
    Mutation(
        "emoji-style-dropped",
        "emoji data set: every installed art style is used",
        "training/emoji_sources.py",
        "src = FontSource(name, font, 109) if font.is_file() else None  # bitmap: 109 px only",
        "src = None",
        (T + "test_emoji.py::test_builder_writes_imagefolder_npz_and_attribution",),
    ),
    # -- step previews ------------------------------------------------------------------------
    Mutation(
        "preview-from-final",
        "step previews are the step's x̂0 (CLI writes the frames, not the final images)",
        CLI_GEN,
        "save_png(self._step_png(k), self.frames[k], self.scale, self.ncols)",
        "save_png(self._step_png(k), images, self.scale, self.ncols)",
        (T + "test_goldens.py::test_cli_trajectory_previews_and_provenance",),
    ),
    Mutation(
        "preview-x0-formula",
        "step previews: x̂0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)",
        RUN,
        "x0 = predict_x0(x[rows], eps[rows], *self.gen.schedule.x0_coefficients(t))",
        "x0 = x[rows]",
        (T + "test_goldens.py::test_callback_progress_preview_and_cancel",),
    ),
    Mutation(
        "preview-x0-timestep",
        "step previews: x̂0 with the step's own timestep's coefficients",
        RUN,
        "*self.gen.schedule.x0_coefficients(t))",
        "*self.gen.schedule.x0_coefficients(t - 1))",
        (T + "test_goldens.py::test_callback_progress_preview_and_cancel",),
    ),
    # -- the int8-friendlier U-Net blocks (issue 19) ------------------------------------------
    Mutation(
        "ema-batchnorm-stats",
        "EMA weights carry BatchNorm's running statistics",
        "training/loop.py",
        "        be.copy_(b)",
        "        pass",
        (T + "test_int8_blocks.py::test_batch_norm_statistics_reach_the_ema_weights",),
    ),
    Mutation(
        "ws-fold-bias",
        "weight standardisation folded at export keeps the bias",
        "training/model.py",
        "                    conv.bias.copy_(child.bias)",
        "                    pass",
        (T + "test_int8_blocks.py::test_ws_fold_keeps_the_outputs",),
    ),
    Mutation(
        "int8-relu-fused",
        "the CPU int8 graph folds ReLU into the quantised convolution",
        "export/variants.py",
        '"Gemm", "Relu", "MaxPool"]',
        '"Gemm", "MaxPool"]',
        (T + "test_int8_blocks.py::test_cli_trains_and_exports_a_plain_conv_relu_graph",),
    ),
    Mutation(
        "ws-fold-at-export",
        "export traces the folded model (constant weights, no standardisation ops)",
        "export/onnx_export.py",
        "trace_to_onnx(fold_for_export(model), example",
        "trace_to_onnx(model, example",
        (T + "test_int8_blocks.py::test_cli_trains_and_exports_a_plain_conv_relu_graph",),
    ),
)


def _restore_leftovers() -> None:
    """Put back originals a killed run left in RESTORE."""
    if not RESTORE.is_dir():
        return
    for saved in RESTORE.rglob("*"):
        if saved.is_file() and saved.suffix != ".mtime":
            rel = saved.relative_to(RESTORE)
            target = ROOT / rel
            target.write_bytes(saved.read_bytes())
            mtime = saved.with_name(saved.name + ".mtime")
            if mtime.exists():
                ns = int(mtime.read_text())
                os.utime(target, ns=(ns, ns))
                mtime.unlink()
            saved.unlink()
            print(f"restored {rel} from an interrupted run", file=sys.stderr)


class Applied:
    """The mutant in the working tree for the duration of a ``with`` block."""

    def __init__(self, m: Mutation):
        self.m, self.path = m, ROOT / m.file
        self.saved = RESTORE / m.file

    def __enter__(self):
        original = self.path.read_bytes()
        text = original.decode()
        count = text.count(self.m.pattern)
        if count != self.m.count:
            raise LookupError(f"{self.m.id}: pattern found {count} times in {self.m.file}")
        self.original, self.mtime = original, self.path.stat().st_mtime_ns
        self.saved.parent.mkdir(parents=True, exist_ok=True)
        self.saved.write_bytes(original)
        self.saved.with_name(self.saved.name + ".mtime").write_text(str(self.mtime))
        self.path.write_bytes(text.replace(self.m.pattern, self.m.replacement).encode())
        later = max(time.time_ns(), self.mtime + 2_000_000_000)
        os.utime(self.path, ns=(later, later))  # never the original's mtime: no stale .pyc
        return self

    def __exit__(self, *exc):
        self.path.write_bytes(self.original)
        os.utime(self.path, ns=(self.mtime, self.mtime))
        self.saved.unlink(missing_ok=True)
        self.saved.with_name(self.saved.name + ".mtime").unlink(missing_ok=True)
        return False


def _pytest(tests, timeout: float) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - t0, "timeout"
    tail = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode, time.monotonic() - t0, tail[-1] if tail else ""


def _verdict(rc: int) -> str:
    return {0: "SURVIVED", 1: "caught", -1: "timeout"}.get(rc, f"error (pytest exit {rc})")


def _short(test: str) -> str:
    return test.removeprefix(T)


def _table(rows) -> str:
    out = [
        "| mutation | protection | file | tests that must catch it | result | s |",
        "| --- | --- | --- | --- | --- | ---: |",
    ]
    for m, verdict, secs in rows:
        tests = "<br>".join(f"`{_short(t)}`" for t in m.tests)
        where = f"`{m.file}`" + (f" (x{m.count})" if m.count > 1 else "")
        out.append(f"| `{m.id}` | {m.guards} | {where} | {tests} | {verdict} | {secs:.0f} |")
    return "\n".join(out)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def _write_docs(rows, caught: int, wall: float, command: str) -> None:
    section = "\n".join(
        [
            START,
            "## Mutation check: do the tests notice a broken protection?",
            "",
            f"Generated by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"{_machine()}; {wall / 60:.1f} min in all). Each row breaks one protection or formula "
            "in the working tree (an exact pattern and its replacement, listed in "
            "`scripts/mutation_check.py`), runs only the tests named for it, and restores the "
            "file. *caught*: those tests failed; *SURVIVED*: they passed. The named tests first "
            "passed together on the unmutated tree.",
            "",
            _table(rows),
            "",
            f"**{caught} of {len(rows)} mutations caught.**",
            END,
        ]
    )
    text = DOCS.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text)


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # SIGINT/SIGTERM: the mutant was already restored on the way out
        print("error: interrupted; the working tree is restored", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated mutation ids")
    p.add_argument("--list", action="store_true", help="print the table and exit")
    p.add_argument("--docs", action="store_true", help="write the result into docs/reliability.md")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutation")
    args = p.parse_args(argv)
    rows = MUTATIONS
    if args.only:
        want = set(args.only.split(","))
        unknown = want - {m.id for m in MUTATIONS}
        if unknown:
            print(f"error: unknown mutation id(s) {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        rows = tuple(m for m in MUTATIONS if m.id in want)
    if args.list:
        print(_table([(m, "", 0.0) for m in rows]))
        return 0

    def stop(signum, frame):
        raise KeyboardInterrupt  # unwinds through Applied.__exit__: the file is restored

    signal.signal(signal.SIGTERM, stop)
    _restore_leftovers()
    for m in rows:  # every pattern present as often as stated, before anything runs
        n = (ROOT / m.file).read_text().count(m.pattern)
        if n != m.count:
            print(f"error: {m.id}: pattern found {n} times in {m.file}", file=sys.stderr)
            return 2
    t_start = time.monotonic()
    if not args.no_baseline:
        tests = sorted({t for m in rows for t in m.tests})
        rc, secs, tail = _pytest(tests, args.timeout * 3)
        print(f"baseline ({len(tests)} tests, unmutated): exit {rc} in {secs:.0f} s  {tail}")
        if rc != 0:
            print("error: the named tests fail on the unmutated tree", file=sys.stderr)
            return 2
    results = []
    for m in rows:
        with Applied(m):
            rc, secs, tail = _pytest(m.tests, args.timeout)
        verdict = _verdict(rc)
        results.append((m, verdict, secs))
        print(f"{m.id:28s} {verdict:10s} {secs:6.1f} s  {tail}", flush=True)
    wall = time.monotonic() - t_start
    caught = sum(v == "caught" for _, v, _ in results)
    print(f"\n{caught} of {len(results)} mutations caught in {wall / 60:.1f} min")
    if args.docs:
        command = "OMP_NUM_THREADS=1 .venv/bin/python scripts/mutation_check.py --docs"
        if args.only:
            command += f" --only {args.only}"
        _write_docs(results, caught, wall, command)
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
