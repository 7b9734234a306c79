"""
ToyZoo: a procedurally generated world of paired clips for the report's 11 animal classes.
It is the offline default of prepare_data.py (--source=toyzoo): no downloads, deterministic from a seed.

Each clip is 10 s of 24 kHz mono audio plus 10 keyframes (t = 0.5, 1.5, ..., 9.5 s), each with its RGB
image, depth map and camera-space surface normals, written in the raw layout of rawdata.py:

    audio   the class's own call, repeated throughout the clip: a source-filter synthesiser (harmonics of a
            pitch contour + shaped noise, through formant bumps), with per-clip pitch, tempo and loudness,
            over the ambient noise of the clip's habitat. Birds (chicken/duck/pigeon) and canids + big cat
            (dog/coyote/lion) share features on purpose, so that confusions between them mean something.
    images  an animal built from ellipsoids (body, head, legs, ears, tail, beak...) in class-typical
            proportions and colours, standing on the ground of its habitat under that habitat's sky, seen by a
            pinhole camera. Every pixel is found by analytic ray casting (numpy, one image at a time, all rays
            at once), so the RGB shading, the depth and the normals all come from the very same hit points.

`difficulty` in [0, 1] raises the background noise, the per-clip jitter of every parameter, how far a clip's
voice and colours are pulled toward a confusable class, and the number of distractor props in the scene.

Conventions of the written maps (see rawdata.py for the files):
    depth   uint16 millimetres along the camera axis (z-depth), larger = farther; the sky is 65535
    normal  camera space, x right, y up, z toward the viewer (OpenGL); uint8 (n + 1) / 2 * 255;
            the sky is written as (0, 0, 1), i.e. facing the camera

Determinism: every clip draws from its own generator seeded by (seed, class, index), so the bytes do not
depend on the number of workers, on the class subset, or on resumption.

    python prepare_data.py --source=toyzoo --clips_per_class=100 --difficulty=0.25 --workers=2   # writes it
"""
import json
import os
import shutil
import time
import zlib

import numpy as np

import rawdata
from streams import caption_text

CLASSES = tuple(sorted(["pig", "sheep", "dog", "cat", "horse", "cow", "chicken", "duck", "pigeon",
                        "coyote", "lion"]))
SR = rawdata.RAW_SR
DURATION_S = 10.0
N_SAMPLES = int(SR * DURATION_S)
KEYFRAME_TIMES = [0.5 + i for i in range(rawdata.RAW_VIEWS)]
SIZE = rawdata.FRAME_SIZE
SKY_DEPTH = 65535       # depth value written for rays that hit nothing
MAX_GAP_S = 1.5         # the longest silence between two calls: every 3.41 s view window hears a call
CLUSTERS = (("chicken", "duck", "pigeon"), ("coyote", "dog", "lion"), ("cow", "horse", "pig", "sheep"))


def _cluster(cls):
    return next((c for c in CLUSTERS if cls in c), (cls,))


# ===================================================================================================
# audio: call types
#
# A call type is a recipe for one vocalisation. Keys:
#   f0          base pitch (Hz)                 dur       (lo, hi) call length (s)
#   contour     pitch offsets in semitones at evenly spaced points over the call
#   vib         (rate Hz, depth semitones) pitch vibrato
#   trem        (rate Hz, depth 0..1, sharpness) amplitude modulation; sharpness > 1 makes pulses (grunts)
#   harm        number of harmonics             tilt      spectral slope of the harmonics (dB / octave)
#   odd         0..1 damping of even harmonics (1 = square-ish, buzzy)
#   noise       0..1 share of shaped noise in the source
#   formants    [(centre Hz, bandwidth Hz, gain)] resonances applied to harmonics and noise alike
#   attack      s                               decay     1/s exponential decay (0 = sustained)
#   release     s (fade at the end)             gain      relative loudness
#   burst       (lo, hi) calls in a row         burst_gap s between calls of a burst
#   gap         mean s between bursts

def _ct(**kw):
    base = dict(vib=(0.0, 0.0), trem=(0.0, 0.0, 1.0), odd=0.0, decay=0.0, release=0.05, gain=1.0,
                burst=(1, 1), burst_gap=0.15, gap=0.8)
    base.update(kw)
    return base


CALLS = {
    # canids + big cat: noisy, mid formants around 0.9-1.1 kHz; coyote yips sound like small barks
    "dog": [(0.85, _ct(f0=450, dur=(0.10, 0.22), contour=[0, 3, -4], harm=12, tilt=-4, noise=0.45,
                       formants=[(900, 400, 1.0), (2200, 600, 0.6)], attack=0.004, decay=14, burst=(1, 3),
                       burst_gap=0.16, gap=0.7)),
            (0.15, _ct(f0=800, dur=(0.5, 0.9), contour=[0, 4, 2, -2], harm=4, tilt=-10, noise=0.05,
                       formants=[(1000, 500, 1.0)], attack=0.05, release=0.2, gap=0.9))],
    "coyote": [(0.7, _ct(f0=650, dur=(1.2, 2.2), contour=[-5, 3, 5, 4, -3], vib=(5, 0.3), harm=5, tilt=-9,
                         noise=0.08, formants=[(1100, 600, 1.0)], attack=0.15, release=0.3, gap=0.8)),
               (0.3, _ct(f0=900, dur=(0.08, 0.15), contour=[0, 4, -2], harm=6, tilt=-6, noise=0.3,
                         formants=[(1000, 500, 1.0), (2300, 600, 0.5)], attack=0.004, decay=12,
                         burst=(2, 5), burst_gap=0.12, gap=0.7))],
    "lion": [(0.6, _ct(f0=140, dur=(1.0, 2.0), contour=[-3, 4, 2, -6], trem=(18, 0.4, 2.0), harm=25, tilt=-5,
                       noise=0.55, formants=[(400, 250, 1.0), (900, 400, 0.7)], attack=0.1, release=0.5,
                       gain=1.3, gap=0.9)),
             (0.4, _ct(f0=110, dur=(0.25, 0.5), contour=[2, -2], harm=20, tilt=-5, noise=0.6,
                       formants=[(450, 250, 1.0), (950, 400, 0.6)], attack=0.01, decay=5, gain=1.2,
                       burst=(2, 4), burst_gap=0.25, gap=0.9))],
    # hoofed farm animals: low moo, pulsed grunts, vibrato bleat, descending whinny
    "cow": [(1.0, _ct(f0=125, dur=(1.4, 2.4), contour=[-2, 0, 1.5, 2, 0.5], harm=20, tilt=-5, noise=0.05,
                      formants=[(300, 200, 1.0), (700, 300, 0.8)], attack=0.2, release=0.4, gap=1.0))],
    "pig": [(1.0, _ct(f0=95, dur=(0.15, 0.35), contour=[1, -1], trem=(28, 0.8, 3.0), harm=18, tilt=-6,
                      noise=0.45, formants=[(350, 250, 1.0), (1000, 400, 0.4)], attack=0.01, decay=6,
                      burst=(2, 4), burst_gap=0.15, gap=0.7))],
    "sheep": [(1.0, _ct(f0=330, dur=(0.6, 1.0), contour=[0, 1, 0.5, -1], vib=(7.5, 0.8), trem=(7.5, 0.5, 1.0),
                        harm=14, tilt=-5, noise=0.12, formants=[(700, 300, 1.0), (1800, 500, 0.6)],
                        attack=0.04, release=0.15, burst=(1, 2), burst_gap=0.3, gap=0.9))],
    "horse": [(0.75, _ct(f0=850, dur=(0.9, 1.5), contour=[2, 0, -3, -6, -9, -12], vib=(11, 1.5),
                         trem=(11, 0.5, 1.0), harm=10, tilt=-6, noise=0.15,
                         formants=[(1200, 500, 1.0), (2500, 700, 0.4)], attack=0.05, release=0.3, gap=1.1)),
              (0.25, _ct(f0=200, dur=(0.2, 0.35), contour=[0, -2], harm=6, tilt=-8, noise=0.9,
                         formants=[(600, 500, 1.0), (1800, 800, 0.5)], attack=0.01, decay=8, gap=0.9))],
    "cat": [(1.0, _ct(f0=550, dur=(0.5, 0.9), contour=[-3, 3, 4, 0, -5], harm=10, tilt=-6, noise=0.06,
                      formants=[(900, 400, 1.0), (2400, 600, 0.5)], attack=0.06, release=0.2, burst=(1, 2),
                      burst_gap=0.35, gap=1.0))],
    # birds: short, high formants; chicken clucks sit between duck quacks and pigeon coos
    "chicken": [(0.8, _ct(f0=330, dur=(0.06, 0.12), contour=[2, -2], harm=10, tilt=-5, noise=0.35,
                          formants=[(1000, 400, 1.0), (2500, 700, 0.5)], attack=0.005, decay=20,
                          burst=(3, 6), burst_gap=0.14, gap=0.6)),
                (0.2, _ct(f0=600, dur=(1.2, 1.8), contour=[0, 4, 5, 5, 3, -4], harm=12, tilt=-5, noise=0.2,
                          formants=[(1100, 500, 1.0), (2600, 700, 0.6)], attack=0.04, release=0.3, gap=0.8))],
    "duck": [(1.0, _ct(f0=280, dur=(0.15, 0.3), contour=[1, 0, -2], harm=30, tilt=-3, odd=0.85, noise=0.15,
                       formants=[(1400, 500, 1.0), (2600, 700, 0.7)], attack=0.01, decay=6, burst=(2, 5),
                       burst_gap=0.12, gap=0.6))],
    "pigeon": [(1.0, _ct(f0=240, dur=(0.35, 0.7), contour=[-1, 1, 0, -2], harm=3, tilt=-14, noise=0.03,
                         formants=[(400, 300, 1.0), (1200, 500, 0.3)], attack=0.08, release=0.15, gain=0.7,
                         burst=(2, 3), burst_gap=0.15, gap=0.8))],
}
_SCALARS = ("f0", "harm", "tilt", "odd", "noise", "attack", "decay", "release", "gain", "burst_gap", "gap")


