"""What a worker loads and from where: the VRAM plan, the loadout, the catalog, model sources and their cache, the
pipeline, FLUX's architecture facts, level sizes and the card.
"""
