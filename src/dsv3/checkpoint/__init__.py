"""The official checkpoint format: one name table, streaming safetensors I/O, FP8 blocks, conversion."""
