"""Offline tools of the command line: bench and its report, the VRAM probe, the tiny model, random LoRAs. Nothing
on the serving path imports them.
"""
