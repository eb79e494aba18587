"""The ZAYA1 model: pure architecture, no distributed code."""

from zaya_train.model.cache import ZayaCache
from zaya_train.model.config import PRESETS, ZayaConfig, preset
from zaya_train.model.counts import parameter_counts
from zaya_train.model.model import ZayaForCausalLM, ZayaOutput

__all__ = ["PRESETS", "ZayaCache", "ZayaConfig", "ZayaForCausalLM", "ZayaOutput", "parameter_counts", "preset"]