def _resample(knots, n=6):
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(knots)), knots)


def _blend_call(a, b, w):
    """Pull call type a toward call type b by w in [0, 1] (log scale for pitch)."""
    out = dict(a)
    for k in _SCALARS:
        out[k] = (1 - w) * a[k] + w * b[k]
    out["f0"] = float(np.exp((1 - w) * np.log(a["f0"]) + w * np.log(b["f0"])))
    out["dur"] = tuple((1 - w) * np.array(a["dur"]) + w * np.array(b["dur"]))
    out["contour"] = list((1 - w) * _resample(a["contour"]) + w * _resample(b["contour"]))
    out["vib"] = tuple((1 - w) * np.array(a["vib"]) + w * np.array(b["vib"]))
    out["trem"] = tuple((1 - w) * np.array(a["trem"]) + w * np.array(b["trem"]))
    out["formants"] = [((1 - w) * fa + w * fb, (1 - w) * ba + w * bb, ga)
                       for (fa, ba, ga), (fb, bb, _) in zip(a["formants"], b["formants"] * 2)]
    return out


def _confuser(rng, cls):
    """A class whose parameters this clip leans toward: mostly from the same cluster."""
    near = [c for c in _cluster(cls) if c != cls]
    if near and rng.random() < 0.75:
        return near[rng.integers(len(near))]
    others = [c for c in CLASSES if c != cls]
    return others[rng.integers(len(others))]


# bump when the same seed would draw a different world (2: build and confuser shared; 3: the camera frames the
# class's typical size, not the clip's, so that a bigger animal does look bigger; 4: a habitat sets both the
# ground and sky of the picture and the ambient noise of the sound)
WORLD_VERSION = 4


def draw_voice(rng, cls, difficulty, build=0.0, conf=None):
    """This clip's individual voice: each call type of the class, jittered and pulled toward a confuser.
    `build` is the animal's size as a z-score, shared with its picture: a bigger animal calls lower."""
    d = difficulty
    conf = _confuser(rng, cls) if conf is None else conf
    w = d * rng.uniform(0.0, 0.6)
    voice = []
    for (p, ct) in CALLS[cls]:
        _, other = CALLS[conf][rng.integers(len(CALLS[conf]))]
        v = _blend_call(ct, other, w)
        v["f0"] = float(v["f0"] * 2 ** ((rng.normal(0, 1.0 + 3.0 * d) - 3.0 * build) / 12))
        v["dur"] = tuple(float(x) * float(np.exp(rng.normal(0, 0.1 + 0.2 * d))) for x in v["dur"])
        v["dur"] = (min(v["dur"]), max(v["dur"]))
        v["gap"] = float(v["gap"] * np.exp(rng.normal(0, 0.2)))
        v["tilt"] = float(v["tilt"] + rng.normal(0, 1.0 + 2.0 * d))
        v["noise"] = float(np.clip(v["noise"] + rng.normal(0, 0.05 + 0.1 * d), 0, 1))
        v["formants"] = [(float(f * np.exp(rng.normal(0, 0.05 + 0.1 * d))), float(b), float(g))
                         for f, b, g in v["formants"]]
        voice.append((p, v))
    return voice, conf, w


def draw_schedule(rng, voice):
    """(start_s, duration_s, call type index, pitch shift semitones, amplitude) of every call: calls
    appear throughout the 10 s, never more than MAX_GAP_S apart."""
    probs = np.array([p for p, _ in voice])
    probs = probs / probs.sum()
    calls = []
    t = rng.uniform(0.0, 0.8)
    while t < DURATION_S - 0.15:
        k = int(rng.choice(len(voice), p=probs))
        v = voice[k][1]
        lo, hi = v["burst"]
        for _ in range(int(rng.integers(lo, hi + 1))):
            dur = rng.uniform(*v["dur"])
            calls.append((float(t), float(dur), k, float(rng.normal(0, 0.7)), float(rng.uniform(0.6, 1.0))))
            t += dur + v["burst_gap"] * rng.uniform(0.7, 1.3)
            if t >= DURATION_S - 0.15:
                break
        t += min(MAX_GAP_S, v["gap"] * rng.uniform(0.5, 1.5))
    return calls


def _spectral_env(f, formants):
    env = np.full_like(f, 0.08)
    for fc, bw, g in formants:
        env = env + g * np.exp(-0.5 * ((f - fc) / bw) ** 2)
    return env


def synth_call(rng, v, dur, shift, amp):
    """One vocalisation: harmonics of the pitch contour + shaped noise, through the formants, enveloped."""
    n = max(int(dur * SR), 32)
    t = np.arange(n) / SR
    u = t / dur
    semis = np.interp(u, np.linspace(0, 1, len(v["contour"])), v["contour"]) + shift
    vib_rate, vib_depth = v["vib"]
    semis = semis + vib_depth * np.sin(2 * np.pi * vib_rate * t + rng.uniform(0, 2 * np.pi))
    f0 = v["f0"] * 2 ** (semis / 12)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    nh = max(int(round(v["harm"])), 1)
    h = np.arange(1, nh + 1)[:, None]
    fh = h * f0[None, :]
    amps = h.astype(np.float64) ** (v["tilt"] / 6.02) * _spectral_env(fh, v["formants"])
    amps = amps * np.where(h % 2 == 0, 1.0 - v["odd"], 1.0) * (fh < 0.45 * SR)
    harmonic = (amps * np.sin(h * phase[None, :])).sum(0)
    # noise shaped by the same formants (a gentle downward slope keeps it from hissing)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec *= _spectral_env(f, v["formants"]) * (1 + f / 2000.0) ** -0.5
    noise = np.fft.irfft(spec, n)
    src = ((1 - v["noise"]) * harmonic / (harmonic.std() + 1e-9)
           + v["noise"] * noise / (noise.std() + 1e-9))
    env = np.minimum(1.0, t / max(v["attack"], 1e-3)) * np.clip((dur - t) / max(v["release"], 1e-3), 0, 1)
    if v["decay"] > 0:
        env = env * np.exp(-v["decay"] * t)
    trem_rate, trem_depth, sharp = v["trem"]
    if trem_depth > 0:
        wave = (0.5 + 0.5 * np.sin(2 * np.pi * trem_rate * t)) ** max(sharp, 0.1)
        env = env * (1 - trem_depth + trem_depth * wave)
    return src * env * amp * v["gain"]


