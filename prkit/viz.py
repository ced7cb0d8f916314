"""Plotting only: image grids, loss curves, attention heat maps, LAG masks, difference maps, explorers.

Every function returns a matplotlib Figure (or a widget) and computes nothing the library needs.
Interactive explorers fall back to static figures when widgets are unavailable or not wanted.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _plt():
    import matplotlib.pyplot as plt

    return plt


def to_array(image) -> np.ndarray:
    """PIL image (any mode), (H, W[, C]) uint8/float array or (C, H, W) tensor (uint8, or float in [-1, 1] /
    [0, 1]) -> (H, W, 3) float [0, 1]; grey repeated to RGB, alpha dropped; a batch of one (1, ...) is its image."""
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) == 4:
        if shape[0] != 1:
            raise ValueError(f"to_array reads one image, got a batch of {shape[0]} images {tuple(shape)}: pass one "
                             "(images[i]), or the batch to image_grid")
        image = image[0]
    if hasattr(image, "convert"):  # PIL: palette, grey, CMYK, RGBA -> RGB
        image = np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):
        tensor = image.detach().cpu()
        image = tensor.numpy() if str(tensor.dtype) == "torch.uint8" else tensor.float().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)
        if image.dtype != np.uint8 and image.min() < 0:
            image = (image + 1) / 2
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image / 255.0
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, -1)
    return np.clip(image[..., :3].astype(np.float32), 0, 1)


def _images(images) -> Sequence:
    """A list or batch of images as it is; one image (PIL, (H, W, 3|4) array or tensor, (3|4, H, W) tensor) as a list
    of one, not split into its rows."""
    if hasattr(images, "convert"):
        return [images]
    shape = getattr(images, "shape", None)
    if shape is not None and len(shape) == 3 and (shape[-1] in (3, 4) or (hasattr(images, "detach")
                                                                          and shape[0] in (3, 4))):
        return [images]
    return images


def image_grid(images: Sequence, ncols: int | None = None, titles: Sequence[str] | None = None,
               row_labels: Sequence[str] | None = None, size: float = 1.8, suptitle: str | None = None):
    """Images in a grid (a list, a batch, or one image); ``row_labels`` name the rows (e.g. base / residuals / LAG).

    ``titles``: one per image, in the images' order, or one per column (drawn over the top row only); any other
    count is refused (images of ``num_images`` per prompt come grouped by prompt: p0, p0, p1, p1, ...).
    """
    images = _images(images)
    n = len(images)
    if not n:
        raise ValueError("image_grid needs at least one image")
    plt = _plt()
    ncols = ncols or min(n, 8)
    if titles is not None and len(titles) not in (n, ncols):
        raise ValueError(f"image_grid got {len(titles)} titles for {n} images in {ncols} columns: give one title "
                         f"per image ({n}, in the images' order) or one per column ({ncols})")
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.4 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(i < n)
        if i < n:
            ax.imshow(to_array(images[i]), interpolation="nearest")
            if titles is not None and i < len(titles):
                ax.set_title(titles[i], fontsize=7)
    if row_labels is not None:
        for r, label in enumerate(row_labels[:nrows]):
            axes[r, 0].set_ylabel(label, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def plot_losses(losses: Sequence[float], window: int = 10, title: str = "training loss"):
    """Per-step loss with a moving average."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, alpha=0.35, lw=1, label="per step")
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, lw=2, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def _upsample(map_: np.ndarray, size: tuple[int, int], normalize: bool = True) -> np.ndarray:
    """``map_`` resized to ``size``; min-max stretched when ``normalize``, else clipped to [0, 1] (masks)."""
    from PIL import Image

    m = np.asarray(map_, dtype=np.float32)
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12) if normalize else np.clip(m, 0, 1)
    return np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize(size[::-1], Image.BILINEAR)) / 255.0


def _grid(map_) -> np.ndarray:
    """One map as an (h, w) float array (a tensor of any dtype, bfloat16 too); another shape is refused, named."""
    if hasattr(map_, "detach"):
        map_ = map_.detach().float().cpu().numpy()
    grid = np.asarray(map_, dtype=np.float32)
    if grid.ndim != 2:
        raise ValueError(f"a map to draw is one (h, w) grid, got shape {tuple(grid.shape)}: pick the image and the "
                         "token, e.g. store.get(block)[0, token], store.masks[(block, step)][0, :, :, 0]")
    return grid


