"""Job adapters: LoRA files read, scaled and fused into the loaded weights (through weight slots, whatever the
level's storage), and ControlNets.
"""
