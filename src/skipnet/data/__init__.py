"""Data: torchvision data sets, ImageFolder trees (and the bundled CIFAR-10 JPEG tarball), sklearn digits.

Small images (<= 64 px) are decoded once into a uint8 tensor cache (kept on disk under the cache directory)
and augmented batch-wise on tensors -- padded random crop and horizontal flip drawn per sample -- so that
two CPU cores are not spent in PIL. Large images (ImageNet) go through DataLoader workers with the standard
transforms (RandomResizedCrop 224 + flip; resize 256 + centre crop 224).

A validation split is carved from the training set with a fixed seed (``--val-split``) so that model
selection never touches the test set. Every loader can be sharded across distributed ranks.

ImageFolder input is checked, not trusted: a missing or empty directory, a split without class folders or
images, test classes that the training split lacks, or a class folder not named in UTF-8 are one-line
``SkipnetError`` messages. Both paths read the images one listing gives (``folders.list_folder``): every image
file in a class folder and, recursively, its sub-folders, linked folders followed but none entered twice (a loop
is skipped with a warning), hidden files and folders skipped. Grayscale, palette, RGBA, CMYK and 16-bit images
are converted to 8-bit RGB. Corrupt or truncated files are skipped, never replaced by another image: small-image
splits log one warning with their count and the first few paths; large-image splits one warning per file when
they meet it (its row is dropped from the batch); either fails if a split has no readable image.

One module per job, each importing only those listed before it:

- ``sources``: the built-in data sets (torchvision's, the shipped digits) and the cache directory;
- ``folders``: ImageFolder trees and ``.tar.gz`` archives of them: extracted, checked, listed;
- ``decode``: small images decoded into one uint8 tensor per split, cached on disk;
- ``loaders``: :class:`TensorLoader`, :class:`FolderLoader` and the ImageFolder dataset they read;
- ``bundle``: the entry point, :func:`load_data` / :func:`build` of a :class:`DataSpec`, and :class:`DataBundle`.

How one image becomes what a network takes has one home, here, used by the loaders and by ``skipnet predict``
alike: :func:`image_decoder`, :func:`decode_bytes` / :func:`decode_file` and :func:`resize_small` (a small
image: decoded to uint8 RGB, resized to S x S), :func:`eval_transform` (a large one: resized to S * 256 / 224 and
centre-cropped), and :class:`Normalize` (``(x - mean) / std``).
"""

from skipnet.data.bundle import SMALL_MAX, SPLIT_SEED, DataBundle, DataSpec, build, load_data
from skipnet.data.decode import _tv_decoder as _tv_decoder
from skipnet.data.decode import (
    decode_bytes,
    decode_file,
    image_decoder,
    pil_rgb,
    resize_small,
    too_elongated,
    too_many_pixels,
)
from skipnet.data.folders import IMAGE_EXTS, resolve_folder, walk_files
from skipnet.data.loaders import (
    FolderLoader,
    ImageList,
    Normalize,
    SafeFolder,
    TensorLoader,
    eval_transform,
    image_folder,
)
from skipnet.data.sources import BUILTIN, BUILTINS, Builtin, cache_dir

__all__ = [
    "BUILTIN",
    "IMAGE_EXTS",
    "SMALL_MAX",
    "SPLIT_SEED",
    "BUILTINS",
    "Builtin",
    "DataBundle",
    "DataSpec",
    "FolderLoader",
    "ImageList",
    "Normalize",
    "SafeFolder",
    "TensorLoader",
    "build",
    "cache_dir",
    "decode_bytes",
    "decode_file",
    "eval_transform",
    "image_decoder",
    "image_folder",
    "load_data",
    "pil_rgb",
    "resize_small",
    "resolve_folder",
    "too_elongated",
    "too_many_pixels",
    "walk_files",
]

# their names before they were public (tests import them)
_image_folder = image_folder
_decode_file = decode_file
