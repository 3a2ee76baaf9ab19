"""The DeepSeek-V3 network, read top-down: norm -> rope -> linear -> attention (MLA) -> mlp/moe -> transformer."""
