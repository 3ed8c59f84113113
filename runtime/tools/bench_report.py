"""``ddpm-rt bench``'s table, from the result dictionary (also written as ``--json``)."""

from __future__ import annotations


def format_bench(r: dict) -> str:
    """One function a section, in the table's order; a section absent from ``r`` adds
    nothing."""
    return "\n".join(
        [
            *_header(r),
            *_unet_per_step(r),
            *_unet_cost_vs_compare(r),
            *_decode_per_image(r),
            *_end_to_end(r),
            *_end_to_end_distilled(r),
            *_end_to_end_vs_compare(r),
            *_sampler_overhead(r),
            *_cold_start(r),
            *_text_encoder(r),
        ]
    )


def _header(r: dict) -> list[str]:
    """The machine, its peak, the U-Net's FLOPs and the bundle's defaults."""
    lines = [
        f"machine: {r['cpu']} ({r['cores']} cores), onnxruntime {r['onnxruntime']}, "
        f"providers {','.join(r['providers'])}",
    ]
    peak, flops = r["peak_gflops"], r["unet_flops_per_image_step"]
    lines.append(
        "fp32 peak (ORT MatMul 1024^3): "
        + (f"{peak:.0f} GFLOP/s" if isinstance(peak, float) else f"skipped: {peak['skipped']}")
    )
    lines.append(
        "U-Net FLOPs per image-step: "
        + (
            f"{flops / 1e9:.3f} GFLOP"
            if isinstance(flops, float)
            else f"skipped: {flops['skipped']}"
        )
    )
    d = r["default"]
    lines.append(
        f"defaults: {d['sampler']} {d['steps']} steps, guidance {d['guidance']:g}, "
        f"U-Net {d['unet_precision']}"
        + (f", decoder {d['decoder_precision']}" if d.get("decoder_precision") else "")
    )
    return lines


def _unet_per_step(r: dict) -> list[str]:
    if "unet_per_step" not in r:
        return []
    lines = ["", "U-Net per step        batch   ms (median)   p90   images/s   of fp32 peak"]
    for name, rows in r["unet_per_step"].items():
        if isinstance(rows, str):
            lines.append(f"{name}: {rows}")
        elif isinstance(rows, dict):
            lines.append(f"{name:<20} skipped: {rows['skipped']}")
        else:
            for row in rows:
                frac = row.get("fraction_of_peak")
                lines.append(
                    f"{name:<20} {row['batch']:>5}  {row['ms_per_step']:>12.2f}  "
                    f"{row['p90_ms']:>5.2f}  {row['images_per_s_per_step']:>9.0f}  "
                    + (f"{100 * frac:>6.0f} %" if frac is not None else "")
                )
    return lines


def _unet_cost_vs_compare(r: dict) -> list[str]:
    if "unet_cost_vs_compare" not in r:
        return []
    cmp = dict(r["unet_cost_vs_compare"])
    where = cmp.pop("bundle")
    return [
        f"U-Net per-step cost vs {where}: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.2f}x" for k, v in cmp.items())
    ]


def _decode_per_image(r: dict) -> list[str]:
    if "decode_per_image" not in r:
        return []
    lines = ["", "decoder alone         batch   ms per call   ms per image"]
    for name, rows in r["decode_per_image"].items():
        for row in rows:
            lines.append(
                f"{name:<20} {row['batch']:>5}  {row['ms_per_call']:>12.2f}  "
                f"{row['ms_per_image']:>12.3f}"
            )
    return lines


def _end_to_end(r: dict) -> list[str]:
    if "end_to_end_1_image" not in r:
        return []
    decode = " (decode included)" if r["default"].get("decoder_precision") else ""
    lines = [
        "",
        f"one image, batch 1{decode}",
        " " * 29 + "seconds   images/s   vs torch course DDPM",
    ]
    for name, row in r["end_to_end_1_image"].items():
        if "skipped" in row:
            lines.append(f"{name:<28} skipped: {row['skipped']}")
            continue
        vs = row.get("vs_torch_course")
        lines.append(
            f"{name:<28} {row['seconds']:>7.3f}  {row['images_per_s']:>9.1f}  "
            + (f"{vs:>8.1f}x" if vs else "")
            + (
                f"  ({row['vs_text_to_image']:.2f} of text-to-image)"
                if "vs_text_to_image" in row
                else ""
            )
        )
    return lines


