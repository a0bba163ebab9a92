"""Natural-image patches from scikit-learn's sample images: whitened grey patches as in
Ng's sparse autoencoder exercise, and plain colour patches."""

from __future__ import annotations

import numpy as np


def whiten(image: np.ndarray, cutoff: float = 0.2) -> np.ndarray:
    """Olshausen & Field's (1996) whitening of a grey image: flatten the 1/f amplitude
    spectrum of natural images (multiply by f) and roll off high frequencies
    (``exp(-(f/cutoff)^4)``, ``cutoff`` in cycles per pixel), then unit variance. The
    default cutoff is half Olshausen's: the sample images are JPEGs whose block
    artefacts a higher cutoff amplifies into checkerboard filters."""
    h, w = image.shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    spectrum = np.fft.fft2(image - image.mean()) * f * np.exp(-((f / cutoff) ** 4))
    out = np.real(np.fft.ifft2(spectrum))
    return out / out.std()


def sample_patches(n: int = 10000, size: int = 8, seed: int = 0) -> np.ndarray:
    """Random ``size``x``size`` patches of scikit-learn's sample images, prepared as for
    Ng's sparse autoencoder exercise: his IMAGES were whitened natural scenes, so the
    grey images are whitened first (``whiten``); then each patch loses its mean, is
    truncated to +-3 standard deviations and squashed to [0.1, 0.9]. Returns
    (n, size*size) float32."""
    from sklearn.datasets import load_sample_images

    images = [whiten(img.astype(np.float64).mean(axis=2)) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, size * size))
    which = rng.integers(len(images), size=n)
    for i, k in enumerate(which):
        img = images[k]
        r = rng.integers(img.shape[0] - size + 1)
        c = rng.integers(img.shape[1] - size + 1)
        out[i] = img[r : r + size, c : c + size].ravel()
    out -= out.mean(axis=1, keepdims=True)
    limit = 3 * out.std()
    out = np.clip(out, -limit, limit) / limit
    return ((out + 1) * 0.4 + 0.1).astype(np.float32)


def sample_colour_patches(n: int = 5000, size: int = 8, seed: int = 0) -> np.ndarray:
    """Random ``size``x``size`` colour patches of scikit-learn's sample images as they
    are: (n, 3, size, size) float32 pixel values 0..255 (channels first)."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    which = rng.integers(len(images), size=n)
    for i, k in enumerate(which):
        img = images[k]
        r = rng.integers(img.shape[0] - size + 1)
        c = rng.integers(img.shape[1] - size + 1)
        out[i] = img[r : r + size, c : c + size].transpose(2, 0, 1)
    return out
