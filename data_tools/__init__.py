"""The data side of mmloom: conversation JSON + media -> validated WebDataset shards + manifest.

Never imports `trainer` or `torch.distributed`; it owns the canonical sample schema
(`data_tools.sample`) and the manifest (`data_tools.manifest`) that the trainer consumes.
"""

__version__ = "0.4.0"  # bump when validation or the shard layout changes: re-runs then convert again
