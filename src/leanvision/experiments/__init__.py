"""The papers' experiments and the main job, built on the engine and the analysis instruments."""
