"""Which onnxruntime a model directory needs, and whether the installed one meets it.

Export records in the manifest's ``requires`` section the oldest onnxruntime release that runs the
graph, derived from the operator forms the graph actually uses:

    "requires": {
      "onnxruntime": "1.23",          the newest release among the forms below
      "floor": "1.19",                the oldest any --target could reach for this model: forms with
                                      no plainer fallback (attention features) set it
      "target": "latest",             the export profile the graph was written for
      "forms": {"GroupQueryAttention": "1.19", "GatherBlockQuantized.8bit": "1.23", ...}
    }

The runtime checks it before onnxruntime sees the graph, so a graph built for a newer release fails
with one line naming both versions and what to do, not with onnxruntime's "input size not in range".
Directories written before this section existed have none and are not checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Opset and IR version every profile writes: read by onnxruntime 1.14 and newer.
OPSET = 17
IR_VERSION = 8


@dataclass(frozen=True)
class Profile:
    """An export target: the oldest onnxruntime the graph must run on (None: the newest forms)."""

    name: str
    onnxruntime: str | None
    note: str


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("ort-1.19", "1.19", "plain Gather and float matrices where 8-bit blocks are missing"),
        Profile("ort-1.20", "1.20", "as ort-1.19, with attention softcaps (Gemma 2)"),
        Profile("ort-1.22", "1.22", "8-bit MatMulNBits (int8 compute); embeddings by plain Gather"),
        Profile("ort-1.23", "1.23", "8-bit GatherBlockQuantized; every quantized form"),
        Profile("ort-1.24", "1.24", "sliding-window attention (Gemma 2 and 3)"),
        Profile("jetson-jp6", "1.19", "JetPack 6: NVIDIA's onnxruntime-gpu wheels 1.19 to 1.23 (as ort-1.19)"),
        Profile("latest", None, "every form this lmrt writes"),
    )
}


class CompatError(ValueError):
    """The installed onnxruntime is older than the model directory needs."""


def version_key(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of "1.23.2", "1.24.0.dev20250101", "1.18.0+cu118", "1.20"."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def at_least(have: str, need: str) -> bool:
    return version_key(have) >= version_key(need)


def installed_onnxruntime() -> str:
    from .session import import_onnxruntime

    return import_onnxruntime().__version__


def profile_for(version: str) -> Profile:
    """The profile whose graphs run on onnxruntime ``version``: the newest one not newer than it
    ("latest" once it reaches the newest), or ValueError below the oldest."""
    dated = sorted((p for p in PROFILES.values() if p.onnxruntime and p.name.startswith("ort-")), key=lambda p: version_key(p.onnxruntime))
    if not at_least(version, dated[0].onnxruntime):
        raise ValueError(f"onnxruntime {version} is older than any export profile (the oldest is {dated[0].name})")
    if at_least(version, dated[-1].onnxruntime):
        return PROFILES["latest"]
    return [p for p in dated if at_least(version, p.onnxruntime)][-1]


def resolve_target(name: str | None) -> Profile:
    """The profile called ``name``; None: the one for the installed onnxruntime."""
    if name is None:
        return profile_for(installed_onnxruntime())
    if name not in PROFILES:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def allows(profile: Profile, since: str) -> bool:
    """Whether a form available since onnxruntime ``since`` may be written for ``profile``."""
    return profile.onnxruntime is None or at_least(profile.onnxruntime, since)


def requirement_record(forms: dict[str, str], floor_forms: dict[str, str], target: Profile) -> dict:
    """The manifest's ``requires`` section for a graph that uses ``forms`` (form -> release since),
    ``floor_forms`` being those with no fallback."""
    newest = max(forms.values(), key=version_key, default="1.14")
    floor = max(floor_forms.values(), key=version_key, default="1.14")
    return {
        "onnxruntime": newest,
        "floor": floor,
        "target": target.name,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "forms": dict(sorted(forms.items())),
    }


def required(manifest) -> str | None:
    """The oldest onnxruntime the directory runs on; None when its manifest records none."""
    need = manifest.requires.get("onnxruntime") if manifest.requires else None
    return need if isinstance(need, str) else None


def reasons(manifest) -> list[str]:
    """The forms that need the required release, e.g. ["GatherBlockQuantized.8bit"]."""
    need = required(manifest)
    forms = manifest.requires.get("forms") or {}
    return [f for f, v in forms.items() if need and isinstance(v, str) and version_key(v) == version_key(need)]


def advice(manifest, have: str) -> str:
    """What to do when onnxruntime ``have`` is too old for the directory."""
    floor = manifest.requires.get("floor") or "1.14"
    try:
        profile = profile_for(have)
    except ValueError:
        profile = None
    if profile is not None and at_least(have, floor):
        return f"re-export it with `--target {profile.name}` (lmrt export or lmrt quantize), or upgrade onnxruntime"
    return f"upgrade onnxruntime to {floor} or newer (no export target of this model runs on {have})"


def check_onnxruntime(manifest, model_dir: str, have: str | None = None) -> None:
    """Refuse, in one line, an installed onnxruntime older than the directory needs."""
    need = required(manifest)
    if need is None:
        return
    have = have or installed_onnxruntime()
    if at_least(have, need):
        return
    why = ", ".join(reasons(manifest)) or "its operators"
    raise CompatError(
        f"{model_dir} needs onnxruntime {need} or newer ({why}); this machine has {have}: {advice(manifest, have)}"
    )


def status_line(manifest, have: str | None) -> str:
    """``lmrt info``'s row: what the directory needs and whether this machine meets it."""
    need = required(manifest)
    if need is None:
        return "no onnxruntime recorded in lmrt.json (not checked on load)"
    target = manifest.requires.get("target", "?")
    text = f"{need} or newer (target {target}, floor {manifest.requires.get('floor', '?')})"
    if have is None:
        return f"{text}; onnxruntime is not installed here"
    if at_least(have, need):
        return f"{text}; installed {have}: ok"
    return f"{text}; installed {have}: TOO OLD, {advice(manifest, have)}"