def colored_noise(rng, n, alpha, band_hz=0.0):
    """Noise with power spectrum ~ 1/f^alpha (0 white, 1 pink, 2 brown), unit std; band_hz > 0 adds a
    half-octave bump of +6 dB there (a habitat's insects, rumble or rustle)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    f[0] = f[1]
    spec *= f ** (-alpha / 2)
    if band_hz > 0:
        spec *= np.sqrt(1 + 3 * np.exp(-0.5 * (np.log2(f / band_hz) / 0.5) ** 2))
    x = np.fft.irfft(spec, n)
    return x / (x.std() + 1e-9)


def render_audio(params, rng):
    """The whole 10 s clip: calls placed by the schedule, background noise at the drawn SNR, peak-normalised."""
    voice = params["voice"]
    out = np.zeros(N_SAMPLES)
    for start, dur, k, shift, amp in params["schedule"]:
        x = synth_call(rng, voice[k][1], dur, shift, amp)
        i = int(start * SR)
        x = x[:N_SAMPLES - i]
        out[i:i + len(x)] += x
    a = params["audio_scene"]
    call_rms = np.sqrt(np.mean(out ** 2)) + 1e-9
    bg = colored_noise(rng, N_SAMPLES, a["noise_alpha"], a["band_hz"]) * call_rms * 10 ** (-a["snr_db"] / 20)
    out = out + bg
    return (out / (np.abs(out).max() + 1e-9) * a["peak"]).astype(np.float32)


# ===================================================================================================
# images: animals made of ellipsoids
#
# A part is one ellipsoid in the animal's own frame (x forward, y up, z to its left; body length ~1):
# centre c, radii r, a rotation (tilt about z, roll about x), a colour key into the class palette, and
# an animation kind (legs swing about the hip, the head nods about the neck, the tail wags).

def _part(c, r, col, tilt=0.0, roll=0.0, anim=None, pivot=None, spots=False):
    return dict(c=np.array(c, float), r=np.array(r, float), col=col, tilt=tilt, roll=roll, anim=anim,
                pivot=np.array(pivot if pivot is not None else c, float), spots=spots)


def quadruped(leg=0.4, leg_r=0.06, body=(0.5, 0.22, 0.2), head=(0.16, 0.13, 0.12), head_up=0.15,
              snout=(0.1, 0.06, 0.06), ears="pointy", ear=0.08, tail="up", tail_len=0.3, tail_r=0.04,
              neck=0.0, leg_col="body", head_col="body", snout_col="snout", body_spots=False, extras=()):
    bx, by, bz = body
    y0 = leg + by
    parts = [_part((0, y0, 0), body, "body", spots=body_spots)]
    hip_y = leg + by * 0.5
    for i, (sx, sz) in enumerate([(1, 1), (1, -1), (-1, 1), (-1, -1)]):
        hip = (sx * bx * 0.62, hip_y, sz * bz * 0.6)
        phase = 0 if (sx * sz > 0) else np.pi  # diagonal pairs move together
        parts.append(_part((hip[0], hip_y / 2, hip[2]), (leg_r, hip_y / 2, leg_r), leg_col,
                           anim=("leg", phase), pivot=hip))
    neck_base = np.array([bx * 0.75, y0 + by * 0.4, 0.0])
    hc = np.array([bx + head[0] * 0.4 + neck * 0.45, y0 + head_up + neck * 0.75, 0.0])
    hp = dict(anim=("head", 0.0), pivot=neck_base)
    if neck > 0:
        mid = (neck_base + hc) / 2
        ln = np.linalg.norm(hc - neck_base)
        ang = np.arctan2(hc[1] - neck_base[1], hc[0] - neck_base[0])
        parts.append(_part(mid, (ln * 0.6, head[1] * 0.8, head[2] * 0.8), "body", tilt=ang, **hp))
    parts.append(_part(hc, head, head_col, **hp))
    hx, hy, hz = head
    if snout is not None:
        parts.append(_part(hc + (hx + snout[0] * 0.45, -hy * 0.35, 0), snout, snout_col, tilt=-0.15, **hp))
    for s in (1, -1):
        if ears == "pointy":
            parts.append(_part(hc + (-hx * 0.25, hy * 0.95, s * hz * 0.55), (ear * 0.45, ear, ear * 0.2),
                               "ear", roll=-s * 0.25, **hp))
        elif ears == "floppy":
            parts.append(_part(hc + (-hx * 0.2, hy * 0.1, s * hz * 1.0), (ear * 0.5, ear, ear * 0.15),
                               "ear", tilt=0.3, **hp))
        else:  # sideways ears (pig, cow, sheep)
            parts.append(_part(hc + (-hx * 0.3, hy * 0.55, s * hz * 1.05), (ear * 0.45, ear * 0.2, ear),
                               "ear", roll=-s * 0.3, **hp))
    base = np.array([-bx * 0.95, y0 + by * 0.3, 0.0])
    ang = {"up": 2.3, "down": 4.0, "thin": 3.6, "curl": 2.6, "short": 3.3}[tail]
    d = np.array([np.cos(ang), np.sin(ang), 0.0])
    parts.append(_part(base + d * tail_len / 2, (tail_len / 2, tail_r, tail_r),
                       "tail", tilt=ang, anim=("tail", 0.0), pivot=base))
    tip = base + d * tail_len
    for name in extras:
        if name == "mane":        # lion: a big dark ruff around the head
            parts.append(_part(hc + (-hx * 0.5, -hy * 0.05, 0), (hx * 1.0, hy * 1.55, hz * 1.5), "mane", **hp))
        elif name == "tuft":      # lion tail tip
            parts.append(_part(tip, (tail_r * 2.2,) * 3, "mane", anim=("tail", 0.0), pivot=base))
        elif name == "horns":     # cow
            for s in (1, -1):
                parts.append(_part(hc + (-hx * 0.2, hy * 1.0, s * hz * 0.7), (0.025, 0.07, 0.025), "horn",
                                   roll=-s * 0.7, **hp))
        elif name == "udder":
            parts.append(_part((-bx * 0.45, leg + by * 0.1, 0), (0.09, 0.07, 0.08), "snout"))
        elif name == "hair":      # horse mane along the neck
            mid = (neck_base + hc) / 2 + (-0.04, 0.08, 0)
            ang = np.arctan2(hc[1] - neck_base[1], hc[0] - neck_base[0])
            parts.append(_part(mid, (np.linalg.norm(hc - neck_base) * 0.55, 0.04, 0.03), "mane", tilt=ang, **hp))
    return parts


def bird(leg=0.25, leg_col="leg", body=(0.45, 0.3, 0.28), body_tilt=0.25, head_r=0.17, neck=0.2,
         beak=(0.12, 0.04, 0.04), tail=(0.22, 0.06, 0.18), tail_tilt=0.7, extras=()):
    bx, by, bz = body
    y0 = leg + by * 0.9
    parts = [_part((0, y0, 0), body, "body", tilt=body_tilt)]
    for s in (1, -1):  # wings
        parts.append(_part((-0.05, y0 + by * 0.1, s * bz * 0.8), (bx * 0.8, by * 0.6, bz * 0.3), "wing",
                           tilt=body_tilt))
        hip = (0.0, leg + by * 0.2, s * bz * 0.35)
        parts.append(_part((0, hip[1] / 2, hip[2]), (0.03, hip[1] / 2, 0.03), leg_col,
                           anim=("leg", 0.0 if s > 0 else np.pi), pivot=hip))
    neck_base = np.array([bx * 0.6, y0 + by * 0.5, 0.0])
    hc = np.array([bx * 0.8, y0 + by * 0.6 + neck, 0.0])
    hp = dict(anim=("head", 0.0), pivot=neck_base)
    parts.append(_part((neck_base + hc) / 2, (head_r * 0.7, neck * 0.6 + 0.02, head_r * 0.7), "neck", **hp))
    parts.append(_part(hc, (head_r,) * 3, "head", **hp))
    parts.append(_part(hc + (head_r + beak[0] * 0.6, -head_r * 0.15, 0), beak, "beak", tilt=-0.1, **hp))
    parts.append(_part((-bx * 0.95, y0 + by * 0.35, 0), tail, "tail", tilt=tail_tilt))
    for name in extras:
        if name == "comb":        # chicken
            parts.append(_part(hc + (0.02, head_r * 1.05, 0), (head_r * 0.6, head_r * 0.35, 0.025), "comb", **hp))
            parts.append(_part(hc + (head_r * 0.6, -head_r * 0.9, 0), (0.04, 0.06, 0.02), "comb", **hp))
        elif name == "eyes":
            for s in (1, -1):
                parts.append(_part(hc + (head_r * 0.55, head_r * 0.25, s * head_r * 0.7), (0.025,) * 3, "eye", **hp))
    return parts


# class shapes: (parts, size in metres = world length of one model unit)
def animal_parts(cls):
    if cls == "pig":
        return quadruped(leg=0.22, leg_r=0.06, body=(0.52, 0.26, 0.24), head=(0.17, 0.16, 0.15), head_up=0.0,
                         snout=(0.07, 0.08, 0.08), ears="side", ear=0.09, tail="curl", tail_len=0.12,
                         tail_r=0.025), 1.1
    if cls == "sheep":
        return quadruped(leg=0.32, leg_r=0.045, body=(0.5, 0.3, 0.28), head=(0.15, 0.11, 0.09), head_up=0.12,
                         snout=(0.08, 0.06, 0.06), ears="side", ear=0.08, tail="short", tail_len=0.12,
                         tail_r=0.06, leg_col="face", head_col="face", snout_col="face"), 1.2
    if cls == "dog":
        return quadruped(leg=0.42, leg_r=0.055, body=(0.48, 0.19, 0.16), head=(0.15, 0.13, 0.11), head_up=0.2,
                         snout=(0.12, 0.06, 0.06), ears="floppy", ear=0.09, tail="up", tail_len=0.35,
                         tail_r=0.035, neck=0.12), 0.85
    if cls == "coyote":
        return quadruped(leg=0.45, leg_r=0.045, body=(0.5, 0.17, 0.14), head=(0.14, 0.11, 0.1), head_up=0.18,
                         snout=(0.15, 0.05, 0.05), ears="pointy", ear=0.11, tail="down", tail_len=0.45,
                         tail_r=0.07, neck=0.1), 0.95
    if cls == "lion":
        return quadruped(leg=0.4, leg_r=0.08, body=(0.55, 0.22, 0.19), head=(0.17, 0.15, 0.14), head_up=0.15,
                         snout=(0.09, 0.08, 0.08), ears="side", ear=0.05, tail="thin", tail_len=0.6,
                         tail_r=0.025, neck=0.08, extras=("mane", "tuft")), 1.9
    if cls == "cat":
        return quadruped(leg=0.3, leg_r=0.045, body=(0.45, 0.16, 0.14), head=(0.15, 0.14, 0.14), head_up=0.16,
                         snout=(0.05, 0.05, 0.06), ears="pointy", ear=0.09, tail="up", tail_len=0.6,
                         tail_r=0.03), 0.5
    if cls == "horse":
        return quadruped(leg=0.62, leg_r=0.05, body=(0.5, 0.2, 0.16), head=(0.2, 0.09, 0.08), head_up=0.1,
                         snout=(0.12, 0.07, 0.07), ears="pointy", ear=0.07, tail="down", tail_len=0.45,
                         tail_r=0.05, neck=0.35, extras=("hair",)), 2.1
    if cls == "cow":
        return quadruped(leg=0.42, leg_r=0.07, body=(0.55, 0.26, 0.23), head=(0.18, 0.13, 0.12), head_up=0.05,
                         snout=(0.08, 0.09, 0.09), ears="side", ear=0.09, tail="down", tail_len=0.5,
                         tail_r=0.025, body_spots=True, extras=("horns", "udder")), 2.3
    if cls == "chicken":
        return bird(leg=0.28, body=(0.4, 0.3, 0.26), body_tilt=0.3, head_r=0.14, neck=0.22,
                    beak=(0.08, 0.04, 0.04), tail=(0.18, 0.25, 0.1), tail_tilt=1.0, extras=("comb", "eyes")), 0.45
    if cls == "duck":
        return bird(leg=0.1, body=(0.5, 0.24, 0.26), body_tilt=0.05, head_r=0.15, neck=0.22,
                    beak=(0.14, 0.03, 0.08), tail=(0.15, 0.05, 0.12), tail_tilt=0.5, extras=("eyes",)), 0.45
    if cls == "pigeon":
        return bird(leg=0.15, body=(0.45, 0.24, 0.22), body_tilt=0.15, head_r=0.12, neck=0.12,
                    beak=(0.07, 0.025, 0.025), tail=(0.3, 0.04, 0.14), tail_tilt=0.15, extras=("eyes",)), 0.32
    raise ValueError(f"unknown ToyZoo class {cls!r}; valid: {', '.join(CLASSES)}")


# palettes: (probability, {colour key: rgb}); the first is the class-typical colouring
PALETTES = {
    "pig": [(0.85, dict(body=(0.93, 0.68, 0.68), snout=(0.95, 0.55, 0.6))),
            (0.15, dict(body=(0.6, 0.45, 0.4), snout=(0.8, 0.55, 0.55)))],
    "sheep": [(0.8, dict(body=(0.93, 0.92, 0.86), face=(0.15, 0.13, 0.12))),
              (0.2, dict(body=(0.8, 0.75, 0.63), face=(0.85, 0.8, 0.75)))],
    "dog": [(0.6, dict(body=(0.55, 0.36, 0.2), snout=(0.3, 0.2, 0.12), ear=(0.35, 0.22, 0.12))),
            (0.25, dict(body=(0.82, 0.66, 0.42), snout=(0.6, 0.45, 0.3), ear=(0.55, 0.38, 0.22))),
            (0.15, dict(body=(0.12, 0.1, 0.1), snout=(0.3, 0.25, 0.2), ear=(0.1, 0.08, 0.08)))],
    "coyote": [(1.0, dict(body=(0.66, 0.56, 0.43), snout=(0.8, 0.72, 0.6), ear=(0.5, 0.4, 0.3),
                          tail=(0.5, 0.45, 0.38)))],
    "lion": [(1.0, dict(body=(0.83, 0.63, 0.34), snout=(0.9, 0.78, 0.6), ear=(0.7, 0.5, 0.3),
                        mane=(0.45, 0.28, 0.12)))],
    "cat": [(0.6, dict(body=(0.52, 0.52, 0.55), snout=(0.75, 0.75, 0.75), ear=(0.45, 0.45, 0.48))),
            (0.25, dict(body=(0.88, 0.52, 0.2), snout=(0.95, 0.85, 0.7), ear=(0.8, 0.45, 0.2))),
            (0.15, dict(body=(0.1, 0.1, 0.12), snout=(0.2, 0.2, 0.2), ear=(0.08, 0.08, 0.1)))],
    "horse": [(0.5, dict(body=(0.5, 0.27, 0.13), snout=(0.35, 0.2, 0.1), mane=(0.2, 0.12, 0.08))),
              (0.3, dict(body=(0.3, 0.18, 0.1), snout=(0.2, 0.12, 0.08), mane=(0.05, 0.05, 0.05))),
              (0.2, dict(body=(0.75, 0.74, 0.72), snout=(0.5, 0.5, 0.5), mane=(0.9, 0.9, 0.9)))],
    "cow": [(0.75, dict(body=(0.95, 0.95, 0.93), spot=(0.08, 0.08, 0.08), snout=(0.9, 0.6, 0.62),
                        horn=(0.9, 0.88, 0.8))),
            (0.25, dict(body=(0.5, 0.3, 0.18), spot=(0.95, 0.95, 0.93), snout=(0.85, 0.6, 0.6),
                        horn=(0.9, 0.88, 0.8)))],
    "chicken": [(0.6, dict(body=(0.96, 0.94, 0.88), comb=(0.85, 0.08, 0.08), beak=(0.95, 0.75, 0.2),
                           leg=(0.95, 0.75, 0.2), tail=(0.9, 0.88, 0.8))),
                (0.4, dict(body=(0.62, 0.3, 0.14), comb=(0.85, 0.08, 0.08), beak=(0.95, 0.75, 0.2),
                           leg=(0.95, 0.75, 0.2), tail=(0.15, 0.15, 0.12)))],
    "duck": [(0.6, dict(body=(0.97, 0.97, 0.95), beak=(0.98, 0.55, 0.1), leg=(0.98, 0.55, 0.1))),
             (0.4, dict(body=(0.55, 0.45, 0.35), head=(0.08, 0.4, 0.18), neck=(0.95, 0.95, 0.9),
                        beak=(0.9, 0.8, 0.2), leg=(0.98, 0.55, 0.1), wing=(0.4, 0.38, 0.4)))],
    "pigeon": [(1.0, dict(body=(0.56, 0.59, 0.66), wing=(0.45, 0.47, 0.53), neck=(0.35, 0.5, 0.42),
                          head=(0.45, 0.48, 0.56), beak=(0.3, 0.3, 0.3), leg=(0.85, 0.45, 0.45),
                          tail=(0.3, 0.32, 0.36)))],
}
_FALLBACK = dict(ear="body", tail="body", snout="body", face="body", mane="body", horn="body", head="body",
                 neck="head", wing="body", beak="body", leg="body", comb="body", spot="body")


def _colour(pal, key):
    if key == "eye":
        return np.array(pal.get("eye", (0.04, 0.04, 0.04)), float)
    while key not in pal:
        key = _FALLBACK[key]
    return np.array(pal[key], float)


SKIES = [((0.25, 0.45, 0.85), (0.72, 0.82, 0.95)),   # (zenith, horizon): clear
         ((0.55, 0.58, 0.62), (0.8, 0.8, 0.82)),     # overcast
         ((0.3, 0.3, 0.6), (0.95, 0.65, 0.45)),      # dusk
         ((0.4, 0.6, 0.9), (0.9, 0.92, 0.95))]       # hazy
GROUNDS = [(0.3, 0.5, 0.2), (0.6, 0.55, 0.3), (0.45, 0.35, 0.25), (0.8, 0.72, 0.55), (0.88, 0.9, 0.93),
           (0.5, 0.5, 0.5), (0.25, 0.4, 0.18)]
# Where a clip was filmed, seen in the picture (ground colour, sky) and heard in the sound (the spectrum of the
# ambient noise between calls): the share of a clip's pairing that is not the animal. Real clips have it too
# (wind on a beach, insects at dusk, a road's rumble), and without it the picture and the voice share only the
# class and the build, too little for retrieval to find the very clip (docs/experiments.md, "where the fault
# is").
# (name, ground colour, sky index, ambient: noise slope alpha (0 white, 1 pink, 2 brown), band centre Hz or 0)
HABITATS = [("meadow", (0.3, 0.5, 0.2), 0, (1.0, 0)),
            ("dunes", (0.8, 0.72, 0.55), 3, (2.0, 0)),          # wind
            ("snow", (0.88, 0.9, 0.93), 1, (0.0, 0)),           # hiss
            ("mudflat", (0.45, 0.35, 0.25), 2, (0.6, 4500)),    # insects at dusk
            ("quarry", (0.5, 0.5, 0.5), 1, (1.6, 180)),         # a distant road's rumble
            ("heath", (0.6, 0.55, 0.3), 0, (0.3, 9000))]        # rustling leaves
PROPS = [(0.2, 0.4, 0.15), (0.5, 0.5, 0.48), (0.4, 0.3, 0.2), (0.3, 0.45, 0.2)]


def _rot_y(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _rot_x(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def draw_scene(rng, cls, difficulty, build=0.0, conf=None):
    """Everything the ten keyframes of a clip share: animal, colours, motion, camera, light, background.
    `build` (size z-score) and `conf` (the confusable class it leans toward) are shared with the voice."""
    d = difficulty
    parts, base = animal_parts(cls)
    size = base * float(np.exp(0.3 * build))     # this animal; the camera and the set are scaled to `base`
    # colours: the class palette (alternatives more often at high difficulty), jittered, and pulled toward
    # a confusable class's colour by up to 0.35 * difficulty
    pals = PALETTES[cls]
    probs = np.array([p for p, _ in pals])
    probs[1:] *= 1 + 2 * d
    pal = pals[int(rng.choice(len(pals), p=probs / probs.sum()))][1]
    conf = _confuser(rng, cls) if conf is None else conf
    conf_body = _colour(PALETTES[conf][0][1], "body")
    w = d * rng.uniform(0, 0.35)
    tint = np.exp(rng.normal(0, 0.05 + 0.12 * d, 3))
    cols = {}
    for p in parts:
        c = _colour(pal, p["col"])
        if p["col"] == "body":
            c = (1 - w) * c + w * conf_body
        cols[p["col"]] = np.clip(c * tint, 0, 1)
    spot_col = _colour(pal, "spot") if "spot" in pal else None
    fov = np.deg2rad(rng.uniform(38, 55))
    # camera on a circle around the animal, as far as the class's typical size asks: the share of the frame
    # an animal fills follows its build (a build 1 z larger looks 35% larger), which its voice shares
    dist = base * rng.uniform(1.45, 1.85) * 0.5 / np.tan(fov / 2) * (1 + 0.4 * d * rng.random())
    az = rng.uniform(0, 2 * np.pi)
    height = base * rng.uniform(0.25, 1.1) + 0.15
    cam = np.array([dist * np.cos(az), height, dist * np.sin(az)])
    target = np.array([rng.normal(0, 0.12), rng.uniform(0.3, 0.55), rng.normal(0, 0.12)]) * size
    sun_el, sun_az = np.deg2rad(rng.uniform(25, 70)), rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(sun_el) * np.cos(sun_az), np.sin(sun_el), np.cos(sun_el) * np.sin(sun_az)])
    sky = SKIES[rng.integers(len(SKIES))]
    sky = [np.clip(np.array(c) * np.exp(rng.normal(0, 0.06, 3)), 0, 1) for c in sky]
    ground = np.clip(np.array(GROUNDS[rng.integers(len(GROUNDS))]) * np.exp(rng.normal(0, 0.1, 3)), 0, 1)
    # distractor props (bushes, rocks) always behind the animal, so it is never occluded
    back = -cam / np.linalg.norm(cam)
    side = np.array([-back[2], 0, back[0]])
    props = []
    for _ in range(int(rng.integers(0, 2 + int(3 * d)))):
        r = base * rng.uniform(0.2, 0.7) * np.array([1, rng.uniform(0.5, 1.0), 1]) * rng.uniform(0.8, 1.2, 3)
        pos = back * base * rng.uniform(1.6, 6) + side * base * rng.uniform(-3, 3)
        pos[1] = r[1] * rng.uniform(0.2, 0.6)
        props.append((pos, r, np.clip(np.array(PROPS[rng.integers(len(PROPS))]) *
                                      np.exp(rng.normal(0, 0.1, 3)), 0, 1)))
    return dict(cls=cls, size=size, base=base, yaw=rng.uniform(0, 2 * np.pi), cols=cols, spot_col=spot_col,
                spot_freq=rng.uniform(7, 11, 3), spot_phase=rng.uniform(0, 2 * np.pi, 3),
                speed=size * rng.uniform(0, 0.04), gait_hz=rng.uniform(0.4, 1.0),
                gait_amp=rng.uniform(0.0, 0.35), nod_amp=rng.uniform(0.0, 0.15), wag_hz=rng.uniform(0.3, 1.5),
                phase=rng.uniform(0, 2 * np.pi), fov=fov, cam=cam, target=target, sun=sun,
                sun_col=np.array([1.0, 0.96, 0.9]) * rng.uniform(0.7, 1.0), ambient=rng.uniform(0.45, 0.65),
                sky=sky, ground=ground, ground_phase=rng.uniform(0, 2 * np.pi, 2),
                fog=rng.uniform(25, 60) * base, props=props)


def scene_ellipsoids(scene, t):
    """World-space ellipsoids at time t: centres [K,3], rotations [K,3,3] (world from local), radii [K,3],
    albedo [K,3], spot colour [K,3], has spots [K], is animal [K]."""
    parts, _ = animal_parts(scene["cls"])
    s = scene["size"]
    ryaw = _rot_y(scene["yaw"])
    pos = ryaw @ np.array([scene["speed"] * t, 0, 0])
    w = 2 * np.pi * scene["gait_hz"] * t + scene["phase"]
    C, R, Rad, A, S, HS, AN = [], [], [], [], [], [], []
    for p in parts:
        rot = _rot_z(p["tilt"]) @ _rot_x(p["roll"])
        c = p["c"]
        if p["anim"] is not None:
            kind, ph = p["anim"]
            if kind == "leg":
                m = _rot_z(scene["gait_amp"] * np.sin(w + ph))
            elif kind == "head":
                m = _rot_z(scene["nod_amp"] * np.sin(0.7 * w)) @ _rot_y(0.3 * scene["nod_amp"] * np.sin(0.3 * w))
            else:
                m = _rot_y(0.5 * np.sin(2 * np.pi * scene["wag_hz"] * t + scene["phase"]))
            c = p["pivot"] + m @ (c - p["pivot"])
            rot = m @ rot
        C.append(pos + ryaw @ (c * s))
        R.append(ryaw @ rot)
        Rad.append(p["r"] * s)
        A.append(scene["cols"][p["col"]])
        has = p["spots"] and scene["spot_col"] is not None
        S.append(scene["spot_col"] if has else np.zeros(3))
        HS.append(has)
        AN.append(True)
    for pos_p, r, col in scene["props"]:
        C.append(pos_p)
        R.append(np.eye(3))
        Rad.append(r)
        A.append(col)
        S.append(np.zeros(3))
        HS.append(False)
        AN.append(False)
    return (np.array(C), np.array(R), np.array(Rad), np.array(A), np.array(S), np.array(HS), np.array(AN))


def camera_basis(scene):
    """World-from-camera rotation (columns: right, up, backward), OpenGL convention."""
    f = scene["target"] - scene["cam"]
    f = f / np.linalg.norm(f)
    r = np.cross(f, [0.0, 1.0, 0.0])
    r = r / np.linalg.norm(r)
    u = np.cross(r, f)
    return np.stack([r, u, -f], axis=1)


def camera_rays(fov, size=SIZE):
    """Un-normalised camera-space ray directions [3, H*W] with z = -1, so a hit's ray parameter IS its depth."""
    tan = np.tan(fov / 2)
    x = ((np.arange(size) + 0.5) / size * 2 - 1) * tan
    y = (1 - (np.arange(size) + 0.5) / size * 2) * tan
    X, Y = np.meshgrid(x, y)
    return np.stack([X.ravel(), Y.ravel(), -np.ones(size * size)])


