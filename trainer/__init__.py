"""The training side of mmloom: config, models, streaming data, FSDP2 loop, checkpoints, export."""
