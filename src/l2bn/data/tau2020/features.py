"""Hu et al.'s DCASE 2020 features of one clip (MihawkHu/DCASE2020_task1,
``task1a/10class/extr_feat_2020_nodelta_scaled.py`` and ``utils.py:deltas``): the min–max-scaled log-mel
spectrogram, then Δ and ΔΔ stacked as three channels (:func:`logmel_features`)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["FeatureParams", "logmel_features", "scaled_logmel", "stack_deltas"]

_FEATURE_VERSION = 2  # bump when the feature computation changes, so old caches are not reused


@dataclass(frozen=True)
class FeatureParams:
    """Extraction parameters; the defaults are the reference pipeline's (44.1 kHz, 10 s → 3 × 128 × 423).

    Tests scale them down (a lower ``sample_rate``, shorter ``duration``, fewer ``n_mels``); the cache key is
    a hash of every field, so changing any of them re-extracts.
    """

    sample_rate: int = 44100
    duration: float = 10.0
    n_fft: int = 2048
    hop_length: int = 1024
    n_mels: int = 128
    log_offset: float = 1e-8
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.duration <= 0 or self.log_offset <= 0:
            raise ValueError(f"duration and log_offset must be > 0, got {self.duration}, {self.log_offset}")
        if self.frames < 1:
            raise ValueError(
                f"{self.duration} s at hop {self.hop_length} gives {self.frames} frames after the delta trims"
            )

    @property
    def samples(self) -> int:
        """Samples kept per clip (the first ``duration`` seconds, zero-padded if shorter)."""
        return int(round(self.duration * self.sample_rate))

    @property
    def frames(self) -> int:
        """Frames of the feature: centred STFT frames (1 + samples // hop) less 4 on each side."""
        return 1 + self.samples // self.hop_length - 8

    @property
    def stft_frames(self) -> int:
        """Centred STFT frames of a clip: the cached log-mel is (n_mels, stft_frames)."""
        return 1 + self.samples // self.hop_length

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of :func:`logmel_features`' output."""
        return (3, self.n_mels, self.frames)

    def key(self) -> str:
        """A short hash of the parameters (and the feature version): the cache folder's name."""
        text = json.dumps({**dataclasses.asdict(self), "version": _FEATURE_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def _deltas(x: Tensor) -> Tensor:
    """Δ[t] = (x[t+1] − x[t−1]) / 10 + (x[t+2] − x[t−2]) / 5 along the last axis, valid region (T − 4)."""
    return (x[..., 3:-1] - x[..., 1:-3]) / 10.0 + (x[..., 4:] - x[..., :-4]) / 5.0


def stack_deltas(logmel: Tensor) -> Tensor:
    """(n_mels, T) scaled log-mel → (3, n_mels, T − 8): [static[4:-4], Δ[2:-2], ΔΔ], in the input's dtype."""
    delta = _deltas(logmel)
    return torch.stack([logmel[:, 4:-4], delta[:, 2:-2], _deltas(delta)])


def _to_mono(waveform: np.ndarray) -> np.ndarray:
    """1-D, or 2-D with channels on the shorter axis (soundfile's (frames, channels) or (channels, frames))."""
    if waveform.ndim == 1:
        return waveform
    if waveform.ndim == 2:
        return waveform.mean(axis=int(np.argmin(waveform.shape)))
    raise ValueError(f"expected a waveform of shape (samples,) or (samples, channels), got {waveform.shape}")


def logmel_features(
    waveform: np.ndarray | Tensor, sample_rate: int = 44100, params: FeatureParams | None = None
) -> Tensor:
    """Log-mel features with Δ and ΔΔ of one clip: float32 tensor (3, n_mels, frames), (3, 128, 423) for 10 s.

    Mono (channel mean); the first ``params.duration`` s (zero-padded); librosa power mel spectrogram (n_fft
    2048, hop 1024, Hann, centred frames with reflect padding as librosa < 0.10 did, 128 HTK bands from 0 to
    sr/2, no filter normalisation); ln(mel + 1e-8); min–max scaling of the clip to [0, 1] (float64, then
    float32 as the reference stores it); Δ along time and ΔΔ = Δ(Δ) in float32; channels [static[4:-4],
    Δ[2:-2], ΔΔ].

    Example: ``logmel_features(soundfile.read("clip.wav")[0])``.
    """
    return stack_deltas(torch.from_numpy(scaled_logmel(waveform, sample_rate, params)))


def scaled_logmel(
    waveform: np.ndarray | Tensor, sample_rate: int = 44100, params: FeatureParams | None = None
) -> np.ndarray:
    """The min–max-scaled log-mel spectrogram (n_mels, stft_frames) float32 of :func:`logmel_features`
    (what the cache stores)."""
    import librosa

    params = params or FeatureParams(sample_rate=sample_rate)
    if sample_rate != params.sample_rate:
        raise ValueError(f"sample_rate {sample_rate} differs from params.sample_rate {params.sample_rate}")
    y = np.asarray(waveform.detach().cpu().numpy() if isinstance(waveform, Tensor) else waveform, dtype=np.float64)
    y = _to_mono(y)[: params.samples]
    if y.shape[0] < params.samples:
        y = np.pad(y, (0, params.samples - y.shape[0]))
    mel = librosa.feature.melspectrogram(
        y=y, sr=sample_rate, n_fft=params.n_fft, hop_length=params.hop_length, window="hann", center=True,
        pad_mode=params.pad_mode, power=2.0, n_mels=params.n_mels, fmin=0.0, fmax=sample_rate / 2, htk=True,
        norm=None,
    )
    logmel = np.log(mel + params.log_offset)
    low, high = logmel.min(), logmel.max()
    logmel = (logmel - low) / (high - low) if high > low else np.zeros_like(logmel)
    return logmel.astype(np.float32)