def _quadrics(C, R, Rad):
    """Each ellipsoid as a quadric: x is inside when (x - c)^T Q (x - c) <= 1, Q = R diag(1/r^2) R^T."""
    return np.einsum("kij,kj,klj->kil", R, 1.0 / Rad ** 2, R)


def _sym6(Q):
    return np.stack([Q[:, 0, 0], Q[:, 1, 1], Q[:, 2, 2], 2 * Q[:, 0, 1], 2 * Q[:, 0, 2], 2 * Q[:, 1, 2]], 1)


def _outer6(V):
    return np.stack([V[0] * V[0], V[1] * V[1], V[2] * V[2], V[0] * V[1], V[0] * V[2], V[1] * V[2]])


def _coeffs_from_point(O, D, C, Q):
    """a t^2 + b t + c = 0 for rays O + t D from one point O [3] along D [3, M]: small matrix products."""
    oc = O[None] - C                                        # [K, 3]
    a = _sym6(Q) @ _outer6(D)                               # [K, M]
    b = 2 * np.einsum("kij,kj->ki", Q, oc) @ D              # [K, M]
    c = np.einsum("ki,kij,kj->k", oc, Q, oc)[:, None] - 1   # [K, 1]
    return a, b, c


def _coeffs_along(P, L, C, Q):
    """The same for parallel rays from points P [3, M] along one direction L [3] (toward the sun)."""
    QL = Q @ L                                              # [K, 3]
    a = (QL @ L)[:, None]
    b = 2 * (QL @ P - (QL * C).sum(1)[:, None])
    QC = np.einsum("kij,kj->ki", Q, C)
    c = _sym6(Q) @ _outer6(P) - 2 * QC @ P + ((C * QC).sum(1) - 1)[:, None]
    return a, b, c


