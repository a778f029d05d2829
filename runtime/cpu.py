"""What the CPU offers onnxruntime's kernels: the features it reports, and whether its uint8 x int8
products of full 8-bit codes are exact.

onnxruntime's uint8 x int8 matrix kernel on an x86 CPU with AVX2 but no VNNI multiplies byte pairs
with vpmaddubsw, which adds two products in 16 bits and saturates: 255 * 127 * 2 > 32767. With VNNI
(AVX-512 VNNI, or AVX-VNNI) it uses vpdpbusd, which adds four products straight into 32 bits, and on
Arm the dot-product instructions (and the widening multiplies without them) keep every product
exact. Codes within 7 bits (|code| <= 64: 255 * 64 * 2 = 32640) are exact on every kernel.
"""

from __future__ import annotations

import platform

# CPU features onnxruntime's kernels choose between (x86: AVX2 / AVX-512 / VNNI / AMX for int8 and
# MatMulNBits; Arm: dot product, int8 matrix multiply, SVE), as /proc/cpuinfo names them.
CPU_FEATURES = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8",
    "asimd", "asimddp", "asimdhp", "i8mm", "sve", "sve2", "bf16",
)  # fmt: skip
VNNI_FEATURES = ("avx512_vnni", "avx_vnni")  # either one: 8-bit codes are exact on x86
ARM_MACHINES = ("aarch64", "arm64")


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Those of ``CPU_FEATURES`` the CPU reports ("flags" on x86, "Features" on Arm), in that order."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found.update(value.split())
    return [f for f in CPU_FEATURES if f in found]


def exact_8bit_int8_products(features: list[str] | None = None, machine: str | None = None) -> bool:
    """True where onnxruntime's uint8 x int8 products of full 8-bit weight codes are exact: Arm, and
    x86 with VNNI. False elsewhere, an x86 CPU whose features cannot be read included."""
    machine = (platform.machine() if machine is None else machine).lower()
    if machine in ARM_MACHINES or machine.startswith("armv8"):
        return True
    features = cpu_features() if features is None else features
    return any(f in features for f in VNNI_FEATURES)


def int8_products_line() -> str:
    """One line for ``lmrt doctor``: which weight codes an int8 encoder runs here, and why."""
    if exact_8bit_int8_products():
        return "8-bit codes as stored (Arm, or x86 with VNNI: exact)"
    return "7-bit codes made in memory (no VNNI: 8-bit codes would saturate 16-bit pair sums)"
