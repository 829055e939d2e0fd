"""Training data: WebDataset shards (``docs/data-format.md``) and their construction.

:mod:`kosmos_g.data.shards` writes, lists, streams and validates shards; data
construction and converters build on it.
"""

from .shards import (BadSample, ShardWriter, decode_image, encode_member, expand_shards, iter_shard,
                     iter_shards, validate_sample)

__all__ = ["BadSample", "ShardWriter", "decode_image", "encode_member", "expand_shards", "iter_shard",
           "iter_shards", "validate_sample"]
