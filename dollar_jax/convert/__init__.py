"""Torch -> Flax weight conversion (declarative key-mapping tables)."""

from dollar_jax.convert.wan import WAN_TABLE, ConversionError, convert, plan_conversion

__all__ = ["WAN_TABLE", "ConversionError", "convert", "plan_conversion"]
