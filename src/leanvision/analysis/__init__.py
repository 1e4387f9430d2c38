"""Instruments that measure models: cost (params, MACs)."""
