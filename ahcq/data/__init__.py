"""Procedural demo data (shapes) and COCO json helpers for the small-SAM testbed."""
