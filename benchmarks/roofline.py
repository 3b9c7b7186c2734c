"""Napkin math beside every GPU timing: FLOPs, bytes moved, the roofline time at the device's
peak, and the fraction of it achieved (llm.c's habit).

The roofline time of a kernel is max(FLOPs / peak FLOP/s, bytes / peak bandwidth): the least
time the device could take if it did only the necessary work at full speed. achieved =
roofline / measured, so 1.0 is the device's limit and 0.5 is half of it.
"""
from __future__ import annotations

from train.flops import peak_tflops

# HBM bandwidth (TB/s) from the vendors' datasheets, by the substring of the device name; the
# first match wins, so more specific names come first.
PEAK_TBPS: tuple[tuple[str, float], ...] = (
    ("GH200", 4.0), ("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35),
    ("H800", 3.35), ("A100-SXM4-80GB", 2.04), ("A100 80GB PCIe", 1.94), ("A100", 1.56),
    ("L40S", 0.864), ("L40", 0.864), ("A10G", 0.6), ("A10", 0.6), ("L4", 0.3), ("B200", 8.0),
)


def peak_bandwidth(device_name: str) -> float | None:
    """Bytes per second, or None for a device not in the table."""
    for key, tbps in PEAK_TBPS:
        if key in device_name:
            return tbps * 1e12
    return None


def napkin(flops: float, bytes_moved: float, seconds: float, device_name: str,
           precision: str) -> dict:
    """The figures to print beside a timing; the roofline ones are None on an unknown device."""
    tflops = peak_tflops(device_name, precision)
    bandwidth = peak_bandwidth(device_name)
    out = {"flops": flops, "bytes": bytes_moved, "seconds": seconds,
           "achieved_tflops": flops / seconds / 1e12, "achieved_tbps": bytes_moved / seconds / 1e12,
           "roofline_seconds": None, "achieved_fraction": None, "bound": None}
    if tflops and bandwidth:
        compute, memory = flops / (tflops * 1e12), bytes_moved / bandwidth
        out["roofline_seconds"] = max(compute, memory)
        out["bound"] = "compute" if compute >= memory else "memory"
        out["achieved_fraction"] = out["roofline_seconds"] / seconds
    return out


def napkin_line(n: dict) -> str:
    """One line of markdown for a napkin() result."""
    line = (f"{n['flops'] / 1e12:.2f} TFLOP and {n['bytes'] / 2**30:.2f} GiB moved in "
            f"{n['seconds'] * 1e3:.2f} ms: {n['achieved_tflops']:.1f} TFLOP/s, "
            f"{n['achieved_tbps']:.2f} TB/s")
    if n["roofline_seconds"] is not None:
        line += (f"; roofline {n['roofline_seconds'] * 1e3:.2f} ms ({n['bound']}-bound), "
                 f"{n['achieved_fraction']:.0%} of it achieved")
    else:
        line += "; roofline: device not in the peak tables"
    return line
