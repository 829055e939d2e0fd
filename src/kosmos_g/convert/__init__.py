"""Converters from other checkpoint formats to kosmos-g folders."""

from .official import (UnsafeCheckpointError, convert_official, convert_official_state_dict,
                       load_official_checkpoint)

__all__ = ["UnsafeCheckpointError", "convert_official", "convert_official_state_dict",
           "load_official_checkpoint"]