def _cast_camera(O, D, Rc, fov, size, C, Q, Rad):
    """Nearest hit (t = depth, ellipsoid index) of every camera ray; t = inf on a miss. Each ellipsoid is
    only tested on the pixels inside the projected box of its bounding sphere, so the cost follows the
    area the animal covers, not the number of parts times the image."""
    n = D.shape[1]
    t_best, k_best = np.full(n, np.inf), np.zeros(n, int)
    tan = np.tan(fov / 2)
    pc = (C - O) @ Rc                       # centres in camera space
    for k in range(len(C)):
        x, y, z = pc[k]
        zd, r = -z, Rad[k].max()
        if zd - r <= 1e-3:                  # the sphere reaches the camera plane: test every pixel
            idx = np.arange(n)
        else:
            us = [(x + sx * r) / (zd + sz * r) for sx in (-1, 1) for sz in (-1, 1)]
            vs = [(y + sy * r) / (zd + sz * r) for sy in (-1, 1) for sz in (-1, 1)]
            c0 = max(int(np.floor((min(us) / tan + 1) / 2 * size)) - 1, 0)
            c1 = min(int(np.ceil((max(us) / tan + 1) / 2 * size)) + 1, size)
            r0 = max(int(np.floor((1 - max(vs) / tan) / 2 * size)) - 1, 0)
            r1 = min(int(np.ceil((1 - min(vs) / tan) / 2 * size)) + 1, size)
            if c1 <= c0 or r1 <= r0:
                continue
            idx = (np.arange(r0, r1)[:, None] * size + np.arange(c0, c1)[None]).ravel()
        a, b, c = _coeffs_from_point(O, D[:, idx], C[k:k + 1], Q[k:k + 1])
        disc = b[0] * b[0] - 4 * a[0] * c[0]
        t = np.where(disc > 0, (-b[0] - np.sqrt(np.maximum(disc, 0))) / (2 * a[0]), np.inf)
        t = np.where(t > 1e-6, t, np.inf)
        better = t < t_best[idx]
        t_best[idx[better]] = t[better]
        k_best[idx[better]] = k
    return t_best, k_best