def _opt(value, spec: str) -> str:
    """``spec`` formatted with ``value``; nothing when there is none (a column left blank)."""
    return "" if value is None else spec.format(value)


def _setting(row: dict) -> str:
    """``ddim-4 eta 0 g2``: a row's sampler, steps, eta and guidance."""
    eta = f" eta {row['eta']:g}" if row.get("eta") is not None else ""
    return f"{row['sampler']}-{row['steps']}{eta} g{row['guidance']:g}"


def _end_to_end_distilled(r: dict) -> list[str]:
    """The distilled U-Nets beside the default (:mod:`~ddpm_rt.tools.bench_distilled`), then
    one line of ratios per distilled U-Net."""
    if "end_to_end_distilled" not in r:
        return []
    e = r["end_to_end_distilled"]
    lines = [
        "",
        f"distilled U-Net vs the default, end to end: {e['measures']}",
        "U-Net            setting           U-Net rows/image  batch    s/call  images/s"
        "  vs default",
    ]
    for name, row in e["rows"].items():
        if "skipped" in row:
            lines.append(f"{name:<16} skipped: {row['skipped']}")
            continue
        label = f"default {row['unet_precision']}" if name == "default" else name
        lines += [
            f"{label:<16} {_setting(row):<17} {row['unet_rows_per_image']:>16}  "
            f"{f['batch']:>5}  {f['seconds']:>8.4f}  {f['images_per_s']:>8.1f}"
            + _opt(f.get("vs_default"), "  {:>9.2f}x")
            for f in row["batches"]
        ]
    for name, ratios in e["vs_default"].items():
        lines.append(
            f"{name} vs default e2e: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.2f}x" for k, v in ratios.items())
        )
    return lines


def _end_to_end_vs_compare(r: dict) -> list[str]:
    if "end_to_end_vs_compare" not in r:
        return []
    e = r["end_to_end_vs_compare"]
    rec = {
        k: "{sampler}-{steps} guidance {guidance:g}".format(**e[k]["recommended"])
        for k in ("this", "other")
    }
    lines = [
        "",
        f"end to end per image, this {e['this']['kind']} bundle ({rec['this']}) vs "
        f"{e['bundle']}, {e['other']['kind']} ({rec['other']}); decode included",
        "setting               batch   this s/image   other s/image   this/other"
        + ("   latent/pixel" if "latent_over_pixel" in e["rows"][0] else ""),
    ]
    lines += [
        f"{row['setting']:<20} {row['batch']:>6}  {row['this_s_per_image']:>13.4f}  "
        f"{row['other_s_per_image']:>14.4f}  {row['ratio']:>10.2f}x"
        + _opt(row.get("latent_over_pixel"), "  {:>12.2f}x")
        for row in e["rows"]
    ]
    return lines


def _sampler_overhead(r: dict) -> list[str]:
    return [
        ("\n" if k == 0 else "")
        + f"sampler overhead ({o['setting']}, batch 1): step {o['step_ms']:.3f} ms, U-Net "
        f"{o['unet_ms']:.3f} ms -> {100 * o['overhead_fraction']:.1f} % of a step"
        for k, o in enumerate(r.get("sampler_overhead", []))
    ]


def _cold_start(r: dict) -> list[str]:
    if "cold_start" not in r:
        return []
    cs = r["cold_start"]
    ours = cs["ddpm_rt"]
    lines = [
        f'\ncold start `ddpm-rt --prompt "{r["prompt"]}"` (defaults): {ours["seconds"]:.2f} s, '
        f"peak RSS {ours['peak_rss_mb']:.0f} MB, torch imported: {ours['torch_imported']}"
        + (f", decoder {ours['decoder']} loaded and run" if ours.get("decoder") else "")
    ]
    ts = cs["torch_script"]
    if "skipped" in ts:
        lines.append(f"torch script: skipped: {ts['skipped']}")
    else:
        lines.append(
            f"torch script, same weights and settings: {ts['seconds']:.2f} s, peak RSS "
            f"{ts['peak_rss_mb']:.0f} MB -> ddpm-rt {cs['speedup']:.1f}x faster"
        )
    return lines


def _text_encoder(r: dict) -> list[str]:
    return [
        f"text encoder {k}: {v:.2f} ms per prompt (10 tokens, uncached)"
        for k, v in r.get("text_encoder_ms_per_prompt", {}).items()
    ]
