"""Data: readers (image folders, IDX, CIFAR pickles, tar shards), batched iteration and batched augmentation.

Every reader returns an `ImageSet` whose images are uint8 [B, C, S, S]; bad input raises
`selfsight.errors.DataError` with a one-line message naming the path.
"""

from selfsight.data.imageset import ImageSet, InMemoryImages, LazyFolderImages
from selfsight.data.loader import BatchStream, epoch_permutation, iterate_in_order
from selfsight.data.shards import ShardImages, ShardStream, make_batch_stream, open_shards
from selfsight.data.sources import open_images
from selfsight.data.worker_views import PreparedViews, WorkerViews, worker_views_for

__all__ = [
    "BatchStream",
    "ImageSet",
    "InMemoryImages",
    "LazyFolderImages",
    "PreparedViews",
    "ShardImages",
    "ShardStream",
    "WorkerViews",
    "epoch_permutation",
    "iterate_in_order",
    "make_batch_stream",
    "open_images",
    "open_shards",
    "worker_views_for",
]
