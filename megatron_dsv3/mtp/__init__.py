"""Multi-token prediction (DeepSeek-V3 section 2.2): D sequential modules sharing the embedding
and the output head, each predicting one token further ahead."""

from megatron_dsv3.mtp.layer import MTPLayer, MTPLayerSubmodules, mtp_block_spec, roll_left
from megatron_dsv3.mtp.loss import attach_mtp_losses

__all__ = ["MTPLayer", "MTPLayerSubmodules", "mtp_block_spec", "roll_left", "attach_mtp_losses"]