def overlay(ax, image, map_, alpha: float = 0.55, cmap: str = "jet", normalize: bool = True) -> None:
    """Draw ``map_`` (h, w) upsampled over ``image`` on ``ax``: min-max stretched, or as it is in [0, 1] when not
    ``normalize`` (a mask: 1 is the colour map's top, 0 its bottom)."""
    base = to_array(image)
    ax.imshow(base, interpolation="nearest")
    ax.imshow(_upsample(_grid(map_), base.shape[:2], normalize), cmap=cmap, alpha=alpha, interpolation="bilinear",
              vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def token_heatmaps(image, maps, labels: Sequence[str], size: float = 1.8, suptitle: str | None = None):
    """One overlay per token: ``maps`` (T, h, w) aligned with ``labels``."""
    if len(getattr(maps, "shape", ())) == 4:
        raise ValueError(f"token_heatmaps draws one image's maps (T, h, w), got a batch {tuple(maps.shape)}: pass "
                         "one image's, e.g. store.aggregate()[0]")
    if len(maps) != len(labels):
        raise ValueError(f"{len(maps)} maps for {len(labels)} labels: keep the labels' positions in the store, "
                         "AttentionStore(tokens=positions) with positions, labels = prkit.prompt_tokens(...)")
    plt = _plt()
    n = len(labels) + 1
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.4), squeeze=False)
    axes[0, 0].imshow(to_array(image), interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=8)
    axes[0, 0].axis("off")
    for ax, m, label in zip(axes[0, 1:], maps, labels):
        overlay(ax, image, m)
        ax.set_title(label, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def block_grid(image, maps_by_block: dict, size: float = 1.6, title: str = "", cmap: str = "jet",
               normalize: bool = True):
    """One overlay per block (name -> (h, w) map), labelled with the block and its resolution; ``normalize=False``
    shows masks and fractions in [0, 1] as they are instead of stretching each map to its own range."""
    plt = _plt()
    names = list(maps_by_block)
    if not names:
        raise ValueError("no maps to draw: the store or mask dict is empty (was anything sampled with it?)")
    fig, axes = plt.subplots(1, len(names), figsize=(size * len(names), size + 0.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        m = _grid(maps_by_block[name])
        overlay(ax, image, m, cmap=cmap, normalize=normalize)
        short = name.replace("_blocks.", "").replace(".attentions.", ".").replace("mid_block", "mid")
        ax.set_title(f"{short}\n{m.shape[0]}x{m.shape[1]}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _pairs(reference, others, what: str) -> tuple[Sequence, Sequence]:
    """Two image lists (or single images) of one length >= 1, else a ValueError naming ``what`` refused them."""
    reference, others = _images(reference), _images(others)
    if len(reference) != len(others) or not len(reference):
        raise ValueError(f"{what} needs two equally long, non-empty lists of images, got {len(reference)} and "
                         f"{len(others)}")
    return reference, others


def difference_maps(reference: Sequence, others: Sequence, titles: Sequence[str] | None = None, size: float = 1.8):
    """Per-pixel absolute difference |other - reference| (mean over RGB), one column per pair; ``titles``: one per
    pair."""
    reference, others = _pairs(reference, others, "difference_maps")
    n = len(reference)
    if titles is not None and len(titles) != n:
        raise ValueError(f"difference_maps got {len(titles)} titles for {n} pairs: give one per pair")
    plt = _plt()
    fig, axes = plt.subplots(1, n, figsize=(size * n, size + 0.4), squeeze=False)
    for i, (a, b) in enumerate(zip(reference, others)):
        diff = np.abs(to_array(b) - to_array(a)).mean(-1)
        axes[0, i].imshow(diff, cmap="magma", vmin=0, vmax=1)
        axes[0, i].axis("off")
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=7)
    fig.tight_layout()
    return fig


def mean_change(reference: Sequence, others: Sequence) -> float:
    """Mean absolute pixel change in [0, 1] between paired images."""
    reference, others = _pairs(reference, others, "mean_change")
    return float(np.mean([np.abs(to_array(b) - to_array(a)).mean() for a, b in zip(reference, others)]))


def save_images(groups: dict, folder) -> list:
    """Write each group's images as PNG files ``<group>_<i>.png`` into ``folder``; returns the paths."""
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for group, images in groups.items():
        for i, image in enumerate(images):
            path = folder / f"{group.replace('+', '_')}_{i:02d}.png"
            Image.fromarray((to_array(image) * 255).round().astype(np.uint8)).save(path)
            paths.append(path)
    return paths


def metric_scatter(rows: Sequence[dict], x: str, y: str, label: str, title: str = ""):
    """Scatter of two metrics, one labelled point per row (e.g. identity vs prompt accuracy)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for row in rows:
        ax.scatter(row[x], row[y])
        ax.annotate(str(row[label]), (row[x], row[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (a notebook, Colab, papermill), where widgets can have a frontend."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _check_labels(store, labels: Sequence[str]) -> None:
    """The store's maps must hold one map per label: titles name labels, the maps are indexed alike."""
    blocks = store.blocks()
    if not blocks:
        raise ValueError("the attention store is empty: fill it by sampling with generate(..., store=store) or "
                         "inside capture_attention(pipe, store=store)")
    tokens = store.get(blocks[0]).shape[1]
    if tokens != len(labels):
        raise ValueError(f"the store holds maps of {tokens} token positions but {len(labels)} labels were given: "
                         "fill it with AttentionStore(tokens=positions) for positions, labels = "
                         "prkit.prompt_tokens(pipe, prompt)")


def attention_explorer(store, image, labels: Sequence[str], interactive: bool = True, image_index: int = 0,
                       token: int = 0):
    """Token / block / step sliders over an AttentionStore, below a static all-blocks figure of ``token``.

    Args:
        store: a filled ``prkit.AttentionStore`` (tokens aligned with ``labels``).
        image: the generated image to overlay.
        interactive: add the widgets. Outside a Jupyter kernel (a script), or without ipywidgets, only the static
            figure is returned; in a kernel the static figure is displayed first, so an executed notebook without a
            widget frontend (papermill, nbconvert) still shows the maps.
        token: the index into ``labels`` shown first (the static view's token): the concept's, say.
    """
    _check_labels(store, labels)
    blocks = store.blocks()
    images = store.get(blocks[0]).shape[0]
    if not -images <= image_index < images:
        raise ValueError(f"attention_explorer: image_index={image_index}, but the store holds {images} image"
                         f"{'s' if images != 1 else ''} (the sampled images in order, prompt by prompt): pass 0 to "
                         f"{images - 1}")
    if not -len(labels) <= token < len(labels):
        raise ValueError(f"attention_explorer: token={token} is no index into the {len(labels)} labels {list(labels)}; "
                         "prkit.lag.word_index(labels, word) gives a word's")
    if interactive and _in_kernel():
        try:
            import ipywidgets as widgets
        except ImportError:
            interactive = False
    else:
        interactive = False
    plt = _plt()
    fig = block_grid(image, {b: store.get(b)[image_index, token].numpy() for b in blocks},
                     title=f"'{labels[token]}' averaged over steps (static view)")
    plt.close(fig)  # shown once (the inline backend would show an open one again)
    if not interactive:
        return fig
    from IPython.display import display

    display(fig)
    steps = sorted({s for _, s in store.maps})
    first = token
    token = widgets.Dropdown(options=[(l, i) for i, l in enumerate(labels)], value=first, description="token")
    block = widgets.SelectionSlider(options=blocks, description="block")
    step = widgets.SelectionSlider(options=[("all", -1)] + [(str(s), s) for s in steps], value=-1,
                                   description="step")

    def show(token, block, step):
        fig, ax = plt.subplots(figsize=(3, 3))
        overlay(ax, image, store.get(block, None if step < 0 else step)[image_index, token].numpy())
        ax.set_title(f"{labels[token]} @ {block}" + ("" if step < 0 else f", step {step}"), fontsize=8)
        plt.show()
        plt.close(fig)

    return widgets.interactive(show, token=token, block=block, step=step)
