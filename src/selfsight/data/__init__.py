"""Data: readers (image folders, IDX, CIFAR pickles), batched iteration and batched augmentation.

Every reader returns an `ImageSet` whose images are uint8 [B, C, S, S]; bad input raises
`selfsight.errors.DataError` with a one-line message naming the path.
"""

from selfsight.data.imageset import ImageSet, InMemoryImages, LazyFolderImages
from selfsight.data.loader import BatchStream, epoch_permutation, iterate_in_order
from selfsight.data.sources import open_images

__all__ = [
    "BatchStream",
    "ImageSet",
    "InMemoryImages",
    "LazyFolderImages",
    "epoch_permutation",
    "iterate_in_order",
    "open_images",
]
