"""The render path: the engine (encode, denoise, decode) and the batcher that gathers held jobs; fault drills hook
in here.
"""