def _shadowed(P, L, C, Q, Rad, groups):
    """Whether each point P [3, M] sees an ellipsoid toward the sun L. Points are first culled in the
    plane across the sun direction: by the bounding sphere of each group, then of each ellipsoid."""
    e1 = np.cross(L, [0.0, 0.0, 1.0] if abs(L[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    E = np.stack([e1, np.cross(L, e1), L])  # (across, across, along) the sun
    pp = E @ P
    blocked = np.zeros(P.shape[1], bool)

    def near(cand, ctr, r):
        q = pp[:, cand]
        return cand[(np.abs(q[0] - ctr[0]) < r) & (np.abs(q[1] - ctr[1]) < r) & (q[2] < ctr[2] + r)]

    for sel in groups:
        ctr = C[sel].mean(0)
        rad = (np.linalg.norm(C[sel] - ctr, axis=1) + Rad[sel].max(1)).max()
        cand = near(np.arange(P.shape[1]), E @ ctr, rad)
        for k in sel:
            sub = near(cand, E @ C[k], Rad[k].max())
            sub = sub[~blocked[sub]]
            if len(sub) == 0:
                continue
            a, b, c = _coeffs_along(P[:, sub], L, C[k:k + 1], Q[k:k + 1])
            disc = b[0] * b[0] - 4 * a[0] * c[0]
            blocked[sub] |= (disc > 0) & (np.sqrt(np.maximum(disc, 0)) - b[0] > 1e-9)
    return blocked


# linear light -> 8-bit sRGB-ish (gamma 2.2) by table lookup, much cheaper than a power per pixel
_GAMMA_LUT = (np.linspace(0, 1, 4096) ** (1 / 2.2) * 255).round().astype(np.uint8)


def render_view(scene, t, size=SIZE):
    """One keyframe at time t -> rgb uint8 [H,W,3], depth float metres [H,W] (inf = sky),
    camera-space unit normals float [H,W,3], mask uint8 [H,W] (0 sky, 1 ground, 2 animal, 3 prop)."""
    C, R, Rad, A, S, HS, AN = scene_ellipsoids(scene, t)
    Rc = camera_basis(scene)
    O = scene["cam"]
    Dc = camera_rays(scene["fov"], size)
    D = Rc @ Dc
    n_pix = D.shape[1]
    Q = _quadrics(C, R, Rad)
    t_obj, k = _cast_camera(O, D, Rc, scene["fov"], size, C, Q, Rad)
    t_gnd = np.where(D[1] < -1e-9, -O[1] / np.minimum(D[1], -1e-9), np.inf)
    depth = np.minimum(t_obj, t_gnd)
    is_obj = t_obj < t_gnd
    is_gnd = ~is_obj & np.isfinite(t_gnd)
    mask = np.zeros(n_pix, np.uint8)
    mask[is_gnd] = 1
    mask[is_obj] = np.where(AN[k[is_obj]], 2, 3)

    # world normals and albedo of every hit
    nw = np.zeros((n_pix, 3))
    nw[is_gnd] = (0.0, 1.0, 0.0)
    alb = np.zeros((n_pix, 3))
    P = O[:, None] + D * np.where(np.isfinite(depth), depth, 0.0)[None]   # hit points [3, N] (sky: unused)
    gx, gz = P[0, is_gnd], P[2, is_gnd]
    ph = scene["ground_phase"]
    sz = scene["base"]      # the ground's pattern has the set's scale, not the animal's
    fade = np.exp(-depth[is_gnd] / (8 * sz))    # the pattern fades with distance instead of aliasing
    var = 1 + 0.12 * fade * np.sin(gx / sz * 0.9 + ph[0]) * np.sin(gz / sz * 0.7 + ph[1])
    alb[is_gnd] = scene["ground"][None] ** 2.2 * var[:, None]
    idx = np.nonzero(is_obj)[0]
    ki = k[idx]
    rel = P[:, idx].T - C[ki]                                # hit point relative to its ellipsoid
    nwo = np.einsum("mij,mj->mi", Q[ki], rel)                # gradient of the quadric = outward normal
    nw[idx] = nwo / np.linalg.norm(nwo, axis=1, keepdims=True)
    pl = np.einsum("mji,mj->mi", R[ki], rel) / Rad[ki]       # the same point in the unit-sphere frame
    a = A[ki] ** 2.2   # linear albedo
    spots = HS[ki]
    if spots.any():
        f, p = scene["spot_freq"], scene["spot_phase"]
        v = np.sin(f[0] * pl[:, 0] + p[0]) * np.sin(f[1] * pl[:, 1] + p[1]) * np.sin(f[2] * pl[:, 2] + p[2])
        a = np.where((spots & (v > 0.15))[:, None], S[ki] ** 2.2, a)
    alb[idx] = a

    # shadows: rays from every visible surface point toward the sun, against all ellipsoids
    hit = is_obj | is_gnd
    hidx = np.nonzero(hit)[0]
    L = scene["sun"]
    Ps = P[:, hidx] + nw[hidx].T * (1e-3 * sz)
    groups = [np.nonzero(AN)[0]] + [[j] for j in np.nonzero(~AN)[0]]
    blocked = _shadowed(Ps, L, C, Q, Rad, groups)
    lit = np.ones(n_pix)
    lit[hidx] = np.where(blocked, 0.0, 1.0)

    # shading in linear light (albedos are sRGB-ish, squared-ish by the 2.2 power): sky ambient (brighter
    # facing up) + sun (Lambert, shadowed), fog toward the horizon colour with distance
    zen, hor = np.asarray(scene["sky"][0]) ** 2.2, np.asarray(scene["sky"][1]) ** 2.2
    # mostly white ambient light, a little tinted by the sky, so that an animal keeps its colour
    amb = scene["ambient"] * (0.6 + 0.4 * nw[:, 1:2]) * (0.7 + 0.15 * zen + 0.15 * hor)
    sun = scene["sun_col"] * np.clip(nw @ L, 0, None)[:, None] * lit[:, None]
    col = alb * (amb + sun)
    fog = 1 - np.exp(-np.where(hit, depth, 0) / scene["fog"])
    col = col * (1 - fog[:, None]) + hor * fog[:, None]
    sky_px = ~hit
    elev = np.clip(D[1, sky_px] / np.linalg.norm(D[:, sky_px], axis=0), 0, 1) ** 0.6
    col[sky_px] = hor * (1 - elev[:, None]) + zen * elev[:, None]
    rgb = _GAMMA_LUT[(np.clip(col, 0, 1) * (len(_GAMMA_LUT) - 1)).astype(np.int64)]

    ncam = nw @ Rc            # = (Rc^T n) for every row
    ncam[~hit] = (0.0, 0.0, 1.0)
    return (rgb.reshape(size, size, 3), depth.reshape(size, size), ncam.reshape(size, size, 3),
            mask.reshape(size, size))


def encode_depth(depth):
    """float metres (inf = sky) -> uint16 millimetres, larger = farther, sky = 65535."""
    mm = np.clip(np.round(np.where(np.isfinite(depth), depth, 0) * 1000.0), 1, SKY_DEPTH - 1)  # surfaces
    return np.where(np.isfinite(depth), mm, SKY_DEPTH).astype(np.uint16)


def encode_normals(n):
    return np.clip(np.round((n + 1) / 2 * 255), 0, 255).astype(np.uint8)


def decode_normals(img):
    return img.astype(np.float64) / 255 * 2 - 1


# ===================================================================================================
# clips

def animal_masks(raw_dir, clip_ids, views):
    """Bool [N, SIZE, SIZE]: where the animal is in each (clip id, keyframe view) of the world in raw_dir,
    re-rendered from the clip's own seed (no file holds the masks). The known answer for a silhouette measure
    (metrics.outline_f1). Refuses another world version: its scenes would not be these."""
    path = os.path.join(raw_dir, "toyzoo.json")
    with open(path) as f:
        world = json.load(f)
    if world.get("world") != WORLD_VERSION:
        raise ValueError(f"{path}: a ToyZoo world of version {world.get('world')}, this code renders {WORLD_VERSION}")
    scenes, out = {}, []
    for cid, view in zip(clip_ids, views):
        if cid not in scenes:
            cls, index = cid.rsplit("_", 1)
            scenes[cid] = clip_params(world["seed"], cls, int(index), world["difficulty"])["scene"]
        out.append(render_view(scenes[cid], KEYFRAME_TIMES[int(view)])[3] == 2)
    return np.stack(out)


def clip_id(cls, index):
    return f"{cls}_{index:05d}"


def clip_files(cid):
    """Paths relative to raw/ of every file of a clip."""
    d = f"clips/{cid}"
    v = range(rawdata.RAW_VIEWS)
    return dict(audio=f"{d}/audio.wav", frames=[f"{d}/frame_{i:02d}.png" for i in v],
                depths=[f"{d}/depth_{i:02d}.png" for i in v], normals=[f"{d}/normal_{i:02d}.png" for i in v])


def _rngs(seed, cls, index):
    """Three generators per clip, from (seed, class, index): one for the drawn parameters (cheap to redraw on
    resumption, for the manifest), one for the sample-level noise of the audio, one for the habitat (added in
    world 4 as a stream of its own, so that every other draw stayed world 3's)."""
    key = [int(seed), zlib.crc32(cls.encode()), int(index)]
    return tuple(np.random.default_rng(key + [k]) for k in range(3))


def clip_params(seed, cls, index, difficulty):
    """Every drawn per-clip parameter (no rendering)."""
    rng, _, h_rng = _rngs(seed, cls, index)
    # what sound and picture of one clip share beyond the class (so that retrieval can find the very clip,
    # not only its class): the animal's build -- bigger looks bigger and calls lower -- and the confusable
    # class both its voice and its colouring lean toward
    build = float(rng.normal())
    voice, conf, w = draw_voice(rng, cls, difficulty, build)
    schedule = draw_schedule(rng, voice)
    d = difficulty
    snr_db = (1 - d) * rng.uniform(20, 35) + d * rng.uniform(-3, 8)
    audio_scene = dict(snr_db=float(snr_db), noise_alpha=float(rng.uniform(0, 2)), peak=float(rng.uniform(0.3, 0.9)))
    scene = draw_scene(rng, cls, difficulty, build, conf)
    # the habitat replaces the sky and ground draw_scene made (still drawn: they keep its stream world 3's)
    h = int(h_rng.integers(len(HABITATS)))
    _, ground, sky, (alpha, band) = HABITATS[h]
    scene["sky"] = [np.clip(np.array(c) * np.exp(h_rng.normal(0, 0.06, 3)), 0, 1) for c in SKIES[sky]]
    scene["ground"] = np.clip(np.array(ground) * np.exp(h_rng.normal(0, 0.1, 3)), 0, 1)
    audio_scene.update(noise_alpha=float(alpha + h_rng.normal(0, 0.15)),
                       band_hz=float(band * np.exp(h_rng.normal(0, 0.1))))
    return dict(cls=cls, voice=voice, confuser=conf, blend=w, schedule=schedule, audio_scene=audio_scene,
                scene=scene, habitat=HABITATS[h][0])


def _summary(p):
    """The few drawn parameters worth recording in the manifest row (origin)."""
    s = p["scene"]
    return dict(f0_hz=round(p["voice"][0][1]["f0"], 1), n_calls=len(p["schedule"]), snr_db=round(p["audio_scene"]["snr_db"], 2),
                confuser=p["confuser"], blend=round(p["blend"], 3), size_m=round(s["size"], 3),
                habitat=p["habitat"],
                fov_deg=round(float(np.rad2deg(s["fov"])), 3), n_props=len(s["props"]))


def render_clip(params, audio_rng):
    """All media of one clip: (audio float [T], list of (rgb, depth uint16, normals uint8)) for the 10 views."""
    audio = render_audio(params, audio_rng)
    views = []
    for t in KEYFRAME_TIMES:
        rgb, depth, n, _ = render_view(params["scene"], t)
        views.append((rgb, encode_depth(depth), encode_normals(n)))
    return audio, views


def clip_complete(raw_dir, cid):
    f = clip_files(cid)
    return all(os.path.exists(os.path.join(raw_dir, p)) for p in [f["audio"]] + f["frames"] + f["depths"] + f["normals"])


def make_clip(raw_dir, seed, cls, index, difficulty):
    """Generate one clip into clips/.<id>.tmp, then rename the directory: a clip is there whole or not at all.
    A clip already complete is left as is. Returns (clip id, summary of its parameters, generated?)."""
    cid = clip_id(cls, index)
    params = clip_params(seed, cls, index, difficulty)
    if clip_complete(raw_dir, cid):
        return cid, _summary(params), False
    final = os.path.join(raw_dir, "clips", cid)
    tmp = os.path.join(raw_dir, "clips", f".{cid}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)      # leftovers of an interrupted run
    os.makedirs(tmp)
    _, audio_rng, _ = _rngs(seed, cls, index)
    audio, views = render_clip(params, audio_rng)
    rawdata.write_wav(os.path.join(tmp, "audio.wav"), audio)
    for i, (rgb, depth, normals) in enumerate(views):
        rawdata.write_png(os.path.join(tmp, f"frame_{i:02d}.png"), rgb)
        rawdata.write_png(os.path.join(tmp, f"depth_{i:02d}.png"), depth)
        rawdata.write_png(os.path.join(tmp, f"normal_{i:02d}.png"), normals)
    shutil.rmtree(final, ignore_errors=True)    # an incomplete clip directory (a file deleted by hand)
    os.replace(tmp, final)
    return cid, _summary(params), True


def _make_clip_job(args):
    return make_clip(*args)


def build_toyzoo(raw_dir, clips_per_class=100, difficulty=0.25, seed=1337, workers=2, classes=None):
    """Write a ToyZoo dataset under raw_dir (clips/<clip_id>/... and manifest.jsonl) and return its rows.
    Resumable: complete clips are kept. Refuses to mix clips of another seed or difficulty in raw_dir."""
    classes = sorted(CLASSES if classes is None else classes)
    bad = [c for c in classes if c not in CLASSES]
    if bad or not classes:
        raise ValueError(f"unknown ToyZoo classes {bad}; valid: {', '.join(CLASSES)}")
    if int(clips_per_class) < 1:
        raise ValueError(f"clips_per_class must be >= 1, got {clips_per_class}")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise ValueError(f"difficulty must lie in [0, 1], got {difficulty}")
    difficulty = float(difficulty)
    os.makedirs(os.path.join(raw_dir, "clips"), exist_ok=True)
    # the world's settings travel with the clips, so that a resumed run never mixes two worlds
    cfg_path = os.path.join(raw_dir, "toyzoo.json")
    cfg = dict(seed=int(seed), difficulty=difficulty, world=WORLD_VERSION)
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        if old != cfg:
            raise ValueError(f"{cfg_path}: this directory holds ToyZoo clips made with {old}, not {cfg}; "
                             f"use another --dataset or delete {raw_dir}")
    else:
        rawdata.write_json(cfg_path, cfg)

    jobs = [(raw_dir, int(seed), c, i, difficulty) for c in classes for i in range(int(clips_per_class))]
    from tqdm import tqdm
    t0 = time.time()
    results = {}
    bar = tqdm(total=len(jobs), desc="toyzoo clips", unit="clip")
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            for cid, summ, made in pool.imap_unordered(_make_clip_job, jobs, chunksize=1):
                results[cid] = (summ, made)
                bar.update()
    else:
        for job in jobs:
            cid, summ, made = make_clip(*job)
            results[cid] = (summ, made)
            bar.update()
    bar.close()
    n_made = sum(made for _, made in results.values())
    dt = time.time() - t0
    if n_made:
        print(f"toyzoo: generated {n_made} clips ({len(jobs) - n_made} already there) in {dt:.1f} s, "
              f"{n_made / dt:.2f} clips/s with {workers} worker(s)")

    strata = [c for (_, _, c, _, _) in jobs]
    splits = rawdata.stratified_split(strata, seed=seed)
    rows = []
    for (_, _, cls, i, _), split in zip(jobs, splits):
        cid = clip_id(cls, i)
        files = clip_files(cid)
        rows.append(dict(clip_id=cid, **{"class": cls}, source="toyzoo", split=split, caption=caption_text(cls),
                         audio=files["audio"], frames=files["frames"], depths=files["depths"],
                         normals=files["normals"], keyframe_times=list(KEYFRAME_TIMES), duration_s=DURATION_S,
                         oracles={}, origin=dict(seed=int(seed), index=i, difficulty=difficulty,
                                                 **results[cid][0])))
    rawdata.write_manifest(os.path.join(raw_dir, "manifest.jsonl"), rows)
    return rows

